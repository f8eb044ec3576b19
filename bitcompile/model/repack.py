"""Checkpoint weights -> the graph's parameters: ternary matrices repacked into the kernel layout,
q/k/v and gate/up concatenated (their per-tensor multipliers become per-row), bf16 tables as uint16 bits.

Yields one parameter at a time so peak memory stays near one layer, not one model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .checkpoint import Checkpoint, TernaryWeight
from .head import head_params
from .packing import pack_kernel


def _fused(weights: list[TernaryWeight]) -> tuple[np.ndarray, np.ndarray]:
    ternary = np.concatenate([w.ternary() for w in weights], axis=0)
    multiplier = np.concatenate([np.full(w.shape[0], w.multiplier, dtype=np.float32) for w in weights])
    return pack_kernel(ternary), multiplier


def _bits(table: np.ndarray) -> np.ndarray:
    return table.view(np.uint16)


def graph_params(ckpt: Checkpoint, head: str = "bf16") -> Iterator[tuple[str, np.ndarray]]:
    yield "embed_tokens.weight", _bits(ckpt.embed)
    for i, layer in enumerate(ckpt.layers):
        p, lin = f"layers.{i}.", layer.linears
        yield p + "input_layernorm.weight", layer.input_norm
        for name, parts in (("self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"]), ("self_attn.o_proj", ["o_proj"]),
                            ("mlp.gate_up_proj", ["gate_proj", "up_proj"]), ("mlp.down_proj", ["down_proj"])):
            packed, multiplier = _fused([lin[n] for n in parts])
            yield p + name + ".weight", packed
            yield p + name + ".multiplier", multiplier
        yield p + "self_attn.attn_sub_norm.weight", layer.attn_sub_norm
        yield p + "post_attention_layernorm.weight", layer.post_attention_norm
        yield p + "mlp.ffn_sub_norm.weight", layer.ffn_sub_norm
    yield "norm.weight", ckpt.final_norm
    if not (ckpt.config.tie_word_embeddings and head == "bf16"):
        yield from head_params(ckpt.head, head).items()
