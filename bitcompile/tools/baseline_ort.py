"""Run the ONNX Runtime baseline (onnx_export.py) with a KV cache: the engine benchmarks compare against.

The KV cache is one max-length buffer per layer and tensor, bound through IOBinding as both the past
input and the present output of GroupQueryAttention, which then appends the new entries in place (the
attention_mask length tells it how many are valid). Nothing is copied between calls, as in
onnxruntime-genai's past_present_share_buffer mode. `share_buffer=False` instead feeds the growing present
tensors back as the next past (plain session.run; every step copies the whole cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort


class OrtEngine:
    def __init__(self, path: str | Path, threads: int = 1, context_length: int | None = None,
                 share_buffer: bool = True):
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.num_layers = int(meta["num_hidden_layers"])
        self.kv_shape = (1, int(meta["num_key_value_heads"]), 0, int(meta["head_dim"]))
        limit = int(meta["max_position_embeddings"])
        if context_length is not None and not 0 < context_length <= limit:
            raise ValueError(f"context_length={context_length} must be in 1..{limit} (the model's limit)")
        self.context_length = context_length or limit
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        self.share_buffer = share_buffer
        self.kv_names = [(f"past_key_values.{i}.{t}", f"present.{i}.{t}")
                         for i in range(self.num_layers) for t in ("key", "value")]
        if share_buffer:
            n, d = self.kv_shape[1], self.kv_shape[3]
            self._binding = self.session.io_binding()  # bound once: each call rebinds only the small inputs
            self._binding.bind_output("logits")  # first: get_outputs() follows the binding order
            for past, present in self.kv_names:
                buf = ort.OrtValue.ortvalue_from_shape_and_type([1, n, self.context_length, d], np.float32)
                self._binding.bind_ortvalue_input(past, buf)
                self._binding.bind_ortvalue_output(present, buf)
        self.reset()

    def reset(self):
        """Forget the sequence: the next call starts from an empty cache."""
        self.length = 0
        if not self.share_buffer:
            self._past = [np.zeros(self.kv_shape, dtype=np.float32) for _ in self.kv_names]

    def _forward(self, ids: Sequence[int], keep: int) -> np.ndarray:
        """Append `ids` to the cached sequence; logits [keep or len(ids), vocab] of its last positions."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        total = self.length + ids.shape[1]
        if ids.shape[1] == 0:
            raise ValueError("no tokens given")
        if total > self.context_length:
            raise ValueError(f"{total} tokens exceed the context length {self.context_length}")
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64),
                 "logits_to_keep": np.array([keep], dtype=np.int64)}
        if self.share_buffer:
            for name, value in feeds.items():
                self._binding.bind_cpu_input(name, value)
            self._binding.bind_output("logits")  # unallocated again: its shape changes between calls
            self.session.run_with_iobinding(self._binding)
            logits = self._binding.get_outputs()[0].numpy()
        else:
            feeds |= {past: value for (past, _), value in zip(self.kv_names, self._past)}
            logits, *self._past = self.session.run(None, feeds)
        self.length = total
        return logits[0]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of one prefill from an empty cache: float32 [len, vocab]."""
        self.reset()
        return self._forward(ids, keep=0)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Start a new sequence with `ids`; logits of its last position [vocab]."""
        self.reset()
        return self._forward(ids, keep=1)[-1]

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the sequence; its logits [vocab]."""
        return self._forward([int(token)], keep=1)[-1]

    def greedy(self, ids: Sequence[int], steps: int) -> list[int]:
        ids = list(ids)
        logits = self.prefill(ids)
        for step in range(steps):
            ids.append(int(np.argmax(logits)))
            if step + 1 < steps:
                logits = self.decode(ids[-1])
        return ids
