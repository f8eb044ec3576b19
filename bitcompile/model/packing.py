"""Ternary weight layouts: the Hugging Face 2-bit packing, and the blocked layout our kernels read.

Hugging Face (what checkpoints hold): uint8 [N/4, K], code = t + 1 in {0, 1, 2}; packed row r,
bits 2i..2i+1 hold original row i*(N/4) + r.

Kernel layout "b16x16" (what artifacts hold): uint8 [N/16, K/16, 64]. One 64-byte block covers 16
output rows x 16 inputs. Byte r*4 + kk of block (nb, kb) holds the codes of row nb*16 + r at
inputs kb*16 + 4*j + kk in bits 2j..2j+1 (j = 0..3). Unpacking bit-pair j of all 64 bytes gives
16 rows x 4 consecutive inputs: exactly the operand shape of x86 vpdpbusd (16 lanes x 4 bytes) and
of ARM sdot (4 lanes x 4 bytes, four times), so the integer dot product needs no shuffles.
Codes stay unsigned (t + 1); the kernel subtracts sum(x_q) once per token: sum((t+1)*x) - sum(x).
"""

from __future__ import annotations

import numpy as np

BLOCK_ROWS = 16
BLOCK_COLS = 16
KERNEL_LAYOUT = "b16x16"


def unpack_hf(packed: np.ndarray) -> np.ndarray:
    """HF uint8 [N/4, K] -> int8 ternary [N, K]."""
    parts = [((packed >> (2 * i)) & 3).astype(np.int8) - 1 for i in range(4)]
    return np.concatenate(parts, axis=0)


def pack_hf(ternary: np.ndarray) -> np.ndarray:
    """int8 ternary [N, K] -> HF uint8 [N/4, K]."""
    n = ternary.shape[0]
    if n % 4:
        raise ValueError(f"output dimension {n} is not a multiple of 4")
    codes = (ternary.astype(np.int16) + 1).astype(np.uint8).reshape(4, n // 4, -1)
    return (codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6).astype(np.uint8)


def pack_kernel(ternary: np.ndarray) -> np.ndarray:
    """int8 ternary [N, K] -> kernel layout uint8 [N/16, K/16, 64]."""
    n, k = ternary.shape
    if n % BLOCK_ROWS or k % BLOCK_COLS:
        raise ValueError(f"ternary matrix {n}x{k}: both dimensions must be multiples of 16")
    codes = (ternary.astype(np.int16) + 1).astype(np.uint8)
    # [nb, r, kb, j, kk] -> [nb, kb, r, kk, j]
    c = codes.reshape(n // 16, 16, k // 16, 4, 4).transpose(0, 2, 1, 4, 3)
    packed = c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6
    return np.ascontiguousarray(packed.reshape(n // 16, k // 16, 64), dtype=np.uint8)


def unpack_kernel(packed: np.ndarray) -> np.ndarray:
    """kernel layout uint8 [N/16, K/16, 64] -> int8 ternary [N, K]."""
    nb, kb, _ = packed.shape
    c = np.stack([(packed >> (2 * j)) & 3 for j in range(4)], axis=-1)  # [nb, kb, 64, j]
    c = c.reshape(nb, kb, 16, 4, 4).transpose(0, 2, 1, 4, 3)  # [nb, r, kb, j, kk]
    return (c.reshape(nb * 16, kb * 16).astype(np.int8) - 1).astype(np.int8)


def ternarize(weight: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Online quantization of float master weights: absmean scale, T = clip(round(W/scale), -1, 1)."""
    w = weight.astype(np.float32)
    scale = np.float32(max(np.abs(w).mean(dtype=np.float32), 1e-5))
    return np.clip(np.rint(w / scale), -1, 1).astype(np.int8), scale
