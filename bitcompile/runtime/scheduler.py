"""Continuous batching: the submitted requests share every model call.

One engine thread makes all model calls. A request joins at any step boundary, once the KV cache has
room for everything it may grow into (pages are promised when it starts, so a running sequence is
never evicted or truncated; while there is no room it waits in a bounded queue). Each step runs, in
one call, the next token of every sequence that is generating and chunks of the prompts still being
read, up to `prefill_chunk` prompt tokens a step, so running streams keep producing tokens while a long
prompt comes in. Prompt chunks start at multiples of `prefill_chunk`, where the single-sequence
prefill cuts them: a request computes the same numbers alone or in company. A request leaves when it
ends (eos, a stop string, its token limit, the context, cancel, an error) and its pages are free for
the next step; what its KV holds stays as a prefix for later prompts that begin the same way (a
shared system prompt, the earlier turns of a conversation), which fork it instead of prefilling it
again, until its pages are needed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

from .kv_cache import pages_for
from .sampling import Sampler, SamplingParams
from .text import TextStream

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine's max_queue allows."""


class RequestError(RuntimeError):
    """A request that ended with an error (the message says which request and why)."""


class Request:
    """A submitted request. Iterate it for the generated text piece by piece as it comes; `result()`
    waits for all of it; `cancel()` ends it at the next step. Token counts and timings are filled in
    as it runs (seconds, time.perf_counter clock)."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
                 stops: list[str], decode, wake, logprobs: int | None = None, on_event=None):
        self.id = rid
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "cancelled", "error"
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.token_times: list[float] = []  # when each generated token was sampled
        self.finished_at: float | None = None
        self.prefix_reused = 0  # prompt tokens taken from the cache instead of prefilled
        self.fed = 0  # generated tokens in the cache
        self._sampler = Sampler(params)
        self._text = TextStream(decode, stops)
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._wake = wake
        self._on_event = on_event  # called on the engine thread: ("piece", text) ... ("done", reason)
        self.logprobs = logprobs  # None, or how many most likely tokens to report at each position
        self.token_logprobs: list[float] = []  # log-probability of each generated token (with logprobs)
        self.top_logprobs: list[dict[int, float]] = []
        # the engine thread's state
        self.prefilled = 0  # prompt tokens in the cache
        self.next_token: int | None = None  # sampled, not yet in the cache

    # -- the user's side ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece
        self._raise_error()

    def result(self, timeout: float | None = None) -> str:
        """The whole generated text (without the prompt) once the request has ended."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished within {timeout} s")
        self._raise_error()
        return self._text.text

    def cancel(self):
        self._cancelled.set()
        self._wake()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def text(self) -> str:
        return self._text.text

    @property
    def output_ids(self) -> list[int]:
        return list(self._text.tokens)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self._text.tokens)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.submitted_at if self.token_times else None

    @property
    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def kv_tokens(self) -> list[int]:
        """The tokens this request's sequence holds in the KV cache."""
        if self.prefilled < len(self.prompt_ids):
            return self.prompt_ids[: self.prefilled]
        return self.prompt_ids + self._text.tokens[: self.fed]

    def _raise_error(self):
        if self.finish_reason == "error":
            raise RequestError(f"request {self.id} failed: {self.error}") from self.error

    # -- the engine thread's side ------------------------------------------------------------------
    def _show(self, piece: str):
        if piece:
            self._pieces.put(piece)
            if self._on_event is not None:
                self._on_event("piece", piece)

    def _finish(self, reason: str, error: BaseException | None = None):
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.perf_counter()
        self._pieces.put(None)
        self._done.set()
        if self._on_event is not None:
            self._on_event("done", reason)


class Scheduler:
    """The engine thread and its queues: see the module docstring."""

    def __init__(self, engine):
        self.engine = engine
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []  # in the cache, in arrival order
        self._next_id = 1  # the cache's sequence 0 is the direct API's
        self._closed = False
        self._calls: collections.deque = collections.deque()  # (function, future) to run between steps
        self.steps = 0
        self.prefilled_tokens = 0  # prompt tokens run through the model
        self.prefix_hits = 0  # requests that forked a cached prefix
        self.prefix_tokens = 0  # prompt tokens those took from the cache
        self._thread = threading.Thread(target=self._loop, name="bitcompile-engine", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int,
               stops: list[str], logprobs: int | None = None, on_event=None) -> Request:
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed: load the artifact again to submit requests")
            if len(self._waiting) >= self.engine.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue="
                                     f"{self.engine.max_queue}); retry later, or load with a larger max_queue")
            request = Request(self._next_id, prompt_ids, params, max_new_tokens, stops, self.engine.decode,
                              self._wake, logprobs, on_event)
            self._next_id += 1
            if max_new_tokens == 0:
                request._finish("length")
            else:
                self._waiting.append(request)
                self._cond.notify()
        return request

    def call(self, function) -> concurrent.futures.Future:
        """Run `function()` on the engine thread between two steps (model calls of the direct API, for
        a server whose own threads must not make them); its result or exception comes in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed: load the artifact again to submit requests")
            self._calls.append((function, future))
            self._cond.notify()
        return future

    def status(self) -> dict:
        """Queue length, running sequences, KV pages: what a server's metrics report."""
        with self._cond:
            waiting, running = len(self._waiting), len(self._running)
        kv = self.engine.kv
        return {"waiting": waiting, "running": running, "steps": self.steps, "kv_pages_total": kv.total_pages,
                "kv_pages_used": kv.used_pages(), "prefixes_kept": len(kv.kept), "prefix_hits": self.prefix_hits,
                "prefix_tokens": self.prefix_tokens, "prefilled_tokens": self.prefilled_tokens}

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self):
        with self._cond:
            self._cond.notify()

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self):
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running or self._calls):
                    self._cond.wait()
                if self._closed:
                    break
                calls, self._calls = list(self._calls), collections.deque()
            for function, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as error:  # the caller sees it
                        future.set_exception(error)
            try:
                if not self._step():
                    with self._cond:  # nothing could run (the direct API holds the room): wait for a change
                        self._cond.wait(0.01)
            except Exception as error:  # a bug of ours must not end the thread: fail what was running
                log.exception("engine step failed")
                with self.engine._lock:
                    for request in list(self._running):
                        self._end(request, "error", error)
        with self.engine._lock:
            for request in list(self._running):
                self._end(request, "cancelled")
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
        for request in waiting:
            request._finish("cancelled")
        for _, future in calls:
            future.cancel()

    def _step(self) -> bool:
        """One model call for the running sequences; False when there was nothing to run."""
        engine = self.engine
        with engine._lock:
            self._drop_cancelled()
            self._admit()
            decoding = [r for r in self._running if r.next_token is not None]
            chunks = self._prompt_chunks()
            if not decoding and not chunks:
                return False
            batch = [(r, [r.next_token]) for r in decoding] + [(r, r.prompt_ids[r.prefilled:end]) for r, end in chunks]
            wants = [True] * len(decoding) + [end == len(r.prompt_ids) for r, end in chunks]
            try:
                logits = engine.forward([r.id for r, _ in batch], [tokens for _, tokens in batch], wants)
            except Exception as error:
                log.exception("model call failed")
                for request, _ in batch:
                    self._end(request, "error", error)
                return True
            self.steps += 1
            for request in decoding:
                request.fed += 1
            for request, end in chunks:
                self.prefilled_tokens += end - request.prefilled
                request.prefilled = end
            rows = iter(logits)
            for (request, _), want in zip(batch, wants):
                if want:
                    self._advance(request, next(rows))
        return True

    def _drop_cancelled(self):
        for request in [r for r in self._running if r._cancelled.is_set()]:
            self._end(request, "cancelled")
        with self._cond:
            cancelled = [r for r in self._waiting if r._cancelled.is_set()]
            self._waiting = collections.deque(r for r in self._waiting if not r._cancelled.is_set())
        for request in cancelled:
            request._finish("cancelled")

    def _admit(self):
        """Move waiting requests into the cache, first come first served, while there is room."""
        kv, context = self.engine.kv, self.engine.context_length
        with self._cond:
            while self._waiting:
                request = self._waiting[0]
                pages = pages_for(min(len(request.prompt_ids) + request.max_new_tokens, context))
                if not kv.can_add(pages):
                    break
                self._waiting.popleft()
                parent, shared = kv.longest_prefix(request.prompt_ids, {r.id: r.kv_tokens() for r in self._running})
                shared = min(shared, len(request.prompt_ids) - 1)  # the last prompt token runs: its logits
                if kv.add(request.id, pages, parent if shared > 0 else None, shared) is not None:
                    request.prefilled = request.prefix_reused = shared
                    self.prefix_hits += 1
                    self.prefix_tokens += shared
                self._running.append(request)

    def _prompt_chunks(self) -> list[tuple[Request, int]]:
        """(request, end of its chunk) for the prompts being read, oldest first, within the budget."""
        size = self.engine.prefill_chunk
        budget, chunks = size, []
        for request in self._running:
            if request.next_token is not None or request.prefilled == len(request.prompt_ids):
                continue
            end = min((request.prefilled // size + 1) * size, len(request.prompt_ids))
            if end - request.prefilled > budget:
                break
            chunks.append((request, end))
            budget -= end - request.prefilled
        return chunks

    def _advance(self, request: Request, logits: np.ndarray):
        """Sample the request's next token from its logits; show its text; end it when it is done."""
        try:
            token = request._sampler(logits, request.prompt_ids + request._text.tokens)
        except Exception as error:
            self._end(request, "error", error)
            return
        request.token_times.append(time.perf_counter())
        if request.logprobs is not None:
            _record_logprobs(request, logits, token)
        count = len(request._text.tokens) + 1
        last = count >= request.max_new_tokens or len(request.prompt_ids) + count >= self.engine.context_length
        piece, ended = request._text.take(token, self.engine.eos_token_ids, last)
        request._show(piece)
        if ended:
            self._end(request, ended)
        else:
            request.next_token = token

    def _end(self, request: Request, reason: str, error: BaseException | None = None):
        if error is None:
            self.engine.kv.retire(request.id, request.kv_tokens())
        else:  # after a failed call the sequence's KV is not to be trusted
            self.engine.kv.remove(request.id)
        if request in self._running:
            self._running.remove(request)
        request._finish(reason, error)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _record_logprobs(request: Request, logits: np.ndarray, token: int):
    """The model's log-probabilities at this position (before sampling's penalties and temperature):
    the chosen token's, and the `request.logprobs` most likely tokens'."""
    lp = log_softmax(logits)
    request.token_logprobs.append(float(lp[token]))
    top = np.argsort(-lp)[: request.logprobs] if request.logprobs else []
    request.top_logprobs.append({int(t): float(lp[t]) for t in top})
