"""What keeps one client from starving the rest: API keys, and rate limits on requests and tokens."""

from __future__ import annotations

import collections
import hmac
import math
import re
import threading
import time
from pathlib import Path

from .protocol import ApiError

WINDOW_S = 60.0


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line (blank lines and # comments ignored); read from a file so keys never show on
    the command line's process list."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({e.strerror})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"--api-key-file {path}: no keys in it (one key per line)")
    return keys


def check_api_key(authorization: str | None, keys: list[str]) -> str:
    """The key the request presents (Authorization: Bearer KEY), compared with every configured key
    in constant time; ApiError 401 otherwise."""
    scheme, _, presented = (authorization or "").partition(" ")
    presented = presented.strip()
    matched = None
    for key in keys:  # compare with all of them: the time taken says nothing about which matched
        if hmac.compare_digest(presented.encode(), key.encode()) and scheme.lower() == "bearer":
            matched = key
    if matched is None:
        raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                       kind="authentication_error", code="invalid_api_key")
    return matched


def parse_rate(text: str | None, flag: str) -> int | None:
    """'60/min', '1000/minute' or a plain number per minute -> per-minute count; None when unset."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:/\s*(?:m|min|minute))?\s*", text)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"{flag} {text!r}: give a positive count per minute, e.g. 60/min")
    return int(match.group(1))


class RateLimiter:
    """Per client (API key, or address without keys): requests and tokens in the last minute.
    A request over either limit is refused with 429 and Retry-After (seconds until it would fit)."""

    def __init__(self, requests_per_min: int | None, tokens_per_min: int | None, window_s: float = WINDOW_S):
        self.requests_per_min, self.tokens_per_min, self.window_s = requests_per_min, tokens_per_min, window_s
        self._lock = threading.Lock()
        self._requests: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._tokens: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def admit(self, client: str, now: float | None = None):
        """Count a request of `client`, or raise ApiError 429."""
        if self.requests_per_min is None and self.tokens_per_min is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            requests, tokens = self._expire(self._requests[client], now), self._expire(self._tokens[client], now)
            if self.requests_per_min is not None and len(requests) >= self.requests_per_min:
                self._refuse(f"{self.requests_per_min} requests per minute", requests[0][0] + self.window_s - now)
            if self.tokens_per_min is not None and sum(n for _, n in tokens) >= self.tokens_per_min:
                self._refuse(f"{self.tokens_per_min} tokens per minute", tokens[0][0] + self.window_s - now)
            requests.append((now, 1))

    def spend(self, client: str, tokens: int, now: float | None = None):
        """Count the tokens a request of `client` used (prompt + generated)."""
        if self.tokens_per_min is not None and tokens:
            with self._lock:
                self._tokens[client].append((time.monotonic() if now is None else now, tokens))

    def _expire(self, window: collections.deque, now: float) -> collections.deque:
        while window and window[0][0] <= now - self.window_s:
            window.popleft()
        return window

    @staticmethod
    def _refuse(limit: str, wait_s: float):
        retry = max(1, math.ceil(wait_s))
        raise ApiError(429, f"rate limit reached ({limit}); retry in {retry} s", kind="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
