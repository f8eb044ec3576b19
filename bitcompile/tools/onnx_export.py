"""The ONNX Runtime baseline: a BitNet b1.58 checkpoint written by hand as one ONNX decoder graph.

No exporter handles BitNet, so the graph is built with onnx.helper from the loaded checkpoint, with the
fastest CPU contrib ops of onnxruntime (see shared/docs/onnxruntime-baseline.md):

  embedding   Gather on the bf16 table (exact), Cast to f32
  RMSNorm     SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual add fused)
  ternary     com.microsoft.MatMulNBits bits=2 accuracy_level=4 (int8 activations per K-block);
              q/k/v fused into one [q+2kv, H] matrix, gate/up into one [2I, H] matrix (the scales are
              per row, so fusing is exact)
  attention   com.microsoft.GroupQueryAttention (packed QKV, do_rotary=1, rotate-half, causal, KV cache)
  FFN         Split -> Relu -> Mul(g, g) -> Mul(up) -> sub-norm -> down
  head        MatMulNBits bits=8 (int8, block 128) or bits=4 (int4, block 32) of the lm_head table
              (the embedding when tied), or a plain f32 MatMul (head="f32", the accuracy reference)

Graph interface (batch 1, dynamic lengths):
  inputs   input_ids int64 [1, seq]; attention_mask int64 [1, total] (ones; total = past + seq);
           past_key_values.{i}.key / .value f32 [1, kv_heads, past, head_dim];
           logits_to_keep int64 [1] (0 = logits at all positions; n > 0 = the last n only, e.g. 1 for prefill)
  outputs  logits f32 [1, kept, vocab]; present.{i}.key / .value f32 [1, kv_heads, total, head_dim]
The past tensors may also be max-length buffers shared with the present outputs (GroupQueryAttention
then writes the new entries in place; seqlens come from attention_mask): see baseline_ort.OrtEngine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model.checkpoint import Checkpoint, load_checkpoint

F32 = np.float32
MS = "com.microsoft"
OPSET = 21
HEAD_KINDS = ("int8", "int4", "f32")
EXTERNAL_DATA_BYTES = 1 << 28  # above this, weights go to "<name>.data" beside the model (mapped at load, faster)


class _Graph:
    """Collects nodes and initializers; every helper returns its output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs):
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0] or op_type,
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


# ---- weight packing ---------------------------------------------------------------------------------

def block_size_for(k: int, preferred: int = 128) -> int:
    """The largest power of two <= preferred (and >= 16) that divides K: MatMulNBits' block_size."""
    block = preferred
    while block >= 16 and k % block:
        block //= 2
    if block < 16:
        raise ValueError(f"K = {k} has no power-of-two block >= 16 for MatMulNBits")
    return block


def pack_nbits(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Unsigned codes uint8 [N, K] -> MatMulNBits B [N, K/block, block*bits/8]; value j of a byte at bit j*bits."""
    n, k = q.shape
    per_byte = 8 // bits
    q = q.astype(np.uint8).reshape(n, k // per_byte, per_byte)
    packed = np.zeros((n, k // per_byte), dtype=np.uint8)
    for j in range(per_byte):
        packed |= q[:, :, j] << (j * bits)
    return packed.reshape(n, k // block, block * bits // 8)


def ternary_nbits(ternary: np.ndarray, multiplier, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Ternary int8 [N, K] and per-row multipliers -> (B, scales) for MatMulNBits bits=2.

    Codes q = t + 2, so the default zero point (2) decodes exactly to t; scales [N, K/block] repeat the
    row's multiplier. MatMulNBits then computes x . (t * multiplier)."""
    n, k = ternary.shape
    scales = np.broadcast_to(np.asarray(multiplier, dtype=F32).reshape(-1, 1), (n, k // block))
    return pack_nbits(ternary.astype(np.int16) + 2, 2, block), np.ascontiguousarray(scales, dtype=F32)


def quantize_nbits(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Float [N, K] -> symmetric block quantization (B, scales) with the default zero point 2^(bits-1)."""
    n, k = table.shape
    qmax = 2 ** (bits - 1) - 1
    w = table.astype(F32).reshape(n, k // block, block)
    scales = np.maximum(np.abs(w).max(axis=-1), F32(1e-30)) / F32(qmax)
    q = np.clip(np.rint(w / scales[..., None]), -qmax, qmax).astype(np.int16) + 2 ** (bits - 1)
    return pack_nbits(q.reshape(n, k), bits, block), scales.astype(F32)


# ---- blocks -----------------------------------------------------------------------------------------

def matmul_nbits(g: _Graph, x: str, name: str, packed: np.ndarray, scales: np.ndarray, bits: int,
                 k: int, block: int) -> str:
    n = packed.shape[0]
    return g.op("MatMulNBits", [x, g.const(name + ".B", packed), g.const(name + ".scales", scales)], name,
                domain=MS, K=k, N=n, bits=bits, block_size=block, accuracy_level=4)


def ternary_linear(g: _Graph, x: str, name: str, weights) -> str:
    """One MatMulNBits bits=2 over the row-concatenation of `weights` (TernaryWeight list)."""
    ternary = np.concatenate([w.ternary() for w in weights], axis=0)
    multipliers = np.concatenate([np.full(w.shape[0], w.multiplier, dtype=F32) for w in weights])
    k = ternary.shape[1]
    block = block_size_for(k)
    packed, scales = ternary_nbits(ternary, multipliers, block)
    return matmul_nbits(g, x, name, packed, scales, 2, k, block)


def rms_norm(g: _Graph, x: str, weight: np.ndarray, name: str, eps: float, skip: str | None = None):
    """RMSNorm of x (or of x + skip, fused). Returns the normed name, and with skip also the sum's name."""
    w = g.const(name + ".weight", weight.astype(F32))
    if skip is None:
        return g.op("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=eps, stash_type=1)
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, skip, w],
                               [name, "", "", name + ".residual"], domain=MS, epsilon=eps)
    return normed, total


def attention(g: _Graph, x: str, layer, i: int, cfg, seqlens_k: str, total_len: str, cos: str, sin: str) -> str:
    p = f"layers.{i}.attn"
    lin = layer.linears
    qkv = ternary_linear(g, x, p + ".qkv_proj", [lin["q_proj"], lin["k_proj"], lin["v_proj"]])
    a = g.op("GroupQueryAttention",
             [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, cos, sin],
             [p + ".out", f"present.{i}.key", f"present.{i}.value"], domain=MS,
             num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
             scale=float(cfg.head_dim**-0.5), do_rotary=1, rotary_interleaved=0)[0]
    a = rms_norm(g, a, layer.attn_sub_norm, p + ".sub_norm", cfg.rms_norm_eps)
    return ternary_linear(g, a, p + ".o_proj", [lin["o_proj"]])


def mlp(g: _Graph, x: str, layer, i: int, cfg) -> str:
    p = f"layers.{i}.mlp"
    lin = layer.linears
    gate_up = ternary_linear(g, x, p + ".gate_up_proj", [lin["gate_proj"], lin["up_proj"]])
    size = g.const(p + ".split", np.array([cfg.intermediate_size] * 2, dtype=np.int64))
    gate, up = g.op("Split", [gate_up, size], [p + ".gate", p + ".up"], axis=-1)
    gate = g.op("Relu", [gate], p + ".relu")
    f = g.op("Mul", [g.op("Mul", [gate, gate], p + ".relu2"), up], p + ".act")
    f = rms_norm(g, f, layer.ffn_sub_norm, p + ".sub_norm", cfg.rms_norm_eps)
    return ternary_linear(g, f, p + ".down_proj", [lin["down_proj"]])


def embedding(g: _Graph, table_bf16: np.ndarray) -> str:
    """Gather rows of the checkpoint's bf16 table as is (exact, 2 bytes per weight), then widen to f32."""
    e = g.op("Gather", [g.const("embed_tokens.weight", table_bf16), "input_ids"], "embed.bf16", axis=0)
    return g.op("Cast", [e], "embed", to=TensorProto.FLOAT)


def lm_head(g: _Graph, x: str, table_bf16: np.ndarray, kind: str) -> str:
    k = table_bf16.shape[1]
    if kind == "f32":
        return g.op("MatMul", [x, g.const("lm_head.weight", table_bf16.astype(F32).T)], "logits")
    bits, block = {"int8": (8, block_size_for(k, 128)), "int4": (4, block_size_for(k, 32))}[kind]
    packed, scales = quantize_nbits(table_bf16, bits, block)
    return matmul_nbits(g, x, "logits", packed, scales, bits, k, block)


def rope_cache(cfg) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, head_dim/2] of position * theta^(-2j/head_dim), in f32 like reference.rope."""
    d = cfg.head_dim
    pos = np.arange(cfg.max_position_embeddings, dtype=F32)[:, None]
    freqs = pos / np.power(F32(cfg.rope_theta), np.arange(0, d, 2, dtype=F32) / F32(d))[None, :]
    return np.cos(freqs).astype(F32), np.sin(freqs).astype(F32)


# ---- the model --------------------------------------------------------------------------------------

def build_model(ckpt: Checkpoint, head: str = "int8") -> onnx.ModelProto:
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEAD_KINDS)}")
    cfg = ckpt.config
    g = _Graph()

    # GroupQueryAttention's lengths from the mask: seqlens_k = total - 1 (int32 [1]), total (int32 scalar)
    mask_sum = g.op("ReduceSum", ["attention_mask", g.const("axis1", np.array([1], dtype=np.int64))], "mask_sum",
                    keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, g.const("one", np.array(1, dtype=np.int64))], "seqlens64")],
                     "seqlens_k", to=TensorProto.INT32)
    total = g.op("Shape", ["attention_mask"], "total64", start=1, end=2)
    total_len = g.op("Cast", [g.op("Squeeze", [total], "total64s")], "total_len", to=TensorProto.INT32)
    cos, sin = rope_cache(cfg)
    cos, sin = g.const("cos_cache", cos), g.const("sin_cache", sin)

    h, delta = embedding(g, ckpt.embed), None  # the residual stream is h (+ delta, added by the next norm)
    for i, layer in enumerate(ckpt.layers):
        if delta is None:
            x = rms_norm(g, h, layer.input_norm, f"layers.{i}.input_norm", cfg.rms_norm_eps)
        else:
            x, h = rms_norm(g, h, layer.input_norm, f"layers.{i}.input_norm", cfg.rms_norm_eps, skip=delta)
        a = attention(g, x, layer, i, cfg, seqlens_k, total_len, cos, sin)
        x, h = rms_norm(g, h, layer.post_attention_norm, f"layers.{i}.post_norm", cfg.rms_norm_eps, skip=a)
        delta = mlp(g, x, layer, i, cfg)
    x, _ = rms_norm(g, h, ckpt.final_norm, "final_norm", cfg.rms_norm_eps, skip=delta)

    # logits_to_keep: n > 0 keeps the last n positions (prefill needs one), 0 keeps all
    start = g.op("Neg", ["logits_to_keep"], "keep_start")
    end = g.const("keep_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    x = g.op("Slice", [x, start, end, g.const("keep_axis", np.array([1], dtype=np.int64))], "kept")
    lm_head(g, x, ckpt.head, head)

    def tensor(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    kv_names = [(f"past_key_values.{i}.{t}", f"present.{i}.{t}") for i in range(cfg.num_hidden_layers)
                for t in ("key", "value")]
    n_kv, d = cfg.num_key_value_heads, cfg.head_dim
    inputs = [tensor("input_ids", TensorProto.INT64, [1, "seq"]),
              tensor("attention_mask", TensorProto.INT64, [1, "total"]),
              *[tensor(past, TensorProto.FLOAT, [1, n_kv, "past", d]) for past, _ in kv_names],
              tensor("logits_to_keep", TensorProto.INT64, [1])]
    outputs = [tensor("logits", TensorProto.FLOAT, [1, "kept", cfg.vocab_size]),
               *[tensor(present, TensorProto.FLOAT, [1, n_kv, "total", d]) for _, present in kv_names]]
    graph = helper.make_graph(g.nodes, "bitnet_b158", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name=__name__)
    model.ir_version = 10
    model.metadata_props.extend([
        onnx.StringStringEntryProto(key="num_hidden_layers", value=str(cfg.num_hidden_layers)),
        onnx.StringStringEntryProto(key="num_key_value_heads", value=str(cfg.num_key_value_heads)),
        onnx.StringStringEntryProto(key="head_dim", value=str(cfg.head_dim)),
        onnx.StringStringEntryProto(key="max_position_embeddings", value=str(cfg.max_position_embeddings)),
        onnx.StringStringEntryProto(key="head", value=head),
    ])
    return model


def export_onnx(model_dir, output, head: str = "int8") -> Path:
    """Write the checkpoint in `model_dir` as one ONNX model at `output` (weights over 256 MB go to
    `<output>.data` beside it). Returns the model path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(load_checkpoint(model_dir), head)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = output.with_name(output.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing file
        onnx.save(model, str(output), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(output))
    return output
