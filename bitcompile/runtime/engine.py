"""Run a compiled artifact: TVM runtime only (no compiler), numpy and tokenizers.

The artifact is code, so nothing is loaded before its manifest and every file hash check out and the
target matches this machine. Generation is prefill (in chunks) into a paged KV cache, then one decode
call per token. The cache holds many sequences: `submit` hands requests to the continuous-batching
scheduler (scheduler.py), whose steps run the sequences' tokens together (one weight stream a step);
`generate`, `stream`, `logits`, `prefill`/`step` run one sequence of their own between those steps.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..model.config import ModelConfig
from .artifact import (
    LIBRARY,
    PARAMS,
    TOKENIZER,
    ArtifactError,
    check_shapes,
    read_manifest,
    read_params,
    verify_files,
)
from .chat import ChatError, ChatTemplate, generation_defaults
from .kv_cache import PAGE_SIZE, KVCache, pages_for
from .machine import check_runnable, default_threads
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler
from .text import TextStream, check_stops
from .trust import keys_from_env, verify

MAX_BATCH = 256
DIRECT = 0  # the cache's sequence id of the single-sequence API; submitted requests count from 1
EMBEDDING = "embed_tokens.weight"


def import_tvm_runtime():
    """import tvm to run artifacts. tvm_ffi imports PyTorch whenever it is installed (about 200 MB of
    RSS, and a Python heap the garbage collector keeps walking) for tensor interop the runtime never
    uses; unless this process already has torch, torch is hidden while tvm loads (importable after).
    The thread pool gets one thread per core (machine.default_threads) before any kernel runs."""
    default_threads()
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm

        return tvm
    sys.modules["torch"] = None
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm


class PromptError(ValueError):
    """A prompt the model cannot take (empty, or longer than the context)."""


class Engine:
    """A loaded artifact. `logits`, `generate`, `stream`, `submit` and `generate_batch` are the API tools
    and tests rely on. Thread-safe: model calls take turns on one lock."""

    def __init__(self, path: str | Path, context_length: int | None = None, prefill_chunk: int = 128,
                 max_batch: int = 1, max_queue: int = 1024, trusted_keys=None):
        """context_length: tokens per sequence (prompt + generated; default the model's maximum).
        max_batch: sequences the KV cache holds at once (the direct API's one included); its memory is
        max_batch x context_length tokens. prefill_chunk: prompt tokens per model call (128 measured as
        fast as 256 on the 2B shape, with 43 MB less memory for the intermediate activations).
        max_queue: submitted requests that may wait for room before `submit` refuses more.
        trusted_keys: Ed25519 public keys (PEM paths or bytes); when given (or set in
        $BITCOMPILE_TRUSTED_KEYS), the artifact must be signed by one of them (trust.py). Everything is
        checked before the library is loaded."""
        self.path = Path(path)
        self.manifest = read_manifest(self.path)  # its seal: any change to the manifest is refused
        self.signer = None
        trusted_keys = keys_from_env() if trusted_keys is None else trusted_keys
        if trusted_keys:
            self.signer = verify(self.path, trusted_keys)
        verify_files(self.path, self.manifest)
        check_shapes(self.path, self.manifest)
        target = self.manifest["target"]
        check_runnable(target["requires"], target["name"])
        self.config = ModelConfig.from_dict(self.manifest["model"])
        limit = self.config.max_position_embeddings
        _check_int("context_length", context_length, 1, limit, "the model's limit", optional=True)
        _check_int("max_batch", max_batch, 1, MAX_BATCH, "")
        _check_int("prefill_chunk", prefill_chunk, 1, 1 << 16, "")
        _check_int("max_queue", max_queue, 0, 1 << 20, "")
        self.context_length = context_length or limit
        self.prefill_chunk = min(prefill_chunk, self.context_length)
        self.max_batch, self.max_queue = max_batch, max_queue

        tvm = import_tvm_runtime()  # runtime only: nothing here touches the compiler
        from tokenizers import Tokenizer
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        self.device = tvm.cuda(0) if target["requires"].get("device") == "cuda" else tvm.cpu()
        self._vm = VirtualMachine(tvm.runtime.load_module(str(self.path / LIBRARY)), self.device)
        arrays = read_params(self.path / PARAMS, self.manifest["params"], self.manifest["param_order"])
        self._params = [self._on_device(a) for a in arrays]
        self._params_file = open(self.path / PARAMS, "rb", buffering=0)  # embedding rows are read, not mapped
        self._table = self.manifest["params"][EMBEDDING]
        # decode's embedding row: one tensor for every step. A fresh one per step meant a cudaMalloc,
        # and freeing the last one a cudaFree, which waits for the whole GPU (0.7 ms a step on the
        # H100); reuse is safe because every step ends by reading its logits back
        self._one_row = tvm.runtime.empty((1, 1, self._table["shape"][1]), "uint16", self.device)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER))
        except Exception as e:  # the tokenizers library's own error types
            raise ArtifactError(f"{self.path / TOKENIZER}: not a valid tokenizer ({e}); recompile the model") from None
        try:  # the chat template and generation defaults, read as the checkpoint check read them
            self.chat_template = ChatTemplate.from_dir(self.path)
            eos, self.generation_defaults = generation_defaults(self.path, self.config.vocab_size)
        except ChatError as e:
            raise ArtifactError(str(e)) from None
        self.eos_token_ids = set(self.config.eos_token_ids) | set(eos)
        if self.chat_template is not None:  # the token that ends a turn, where it is one token
            turn_end = self.tokenizer.token_to_id(self.chat_template.eos_token) if self.chat_template.eos_token else None
            self.eos_token_ids |= {turn_end} if turn_end is not None else set()
        shape = tvm.runtime.ShapeTuple
        # a step of the scheduler carries one prompt chunk plus one token of every other sequence
        handle = self._vm["create_kv_cache"](shape([max_batch]), shape([max_batch * self.context_length]),
                                             shape([self.prefill_chunk + max_batch]), shape([PAGE_SIZE]), shape([0]))
        self.kv = KVCache(tvm, handle, max_batch)
        self._lock = threading.RLock()  # one model call at a time: the scheduler's steps and the direct API
        self._cache_len: int | None = None  # tokens of the direct API's sequence in the cache
        self._scheduler = None
        self._scheduler_lock = threading.Lock()
        self.closed = False

    def _on_device(self, array: np.ndarray):
        """A parameter for the VM: zero copy from the mapped file on the CPU, copied to a GPU."""
        if self.device.dlpack_device_type() == self._tvm.cpu().dlpack_device_type():
            return self._tvm.runtime.from_dlpack(array)
        return self._tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    # -- model calls -------------------------------------------------------------------------------
    def _embedding_rows(self, ids: Sequence[int]) -> np.ndarray:
        """The tokens' rows of the embedding table (bf16 bits [len, hidden]), read from the parameter
        file: mapping the table instead would fault in 64 KB around each row (see model/bitnet.py: BF16Embedding)."""
        hidden = self._table["shape"][1]
        rows = np.empty((len(ids), hidden), np.uint16)
        for row, token in zip(rows, ids):
            offset = self._table["offset"] + int(token) * hidden * 2
            if os.preadv(self._params_file.fileno(), [row], offset) != row.nbytes:
                raise ArtifactError(f"{self.path / PARAMS}: truncated embedding table; recompile the model")
        return rows

    def _input(self, rows: np.ndarray):
        tokens = self._one_row if rows.shape == self._one_row.shape else \
            self._tvm.runtime.empty(rows.shape, "uint16", self.device)
        tokens.copyfrom(rows)
        return tokens

    def _call(self, fn: str, seqs: Sequence[int], lengths: Sequence[int], rows: np.ndarray, *extra):
        """One model function over the sequences `seqs`, each appending `lengths` tokens."""
        self.kv.begin(seqs, lengths)
        out, self.kv.handle = self._vm[fn](self._input(rows), *extra, self.kv.handle, self._params)
        self.kv.end()
        return out

    def forward(self, seqs: Sequence[int], chunks: Sequence[Sequence[int]], want: Sequence[bool]) -> np.ndarray:
        """Append each chunk of tokens to its sequence in one model call; logits float32 [n, vocab] of
        the last position of each chunk with `want` set, in order. One token per sequence runs the
        decode kernels (`decode` alone, `batch_decode` for several), anything else `batch_prefill`."""
        rows = self._embedding_rows([t for chunk in chunks for t in chunk])
        lengths = [len(c) for c in chunks]
        if all(n == 1 for n in lengths):
            fn = "decode" if len(seqs) == 1 else "batch_decode"
            logits = self._call(fn, seqs, lengths, rows[:, None, :]).numpy()[:, 0]
            return logits if all(want) else logits[np.asarray(want, dtype=bool)]
        ends = np.cumsum(lengths) - 1
        positions = self._tvm.runtime.tensor(ends[np.asarray(want, dtype=bool)].astype(np.int32), self.device)
        return self._call("batch_prefill", seqs, lengths, rows[None], positions).numpy()[0]

    # -- the direct API's own sequence -------------------------------------------------------------
    def _start_direct(self, tokens: int):
        """(Re)start the direct sequence with room for `tokens` tokens."""
        self._end_direct()
        self.kv.add(DIRECT, pages_for(tokens))
        self._cache_len = 0

    def _end_direct(self):
        self.kv.remove(DIRECT)
        self._cache_len = None

    def _run(self, fn: str, ids: Sequence[int]):
        """Append `ids` to the direct sequence through `fn` (prefill or decode); the output tensor."""
        out = self._call(fn, [DIRECT], [len(ids)], self._embedding_rows(ids)[None])
        self._cache_len += len(ids)
        return out

    def _prefill(self, ids: Sequence[int], room: int):
        """Prefill the direct sequence from empty; return the hidden states of each chunk."""
        self._start_direct(room)
        return [self._run("prefill", ids[i : i + self.prefill_chunk]) for i in range(0, len(ids), self.prefill_chunk)]

    def _check_prompt(self, ids: Sequence[int]):
        if len(ids) == 0:
            raise PromptError("the prompt is empty: give at least one token of text")
        if len(ids) >= self.context_length:
            raise PromptError(
                f"the prompt is {len(ids)} tokens, but the context holds {self.context_length} "
                f"(prompt plus generated tokens); shorten the prompt"
                + ("" if self.context_length == self.config.max_position_embeddings
                   else f" or load with a larger context_length (up to {self.config.max_position_embeddings})")
            )
        bad = [t for t in ids if not (0 <= int(t) < self.config.vocab_size)]
        if bad:
            raise PromptError(f"token ids {bad[:5]} are outside the vocabulary 0..{self.config.vocab_size - 1}")

    def _ids(self, prompt_or_ids: str | Sequence[int]) -> list[int]:
        if isinstance(prompt_or_ids, str):
            ids = self.encode(prompt_or_ids)
        else:
            ids = [int(t) for t in prompt_or_ids]
        self._check_prompt(ids)
        return ids

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one prefill from an empty cache: float32 [len, vocab]."""
        ids = [int(t) for t in token_ids]
        self._check_prompt(ids)
        with self._lock:
            try:
                return np.concatenate([self._vm["head"](h, self._params).numpy()[0]
                                       for h in self._prefill(ids, len(ids))])
            finally:
                self._end_direct()

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Start a sequence: logits of its last position (float32 [vocab]); `step` continues it (the
        sequence keeps room for the whole context until the next `prefill`)."""
        ids = [int(t) for t in token_ids]
        self._check_prompt(ids)
        with self._lock:
            return self._last_logits(ids, self.context_length)

    def _last_logits(self, ids: list[int], room: int) -> np.ndarray:
        return self._vm["head_last"](self._prefill(ids, room)[-1], self._params).numpy()[0, -1]

    def step(self, token: int) -> np.ndarray:
        """Append one token to the sequence started by `prefill`; logits of the next position."""
        with self._lock:
            if self._cache_len is None:
                raise RuntimeError("step() continues a sequence: call prefill() first")
            if self._cache_len + 1 > min(self.context_length, self.kv.reserved[DIRECT] * PAGE_SIZE):
                raise PromptError(f"the context of {self.context_length} tokens is full")
            return self._run("decode", [int(token)]).numpy()[0, -1]

    def drop_prefixes(self):
        """Forget the prefixes finished requests left in the KV cache (their pages become free)."""
        with self._lock:
            self.kv.drop_all_kept()

    def release(self):
        """End the sequence `prefill` started: its pages and its place in the cache go back to the
        scheduler (the next `prefill` would do it too)."""
        with self._lock:
            self._end_direct()

    # -- text ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self, prompt_or_ids: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece (the prompt is not repeated)."""
        ids, params, stops = self._request(prompt_or_ids, max_new_tokens, temperature, top_k, top_p,
                                           repetition_penalty, seed, stop)
        return self._stream(ids, max_new_tokens, Sampler(params), stops)

    def _request(self, prompt_or_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop):
        """A request's arguments checked, each refusal naming the value: (prompt ids, sampling, stops)."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        _check_int("max_new_tokens", max_new_tokens, 0, None, "")
        return self._ids(prompt_or_ids), params, check_stops(stop)

    def _stream(self, ids: list[int], max_new_tokens: int, sampler: Sampler, stops: list[str]) -> Iterator[str]:
        if max_new_tokens == 0:
            return
        limit = min(self.context_length, len(ids) + max_new_tokens)
        text = TextStream(self.decode, stops)
        with self._lock:
            logits = self._last_logits(ids, limit)  # stream() has checked the prompt already
        try:
            while True:
                token = sampler(logits, ids + text.tokens)
                last = len(text.tokens) + 1 >= max_new_tokens or self._cache_len + 1 >= self.context_length
                piece, ended = text.take(token, self.eos_token_ids, last)
                if piece:
                    yield piece
                if ended:
                    return
                logits = self.step(token)
        finally:
            with self._lock:
                self._end_direct()

    def generate(self, prompt_or_ids: str | Sequence[int], **kwargs) -> str:
        """The generated text (without the prompt); same arguments as `stream`."""
        return "".join(self.stream(prompt_or_ids, **kwargs))

    # -- chat ----------------------------------------------------------------------------------------
    def chat_prompt(self, messages) -> list[int]:
        """The token ids of `messages` ([{role, content}], roles system/user/assistant) rendered with the
        model's chat template, ending with the assistant's generation prompt."""
        if self.chat_template is None:
            raise ChatError(f"{self.path}: the model has no chat template (tokenizer_config.json has no "
                            "chat_template); use plain completion (generate) instead")
        ids = self.tokenizer.encode(self.chat_template.render(messages), add_special_tokens=False).ids
        self._check_prompt(ids)
        return ids

    def chat(self, messages, **sampling) -> str:
        """The assistant's reply to `messages`; sampling as for `generate`, defaults from the model's
        generation_config.json."""
        return self.generate(self.chat_prompt(messages), **{**self.generation_defaults, **sampling})

    # -- many sequences: the scheduler ---------------------------------------------------------------
    def submit(self, prompt_or_ids: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, logprobs: int | None = None, on_event=None):
        """Queue a request for the continuous-batching scheduler; returns its Request handle at once
        (iterate it for text pieces; `.result()`, `.cancel()`, token counts and timings).
        logprobs: also record each generated token's log-probability and the `logprobs` most likely
        tokens' at its position. on_event(kind, data): called on the engine thread for each text piece
        ("piece", text) and at the end ("done", finish_reason), e.g. to wake an event loop."""
        ids, params, stops = self._request(prompt_or_ids, max_new_tokens, temperature, top_k, top_p,
                                           repetition_penalty, seed, stop)
        _check_int("logprobs", logprobs, 0, 20, "", optional=True)
        return self.scheduler().submit(ids, params, max_new_tokens, stops, logprobs, on_event)

    def scheduler(self) -> Scheduler:
        """The continuous-batching scheduler, started on first use."""
        with self._scheduler_lock:  # not the model lock: a step may hold that for a while
            if self.closed:
                raise RuntimeError("the engine is closed: load the artifact again to submit requests")
            if self._scheduler is None:
                self._scheduler = Scheduler(self)
            return self._scheduler

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], **sampling) -> list[str]:
        """Every prompt's generated text, run as concurrent requests; same arguments as `submit`."""
        handles = [self.submit(p, **sampling) for p in prompts]
        return [h.result() for h in handles]

    def close(self):
        """Stop the scheduler: waiting and running requests end as cancelled; later submits are refused."""
        with self._scheduler_lock:
            self.closed = True
            scheduler = self._scheduler
        if scheduler is not None:
            scheduler.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_int(name: str, value, low: int, high: int | None, what: str, optional: bool = False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer in {low}..{high}" + (f" ({what})" if what else "") if high is not None \
            else f"an integer >= {low}"
        raise ValueError(f"invalid {name}={value!r}: must be {bound}")
