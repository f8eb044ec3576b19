"""The output head (lm_head) options: how many bytes each decoded token reads for the logits.

  bf16  the checkpoint's table as is (exact; 2 bytes per weight). Tied models share it with the embedding.
  int8  per-row absmax int8 + one f32 scale per row (1 byte per weight).
  f32   widened table (4 bytes per weight; the accuracy reference, not for speed).

The input embedding always stays bf16 (exact): one row is read per token, and the file is mapped,
so only the rows used ever reach memory.
"""

from __future__ import annotations

import numpy as np

HEAD_KINDS = ("bf16", "int8", "f32")
ROW_CHUNK = 8192  # quantize in row chunks: the f32 copy of a 2B-shape table would be 1.3 GB


def default_head(vocab_size: int) -> str:
    return "int8" if vocab_size >= 32000 else "bf16"


def check_head(kind: str) -> str:
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    return kind


def quantize_int8_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: scale = max|row| / 127, q = rint(row / scale)."""
    q = np.empty(table.shape, dtype=np.int8)
    scale = np.empty(table.shape[0], dtype=np.float32)
    for start in range(0, table.shape[0], ROW_CHUNK):
        rows = table[start : start + ROW_CHUNK].astype(np.float32)
        s = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-30)) / np.float32(127)
        q[start : start + ROW_CHUNK] = np.clip(np.rint(rows / s[:, None]), -127, 127)
        scale[start : start + ROW_CHUNK] = s
    return q, scale


def head_params(table_bf16: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """The graph parameters of a separate lm_head module of this kind."""
    if kind == "int8":
        q, scale = quantize_int8_rows(table_bf16)
        return {"lm_head.weight": q, "lm_head.scale": scale}
    if kind == "f32":
        return {"lm_head.weight": table_bf16.astype(np.float32)}
    return {"lm_head.weight": table_bf16.view(np.uint16)}


def dequantized_head(table_bf16: np.ndarray, kind: str) -> np.ndarray:
    """The f32 matrix the compiled head effectively multiplies by (for the reference model)."""
    if kind == "int8":
        q, scale = quantize_int8_rows(table_bf16)
        return q.astype(np.float32) * scale[:, None]
    return table_bf16.astype(np.float32)
