"""Generated token ids in, text pieces out, as a stream: stop strings, and no half characters shown."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def check_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else stop
    if stop is None:
        return []
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"invalid stop={stop!r}: stop strings must be non-empty strings (a string or a list of them)")
    return stops


class TextStream:
    """Feed it each generated token; it returns the text that can be shown now. The text is decoded
    from all tokens so far (a token's text depends on its neighbours), an incomplete UTF-8 character
    or the beginning of a stop string is held back, and the text ends before the first stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.text = ""  # everything shown so far
        self.stopped = False  # a stop string appeared

    def push(self, token: int, last: bool = False) -> str:
        """The new text after `token`; `last`: no more tokens follow (show everything)."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = _first_stop(text, self.stops)
        self.stopped = cut is not None
        end = cut if cut is not None else (len(text) if last else _safe_end(text, self.stops))
        return self._show(text, end)

    def take(self, token: int, eos_ids, last: bool) -> tuple[str, str | None]:
        """A sampled token: (the text to show now, why generation ends here or None). An end-of-sequence
        token ends it ("stop") and shows the held-back rest; so does a stop string; `last` (no room or
        no tokens left) ends it as "length"."""
        if token in eos_ids:
            return self.finish(), "stop"
        piece = self.push(token, last)
        return piece, "stop" if self.stopped else "length" if last else None

    def finish(self) -> str:
        """The held-back rest when generation ends without a new token (eos, cancel)."""
        if self.stopped or not self.tokens:
            return ""
        return self._show(self.decode(self.tokens), None)

    def _show(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[len(self.text) : end] if end > len(self.text) else ""
        self.text += piece
        return piece


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown: hold back an incomplete UTF-8 character or a possible stop prefix."""
    end = len(text) - 1 if text.endswith("\ufffd") else len(text)
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:n]):
                end = min(end, len(text[:end]) - n)
                break
    return end
