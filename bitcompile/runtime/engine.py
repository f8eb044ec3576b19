"""Run a compiled artifact: TVM runtime only (no compiler), numpy and tokenizers.

The artifact is code, so nothing is loaded before its manifest and every file hash check out and the
target matches this machine. Generation is prefill (in chunks) into a paged KV cache, then one decode
call per token.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..model.config import ModelConfig
from .artifact import (
    LIBRARY,
    PARAMS,
    TOKENIZER,
    ArtifactError,
    read_manifest,
    read_params,
    verify_files,
)
from .machine import check_runnable
from .sampling import Sampler, SamplingParams

PAGE_SIZE = 16
EMBEDDING = "embed_tokens.weight"


def import_tvm_runtime():
    """import tvm to run artifacts. tvm_ffi imports PyTorch whenever it is installed (about 200 MB of
    RSS, and a Python heap the garbage collector keeps walking) for tensor interop the runtime never
    uses; unless this process already has torch, torch is hidden while tvm loads (importable after)."""
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
    """A loaded artifact. `logits`, `generate` and `stream` are the API tools and tests rely on."""

    def __init__(self, path: str | Path, context_length: int | None = None, prefill_chunk: int = 128):
        # prefill_chunk: tokens per prefill call; 128 measured as fast as 256 on the 2B shape, with 43 MB
        # less memory for the intermediate activations
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        verify_files(self.path, self.manifest)
        target = self.manifest["target"]
        check_runnable(target["requires"], target["name"])
        self.config = ModelConfig.from_dict(self.manifest["model"])
        limit = self.config.max_position_embeddings
        if context_length is not None and not (isinstance(context_length, int) and 0 < context_length <= limit):
            raise ValueError(f"invalid context_length={context_length!r}: must be an integer in 1..{limit} (the model's limit)")
        self.context_length = context_length or limit
        self.prefill_chunk = min(prefill_chunk, self.context_length)

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
        self.tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER))
        self._kv = {name: tvm.get_global_func(f"vm.builtin.kv_state_{name}")
                    for name in ("add_sequence", "begin_forward", "end_forward", "clear")}
        shape = tvm.runtime.ShapeTuple
        self._cache = self._vm["create_kv_cache"](shape([1]), shape([self.context_length]),
                                                  shape([self.prefill_chunk]), shape([PAGE_SIZE]), shape([0]))
        self._cache_len = None

    def _on_device(self, array: np.ndarray):
        """A parameter for the VM: zero copy from the mapped file on the CPU, copied to a GPU."""
        if self.device.dlpack_device_type() == self._tvm.cpu().dlpack_device_type():
            return self._tvm.runtime.from_dlpack(array)
        return self._tvm.runtime.tensor(np.ascontiguousarray(array), self.device)

    # -- model calls -------------------------------------------------------------------------------
    def _reset(self):
        self._kv["clear"](self._cache)
        self._kv["add_sequence"](self._cache, 0)
        self._cache_len = 0

    def _embedding_rows(self, ids: Sequence[int]) -> np.ndarray:
        """The tokens' rows of the embedding table (bf16 bits [1, len, hidden]), read from the parameter
        file: mapping the table instead would fault in 64 KB around each row (see model/bitnet.py: BF16Embedding)."""
        hidden = self._table["shape"][1]
        rows = np.empty((1, len(ids), hidden), np.uint16)
        for row, token in zip(rows[0], ids):
            offset = self._table["offset"] + int(token) * hidden * 2
            if os.preadv(self._params_file.fileno(), [row], offset) != row.nbytes:
                raise ArtifactError(f"{self.path / PARAMS}: truncated embedding table; recompile the model")
        return rows

    def _run(self, fn: str, ids: Sequence[int]):
        """Append `ids` to the sequence in the cache through `fn` (prefill or decode)."""
        shape = self._tvm.runtime.ShapeTuple
        rows = self._embedding_rows(ids)
        tokens = self._one_row if len(ids) == 1 else self._tvm.runtime.empty(rows.shape, "uint16", self.device)
        tokens.copyfrom(rows)
        self._kv["begin_forward"](self._cache, shape([0]), shape([len(ids)]))
        out, self._cache = self._vm[fn](tokens, self._cache, self._params)
        self._kv["end_forward"](self._cache)
        self._cache_len += len(ids)
        return out

    def _prefill(self, ids: Sequence[int]):
        """Prefill from an empty cache; return the hidden states of each chunk."""
        self._reset()
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

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one prefill from an empty cache: float32 [len, vocab]."""
        ids = [int(t) for t in token_ids]
        self._check_prompt(ids)
        return np.concatenate([self._vm["head"](h, self._params).numpy()[0] for h in self._prefill(ids)])

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Start a sequence: logits of its last position (float32 [vocab]); `step` continues it."""
        ids = [int(t) for t in token_ids]
        self._check_prompt(ids)
        return self._last_logits(ids)

    def _last_logits(self, ids: list[int]) -> np.ndarray:
        return self._vm["head_last"](self._prefill(ids)[-1], self._params).numpy()[0, -1]

    def step(self, token: int) -> np.ndarray:
        """Append one token to the sequence started by `prefill`; logits of the next position."""
        if self._cache_len is None:
            raise RuntimeError("step() continues a sequence: call prefill() first")
        if self._cache_len + 1 > self.context_length:
            raise PromptError(f"the context of {self.context_length} tokens is full")
        return self._run("decode", [int(token)]).numpy()[0, -1]

    # -- text ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream(self, prompt_or_ids: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """Yield the generated text piece by piece (the prompt is not repeated)."""
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"invalid max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"invalid stop={stop!r}: stop strings must be non-empty strings")
        ids = self.encode(prompt_or_ids) if isinstance(prompt_or_ids, str) else [int(t) for t in prompt_or_ids]
        self._check_prompt(ids)
        return self._stream(ids, max_new_tokens, Sampler(params), stops)

    def _stream(self, ids: list[int], max_new_tokens: int, sampler: Sampler, stops: list[str]) -> Iterator[str]:
        if max_new_tokens == 0:
            return
        logits = self._last_logits(ids)  # stream() has checked the prompt already
        generated: list[int] = []
        emitted = 0
        while True:
            token = sampler(logits, ids + generated)
            if token in self.config.eos_token_ids:
                break
            generated.append(token)
            text = self.decode(generated)
            cut = _first_stop(text, stops)
            done = cut is not None or len(generated) >= max_new_tokens or self._cache_len + 1 >= self.context_length
            end = cut if cut is not None else (len(text) if done else _safe_end(text, stops))
            if end > emitted:
                yield text[emitted:end]
                emitted = end
            if done:
                break
            logits = self.step(token)

    def generate(self, prompt_or_ids: str | Sequence[int], **kwargs) -> str:
        """The generated text (without the prompt); same arguments as `stream`."""
        return "".join(self.stream(prompt_or_ids, **kwargs))


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
