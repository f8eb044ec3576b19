"""The output head (lm_head) options: how many bytes each decoded token reads for the logits.

  bf16  the checkpoint's table as is (exact; 2 bytes per weight). Tied models share it with the embedding.
  int8  per-row absmax int8 + one f32 scale per row (1 byte per weight); the head input is quantized
        per token to int8 too, so the dot product is integer (vpdpbusd). Rows are stored blocked like
        the ternary kernel layout: uint8 [V/16, H/4, 64], byte r*4 + kk of block (vb, hb) = q + 128 of
        row vb*16 + r at input hb*4 + kk (the +128 makes them the unsigned operand; the kernel subtracts
        128 * sum(x_q)). The vocabulary is padded to a multiple of 16 with zero rows.
  q4    4-bit, one f16 scale per 32 inputs of a row (0.53 bytes per weight), integer per group.
  f32   widened table (4 bytes per weight; the accuracy reference, not for speed).

The input embedding always stays bf16 (exact): one row is read per token, and the file is mapped,
so only the rows used ever reach memory.
"""

from __future__ import annotations

import numpy as np

HEAD_KINDS = ("bf16", "int8", "q4", "f32")
ROW_CHUNK = 8192  # quantize in row chunks: the f32 copy of a 2B-shape table would be 1.3 GB


LARGE_VOCABULARY = 32000  # from here on, defaults trade a stated logit error for memory per token


def default_head(vocab_size: int) -> str:
    return "int8" if vocab_size >= LARGE_VOCABULARY else "bf16"


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


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // 16) * 16


def block_int8_rows(q: np.ndarray) -> np.ndarray:
    """int8 [V, H] -> uint8 [Vp/16, H/4, 64] (q + 128), vocabulary zero-padded to a multiple of 16."""
    v, h = q.shape
    codes = np.full((padded_vocab(v), h), 128, dtype=np.uint8)
    codes[:v] = (q.astype(np.int16) + 128).astype(np.uint8)
    return np.ascontiguousarray(codes.reshape(-1, 16, h // 4, 4).transpose(0, 2, 1, 3).reshape(-1, h // 4, 64))


def quantize_q4_groups(table: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit per group of `group` inputs: scale = max|w| / 7 (stored f16), q in [-7, 7]."""
    v, h = table.shape
    q = np.empty((v, h), dtype=np.int8)
    scale = np.empty((v, h // group), dtype=np.float16)
    for start in range(0, v, ROW_CHUNK):
        rows = table[start : start + ROW_CHUNK].astype(np.float32).reshape(-1, h // group, group)
        s = (np.maximum(np.abs(rows).max(axis=2), np.float32(1e-30)) / np.float32(7)).astype(np.float16)
        q[start : start + ROW_CHUNK] = np.clip(np.rint(rows / s.astype(np.float32)[..., None]), -7, 7).reshape(-1, h)
        scale[start : start + ROW_CHUNK] = s
    return q, scale


def block_q4(q: np.ndarray, scale: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """-> codes uint8 [Vp/16, H/8, 64] (byte r*4+kk of block (vb, hb): row vb*16+r, low nibble input
    hb*8+kk, high nibble hb*8+4+kk; code = q + 8) and scales f16 [Vp/16, H/group, 16]; rows padded."""
    v, h = q.shape
    vp = padded_vocab(v)
    codes = np.full((vp, h), 8, dtype=np.uint8)
    codes[:v] = (q.astype(np.int16) + 8).astype(np.uint8)
    c = codes.reshape(vp // 16, 16, h // 8, 2, 4).transpose(0, 2, 1, 4, 3)  # [vb, hb, r, kk, plane]
    packed = (c[..., 0] | c[..., 1] << 4).reshape(vp // 16, h // 8, 64)
    s = np.zeros((vp, h // group), dtype=np.float16)
    s[:v] = scale
    return np.ascontiguousarray(packed), np.ascontiguousarray(s.reshape(vp // 16, 16, -1).transpose(0, 2, 1))


def head_params(table_bf16: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """The graph parameters of a separate lm_head module of this kind."""
    if kind == "int8":
        q, scale = quantize_int8_rows(table_bf16)
        return {"lm_head.weight": block_int8_rows(q), "lm_head.scale": scale}
    if kind == "q4":
        codes, scales = block_q4(*quantize_q4_groups(table_bf16))
        return {"lm_head.weight": codes, "lm_head.scale": scales}
    if kind == "f32":
        return {"lm_head.weight": table_bf16.astype(np.float32)}
    return {"lm_head.weight": table_bf16.view(np.uint16)}
