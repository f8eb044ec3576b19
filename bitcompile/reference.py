"""The BitNet b1.58 forward pass in numpy: the oracle every compiled result is tested against.

Written from the paper/transformers semantics, independent of the TVM code and of the code it checks
(it imports neither: tests/test_layout.py). float32 throughout, integer ternary dot products, the same
int8 rounding as the compiled kernels (round half to even). It reads a loaded checkpoint's arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model.checkpoint import Checkpoint

F32 = np.float32


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8: s = 127 / max|x|, x_q = clip(rint(x * s), -128, 127)."""
    s = F32(127.0) / np.maximum(np.abs(x).max(axis=-1, keepdims=True), F32(1e-5))
    return np.clip(np.rint(x * s), -128, 127).astype(np.int32), s


def bitlinear(x: np.ndarray, ternary: np.ndarray, multiplier: np.float32) -> np.ndarray:
    xq, s = quantize_activations(x)
    acc = xq @ ternary.astype(np.int32).T  # exact integer dot products
    return acc.astype(F32) / s * F32(multiplier)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    inv_rms = F32(1.0) / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + F32(eps))
    return inv_rms * x * weight


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE on x [S, heads, D]."""
    d = x.shape[-1]
    # position / theta^(2j/d), evaluated in float32 in the same order as the compiled kernel
    freqs = positions.astype(F32)[:, None] / np.power(F32(theta), np.arange(0, d, 2, dtype=F32) / F32(d))[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = np.concatenate([-x2, x1], axis=-1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [S, Hq, D], k/v [S, Hkv, D] -> [S, Hq*D]; KV head j serves query heads j*g … j*g+g-1."""
    s, hq, d = q.shape
    group = hq // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("shd,thd->hst", q, k) * F32(d**-0.5)
    scores = np.where(np.tril(np.ones((s, s), dtype=bool))[None], scores, F32(-np.inf))
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return np.einsum("hst,thd->shd", probs, v).reshape(s, hq * d)


def head_int8(table: np.ndarray):
    """int8 head: rows quantized symmetric per row (max|row| / 127), the input per token; integer dot."""
    w = table.astype(F32)
    scale = np.maximum(np.abs(w).max(axis=1), F32(1e-30)) / F32(127)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int32)

    def head(hidden):
        xq, s = quantize_activations(hidden)
        return (xq @ q.T).astype(F32) / s * scale

    return head


def head_q4(table: np.ndarray, group: int = 32):
    """4-bit head: each group of 32 inputs of a row quantized symmetric (max|w| / 7, the scale stored
    as f16); integer dot per group, then the groups' scaled sums."""
    v, h = table.shape
    w = table.astype(F32).reshape(v, h // group, group)
    scale = (np.maximum(np.abs(w).max(axis=2), F32(1e-30)) / F32(7)).astype(np.float16).astype(F32)
    q = np.clip(np.rint(w / scale[..., None]), -7, 7).astype(np.int32)

    def head(hidden):
        xq, s = quantize_activations(hidden)
        per_group = np.einsum("vgt,sgt->svg", q, xq.reshape(len(xq), h // group, group))  # exact ints
        return (per_group.astype(F32) * scale[None]).sum(axis=2, dtype=F32) / s

    return head


def output_head(table_bf16: np.ndarray, kind: str):
    """The lm_head as the compiled model computes it: hidden [S, H] -> logits [S, V]."""
    if kind == "int8":
        return head_int8(table_bf16)
    if kind == "q4":
        return head_q4(table_bf16)
    table = table_bf16.astype(F32)
    return lambda hidden: hidden @ table.T


class ReferenceModel:
    """Full-sequence forward: logits(ids) -> [len, vocab] float32."""

    def __init__(self, ckpt: Checkpoint, head: str = "bf16"):
        """`head`: the lm_head option the compiled model uses (model/head.py); "bf16" is the checkpoint's own."""
        self.cfg = ckpt.config
        self.embed = ckpt.embed.astype(F32)
        self.head = output_head(ckpt.head, head)
        self.final_norm = ckpt.final_norm
        self.layers = [
            (layer, {name: (w.ternary(), w.multiplier) for name, w in layer.linears.items()})
            for layer in ckpt.layers
        ]

    def logits(self, ids) -> np.ndarray:
        cfg = self.cfg
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.arange(len(ids))
        h = self.embed[ids]
        for layer, lin in self.layers:
            x = rms_norm(h, layer.input_norm, cfg.rms_norm_eps)
            q = bitlinear(x, *lin["q_proj"]).reshape(len(ids), cfg.num_attention_heads, cfg.head_dim)
            k = bitlinear(x, *lin["k_proj"]).reshape(len(ids), cfg.num_key_value_heads, cfg.head_dim)
            v = bitlinear(x, *lin["v_proj"]).reshape(len(ids), cfg.num_key_value_heads, cfg.head_dim)
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
            a = causal_attention(q, k, v)
            h = h + bitlinear(rms_norm(a, layer.attn_sub_norm, cfg.rms_norm_eps), *lin["o_proj"])
            x = rms_norm(h, layer.post_attention_norm, cfg.rms_norm_eps)
            g = np.maximum(bitlinear(x, *lin["gate_proj"]), 0)
            f = g * g * bitlinear(x, *lin["up_proj"])
            h = h + bitlinear(rms_norm(f, layer.ffn_sub_norm, cfg.rms_norm_eps), *lin["down_proj"])
        return self.head(rms_norm(h, self.final_norm, cfg.rms_norm_eps))

    def greedy(self, ids, steps: int) -> list[int]:
        ids = list(ids)
        for _ in range(steps):
            ids.append(int(np.argmax(self.logits(ids)[-1])))
        return ids
