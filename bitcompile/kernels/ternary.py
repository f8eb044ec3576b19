"""The ternary operators of the graph, as tensor expressions (TE). Their schedules live in schedule.py.

quantize_activations: x f32 [M, K] -> x_q int8 [M, K], s f32 [M] (127 / max|x|), sum(x_q) int32 [M]
rms_norm_quantize:   (x f32 [M, K], weight f32 [K]) -> quantize_activations(rms_norm(x) * weight), one operator
ternary_matmul:      (x_q, s, sum, W packed b16x16 [N/16, K/16, 64], multiplier f32 [N]) -> y f32 [M, N]
                     y = (sum_k code * x_q - sum(x_q)) / s * multiplier, code = t + 1 in {0, 1, 2}
bf16 table ops:      embedding lookup and the tied lm_head on a bf16 table kept as uint16 bits.
lm_head variants:    f32 and bf16 tables (float), int8 rows x int8 activations (integer); see model/head.py.

Every function carries the attribute `bitcompile.op` so schedule rules find it by name, and
op_pattern = opaque so operator fusion leaves its block structure alone.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

OPAQUE = 8  # relax OpPatternKind.kOpaque

# TVM registers nearbyint without the TVectorizable attribute that round and exp carry, so its
# vectorizer gave up on the int8 quantization loop (scalar code, which LLVM then vectorized across
# the wrong loop: gathers and byte-by-byte stores, 9 us for one 6912 row). It is elementwise; on LLVM
# it becomes llvm.nearbyint (round half to even), on CUDA nearbyintf.
tvm.ir.Op.get("tirx.nearbyint").set_attr("TVectorizable", True)


def op_attrs(name: str, rows: str | None = None, row_tile: int | None = None) -> dict:
    """rows="batch": the ternary matmul of a batched decode step (one row per sequence, a few), tuned
    apart from prefill's (a prompt chunk of many rows); row_tile: what its rows are padded to, when
    that is not M_TILE (schedules tile by it: padded_row_tile)."""
    attrs = {"bitcompile.op": name, "op_pattern": OPAQUE}
    if rows:
        attrs["bitcompile.rows"] = rows
    if row_tile is not None and row_tile != M_TILE:
        attrs["bitcompile.row_tile"] = row_tile
    return attrs


def quantize_activations(x: te.Tensor):
    m, k = x.shape
    rk = te.reduce_axis((0, k), name="k")
    amax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, rk]), axis=rk), name="amax")
    scale = te.compute((m,), lambda i: tirx.const(127.0, "float32") / tirx.max(amax[i], tirx.const(1e-5, "float32")),
                       name="act_scale")
    xq = te.compute(
        (m, k),
        lambda i, j: tirx.max(tirx.min(tirx.nearbyint(x[i, j] * scale[i]), tirx.const(127.0, "float32")),
                              tirx.const(-128.0, "float32")).astype("int8"),
        name="x_q",
    )
    rs = te.reduce_axis((0, k), name="ks")
    xsum = te.compute((m,), lambda i: te.sum(xq[i, rs].astype("int32"), axis=rs), name="x_sum")
    return xq, scale, xsum


def rms_norm_quantize(x: te.Tensor, weight: te.Tensor, eps: float):
    """RMSNorm (TOPI's formula: x * rsqrt(mean(x^2) + eps) * weight) straight into the per-token int8
    quantization of the ternary linear it feeds: the normalized row is never written to memory, and a
    norm and a quantization are one kernel instead of two (on a GPU, each is a launch per layer)."""
    m, k = x.shape
    rk = te.reduce_axis((0, k), name="k")
    sum_sq = te.compute((m,), lambda i: te.sum(x[i, rk] * x[i, rk], axis=rk), name="sum_sq")
    inv_rms = te.compute((m,), lambda i: tirx.rsqrt(sum_sq[i] / k.astype("float32")
                                                    + tirx.const(eps, "float32")), name="inv_rms")
    normed = te.compute((m, k), lambda i, j: x[i, j] * inv_rms[i] * weight[j], name="normed")
    return quantize_activations(normed)


M_TILE = 8  # several rows: a dynamic row count is padded up to a multiple (CUDA's token tiles)
# CPUs pad to a multiple of 4 instead: 2-4 rows (sequences of a batched step, a small prompt chunk,
# 7 decodes + a 4-token chunk = 12) then cost 4 rows of arithmetic each, not 8 (2B-4T shapes at 4 rows:
# 40% less time a GEMM)
CPU_ROW_TILE = 4


def padded_row_tile(func) -> int:
    """The multiple a several-row kernel pads its rows to (op_attrs' row_tile, else M_TILE)."""
    attrs = func.attrs
    return int(attrs["bitcompile.row_tile"]) if attrs is not None and "bitcompile.row_tile" in attrs else M_TILE


def _pad_tokens(xq: te.Tensor, pad_tokens: bool | None, tile: int = M_TILE) -> te.Tensor:
    """Prefill and batched steps: the rows padded with zeros to whole tiles of `tile`, so schedules
    can tile them without a predicate (block "x_pad"). pad_tokens None: when the row count is
    symbolic; False: xq as it is."""
    m, k = xq.shape
    if not (pad_tokens if pad_tokens is not None else not isinstance(m, (int, tirx.IntImm))):
        return xq
    rows = (m + tile - 1) // tile * tile
    return te.compute((rows, k), lambda i, kk: tirx.if_then_else(i < m, xq[i, kk], tirx.const(0, "int8")),
                      name="x_pad")


def ternary_matmul(xq: te.Tensor, scale: te.Tensor, xsum: te.Tensor, w: te.Tensor, multiplier: te.Tensor,
                   pad_tokens: bool | None = None, row_tile: int = M_TILE):
    """pad_tokens (default: when the token count is symbolic, i.e. prefill) adds the x_pad stage,
    rows padded to a multiple of row_tile."""
    m, k = xq.shape
    n = w.shape[0] * 16
    xq = _pad_tokens(xq, pad_tokens, row_tile)
    rows = xq.shape[0]
    # codes[nb, kb, j, r*4 + kk] = code of row nb*16 + r at input kb*16 + 4j + kk: bit plane j of a block.
    # Schedules compute it per 64-byte block in registers (or inline it); it is never materialized whole.
    codes = te.compute(
        (w.shape[0], w.shape[1], 4, 64),
        lambda nb, kb, j, b: (w[nb, kb, b] >> (j * 2).astype("uint8")) & tirx.const(3, "uint8"),
        name="codes",
    )
    rk = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (rows, n),
        lambda i, j: te.sum(
            codes[j // 16, rk // 16, rk % 16 // 4, j % 16 * 4 + rk % 4].astype("int32") * xq[i, rk].astype("int32"),
            axis=rk,
        ),
        name="acc",
    )
    return te.compute(
        (m, n),
        lambda i, j: (acc[i, j] - xsum[i]).astype("float32") / scale[i] * multiplier[j],
        name="y",
    )


def bf16_to_f32(bits):
    return tirx.reinterpret("float32", bits.astype("uint32") << tirx.const(16, "uint32"))


def embedding_bf16(rows: te.Tensor):
    """The prompt's embedding rows (bf16 bit patterns, gathered from the table by the runtime) as f32."""
    return te.compute(rows.shape, lambda i, j: bf16_to_f32(rows[i, j]), name="embed")


def _head_matvec(x: te.Tensor, rows: int, weight_at):
    s, h = x.shape
    rh = te.reduce_axis((0, h), name="h")
    return te.compute((s, rows), lambda i, j: te.sum(x[i, rh] * weight_at(j, rh), axis=rh), name="logits")


def lm_head_bf16(x: te.Tensor, table: te.Tensor):
    return _head_matvec(x, table.shape[0], lambda j, h: bf16_to_f32(table[j, h]))


def lm_head_f32(x: te.Tensor, table: te.Tensor):
    return _head_matvec(x, table.shape[0], lambda j, h: table[j, h])


def lm_head_int8(xq: te.Tensor, scale: te.Tensor, xsum: te.Tensor, w: te.Tensor, row_scale: te.Tensor,
                 pad_tokens: bool | None = None):
    """Integer head: logits = (sum_h (q + 128) x_q - 128 sum(x_q)) / s * row_scale.

    w: uint8 [Vp/16, H/4, 64] (model/head.py layout), row_scale: f32 [V] (V <= Vp). pad_tokens
    (default: when the row count is symbolic, i.e. batched) pads the rows to whole tiles (x_pad)."""
    m, h = xq.shape
    vocab = row_scale.shape[0]
    xq_rows = _pad_tokens(xq, pad_tokens)
    rh = te.reduce_axis((0, h), name="h")
    acc = te.compute(
        (xq_rows.shape[0], w.shape[0] * 16),
        lambda i, v: te.sum(w[v // 16, rh // 4, v % 16 * 4 + rh % 4].astype("int32") * xq_rows[i, rh].astype("int32"),
                            axis=rh),
        name="head_acc",
    )
    return te.compute(
        (m, vocab),
        lambda i, v: (acc[i, v] - xsum[i] * 128).astype("float32") / scale[i] * row_scale[v],
        name="head_out",
    )


Q4_GROUP = 32  # inputs per scale in the 4-bit head


def lm_head_q4(xq: te.Tensor, scale: te.Tensor, w: te.Tensor, group_scale: te.Tensor, vocab: int,
               pad_tokens: bool | None = None):
    """4-bit head, groups of 32 inputs per scale: logits = sum_g gs[v, g] * sum_t (code - 8) x_q / s.

    w: uint8 [Vp/16, H/8, 64] (model/head.py q4 layout: two nibble planes of 16 rows x 4 inputs),
    group_scale: f16 [Vp/16, H/32, 16]. pad_tokens (default: when the row count is symbolic, i.e.
    batched) pads the rows to whole tiles (x_pad)."""
    m, h = xq.shape
    xq = _pad_tokens(xq, pad_tokens)
    rows = xq.shape[0]
    groups = h // Q4_GROUP
    vp = w.shape[0] * 16
    codes = te.compute((w.shape[0], w.shape[1], 2, 64),
                       lambda vb, hb, j, b: (w[vb, hb, b] >> (j * 4).astype("uint8")) & tirx.const(15, "uint8"),
                       name="codes")
    rt = te.reduce_axis((0, Q4_GROUP), name="t")
    acc = te.compute(  # [token, group, row]: a row block's 16 accumulators are contiguous
        (rows, groups, vp),
        lambda i, g, v: te.sum(
            codes[v // 16, (g * Q4_GROUP + rt) // 8, rt % 8 // 4, v % 16 * 4 + rt % 4].astype("int32")
            * xq[i, g * Q4_GROUP + rt].astype("int32"), axis=rt),
        name="group_acc",
    )
    rs = te.reduce_axis((0, Q4_GROUP), name="ts")
    gsum = te.compute((rows, groups), lambda i, g: te.sum(xq[i, g * Q4_GROUP + rs].astype("int32"), axis=rs),
                      name="group_sum")
    rg = te.reduce_axis((0, groups), name="g")
    total = te.compute(
        (rows, vp),
        lambda i, v: te.sum((acc[i, rg, v] - gsum[i, rg] * 8).astype("float32")
                            * group_scale[v // 16, rg, v % 16].astype("float32"), axis=rg),
        name="head_total",
    )
    return te.compute((m, vocab), lambda i, v: total[i, v] / scale[i], name="head_out")


def lm_head_q4_func(tokens: int | None, vocab: int, hidden: int, pad_tokens: bool | None = None) -> tirx.PrimFunc:
    """The 4-bit head alone as a PrimFunc (tokens None: symbolic, as a batched step compiles it)."""
    tokens = tirx.Var("n", "int64") if tokens is None else tokens
    xq, s = te.placeholder((tokens, hidden), "int8"), te.placeholder((tokens,), "float32")
    blocks = (vocab + 15) // 16
    w = te.placeholder((blocks, hidden // 8, 64), "uint8")
    group_scale = te.placeholder((blocks, hidden // Q4_GROUP, 16), "float16")
    logits = lm_head_q4(xq, s, w, group_scale, vocab, pad_tokens=pad_tokens)
    return te.create_prim_func([xq, s, w, group_scale, logits]).with_attrs(op_attrs("lm_head_q4"))


def lm_head_int8_func(tokens: int | None, vocab: int, hidden: int, pad_tokens: bool | None = None) -> tirx.PrimFunc:
    """The int8 head alone as a PrimFunc (tokens None: symbolic, as a batched step compiles it)."""
    tokens = tirx.Var("n", "int64") if tokens is None else tokens
    xq, s, xsum = te.placeholder((tokens, hidden), "int8"), te.placeholder((tokens,), "float32"), te.placeholder((tokens,), "int32")
    w, row_scale = te.placeholder(((vocab + 15) // 16, hidden // 4, 64), "uint8"), te.placeholder((vocab,), "float32")
    logits = lm_head_int8(xq, s, xsum, w, row_scale, pad_tokens=pad_tokens)
    return te.create_prim_func([xq, s, xsum, w, row_scale, logits]).with_attrs(op_attrs("lm_head_int8"))


def ternary_matmul_func(tokens: int | None, n: int, k: int, pad_tokens: bool | None = None,
                        rows: str | None = None, row_tile: int = M_TILE) -> tirx.PrimFunc:
    """The ternary matmul alone as a PrimFunc (tokens None: symbolic, as prefill compiles it; rows,
    row_tile: see op_attrs)."""
    tokens = tirx.Var("n", "int64") if tokens is None else tokens
    xq, s, xsum = te.placeholder((tokens, k), "int8"), te.placeholder((tokens,), "float32"), te.placeholder((tokens,), "int32")
    w, mult = te.placeholder((n // 16, k // 16, 64), "uint8"), te.placeholder((n,), "float32")
    y = ternary_matmul(xq, s, xsum, w, mult, pad_tokens=pad_tokens, row_tile=row_tile)
    return te.create_prim_func([xq, s, xsum, w, mult, y]).with_attrs(op_attrs("ternary_matmul", rows, row_tile))
