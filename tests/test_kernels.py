"""Each scheduled operator, compiled alone for the host, against exact integer / numpy results."""

import re

import ml_dtypes
import numpy as np
import pytest
import tvm
from tvm import s_tir, te

from bitcompile import reference
from bitcompile.compiler.targets import host_target
from bitcompile.kernels import schedule, ternary
from bitcompile.model.packing import pack_kernel

TARGET = tvm.target.Target(host_target().tvm)


def build(tensors, rule):
    sch = s_tir.Schedule(te.create_prim_func(tensors))
    rule(sch)
    return tvm.compile(sch.mod, TARGET)


def run(lib, *arrays):
    tvm_arrays = [tvm.runtime.tensor(a) for a in arrays]
    lib(*tvm_arrays)
    return [a.numpy() for a in tvm_arrays]


def integer_kernel(op, rule, tokens, k, w_shape, cols):
    """Build op(x_q, s, sum(x_q), w, per-column scale) and return a runner (xq, w, s=1, col=1) -> y."""
    xq_t, s_t, sum_t = te.placeholder((tokens, k), "int8"), te.placeholder((tokens,), "float32"), te.placeholder((tokens,), "int32")
    w_t, col_t = te.placeholder(w_shape, "uint8"), te.placeholder((cols,), "float32")
    lib = build([xq_t, s_t, sum_t, w_t, col_t, op(xq_t, s_t, sum_t, w_t, col_t)], rule)

    def call(xq, w, s=None, col=None):
        m = len(xq)
        s = np.ones(m, np.float32) if s is None else s
        col = np.ones(cols, np.float32) if col is None else col
        return run(lib, xq, s, xq.sum(1, dtype=np.int32), w, col, np.zeros((m, cols), np.float32))[-1]

    return call


def exact_dot(xq, weights):
    """Integer x_q . W^T in int64 (|values| < 2^24: exact in float32 too)."""
    return (xq.astype(np.int64) @ weights.astype(np.int64).T).astype(np.float32)


@pytest.mark.parametrize("m, k, dynamic", [(1, 64, False), (5, 2560 // 8, False), (5, 2560 // 8, True)])
def test_quantize_activations_matches_reference_exactly(m, k, dynamic):
    """dynamic: the row count known only at run time (prefill, batched steps: rows in parallel)."""
    x = te.placeholder((tvm.tirx.Var("m", "int64") if dynamic else m, k), "float32")
    lib = build([x, *ternary.quantize_activations(x)], schedule.schedule_quantize_activations)
    xv = (np.random.default_rng(m).standard_normal((m, k)) * 3).astype(np.float32)
    xv[0, :4] = [0.5, -0.5, 1.5, 2.5]  # ties: round half to even
    _, xq, s, xsum = run(lib, xv, np.zeros((m, k), np.int8), np.zeros(m, np.float32), np.zeros(m, np.int32))
    ref_q, ref_s = reference.quantize_activations(xv)
    np.testing.assert_array_equal(xq, ref_q)
    np.testing.assert_array_equal(s, ref_s[:, 0])
    np.testing.assert_array_equal(xsum, ref_q.sum(axis=1))


@pytest.mark.parametrize("m, n, k", [(1, 48, 64), (7, 32, 160), (1, 3 * 64, 256)])
def test_ternary_matmul_integer_dot_is_exact(m, n, k):
    rng = np.random.default_rng(n + k)
    matmul = integer_kernel(ternary.ternary_matmul, schedule.schedule_ternary_matmul, m, k,
                            (n // 16, k // 16, 64), n)
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    np.testing.assert_array_equal(matmul(xq, pack_kernel(t)), exact_dot(xq, t))
    s, mult = rng.uniform(1, 50, m).astype(np.float32), rng.uniform(0.1, 2, n).astype(np.float32)
    np.testing.assert_allclose(matmul(xq, pack_kernel(t), s, mult), exact_dot(xq, t) / s[:, None] * mult, rtol=1e-6)


@pytest.mark.parametrize("m", [1, 3])
def test_bf16_lm_head_and_embedding(m):
    rng = np.random.default_rng(m)
    v, h = 100, 64
    table = rng.standard_normal((v, h)).astype(np.float32).astype(ml_dtypes.bfloat16)
    x_t, tab_t = te.placeholder((m, h), "float32"), te.placeholder((v, h), "uint16")
    head = build([x_t, tab_t, ternary.lm_head_bf16(x_t, tab_t)], schedule.schedule_lm_head)
    x = rng.standard_normal((m, h)).astype(np.float32)
    *_, logits = run(head, x, table.view(np.uint16), np.zeros((m, v), np.float32))
    np.testing.assert_allclose(logits, x @ table.astype(np.float32).T, rtol=1e-5, atol=1e-5)

    rows_t = te.placeholder((m, h), "uint16")  # the runtime gathers the rows; the graph widens them
    embed = build([rows_t, ternary.embedding_bf16(rows_t)], schedule.schedule_embedding)
    ids = rng.integers(0, v, m)
    *_, rows = run(embed, table.view(np.uint16)[ids], np.zeros((m, h), np.float32))
    np.testing.assert_array_equal(rows, table.astype(np.float32)[ids])


@pytest.mark.skipif(not __import__("bitcompile.kernels.x86", fromlist=["x"]).has_vnni(TARGET),
                    reason="host CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("m, n, k", [(1, 64, 64), (1, 128, 256), (5, 192, 160), (3, 64 * 3, 2560 // 4)])
def test_vnni_ternary_matmul_is_exact(m, n, k):
    from bitcompile.kernels.x86 import schedule_ternary_matmul_vnni
    rng = np.random.default_rng(n * k + m)
    matmul = integer_kernel(ternary.ternary_matmul, schedule_ternary_matmul_vnni, m, k, (n // 16, k // 16, 64), n)
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    np.testing.assert_array_equal(matmul(xq, pack_kernel(t)), exact_dot(xq, t))


@pytest.mark.skipif(not __import__("bitcompile.kernels.x86", fromlist=["x"]).has_vnni(TARGET),
                    reason="host CPU has no AVX-512 VNNI")
def test_vnni_decode_unpacks_with_16_bit_shifts():
    """The decode kernel's bit planes come from 16-bit lane shifts (vpsrlw), not the byte shifts LLVM
    makes of uint8 shifts (vgf2p8affineqb: on Zen 4 those bounded one thread at 31 GB/s from L3)."""
    from bitcompile.kernels.x86 import schedule_ternary_matmul_vnni

    sch = s_tir.Schedule(ternary.ternary_matmul_func(1, 256, 512))
    schedule_ternary_matmul_vnni(sch)
    asm = tvm.tirx.build(sch.mod, TARGET).inspect_source("asm")
    assert "vpdpbusd" in asm and "vpsrlw" in asm and "vgf2p8affineqb" not in asm


@pytest.mark.skipif(not __import__("bitcompile.kernels.x86", fromlist=["x"]).has_vnni(TARGET),
                    reason="host CPU has no AVX-512 VNNI")
def test_batched_int8_head_prefetches_with_its_accumulators_in_registers():
    """The several-row int8 head (8-row tile, one row block) prefetches the next task's weights into
    L2, and its loop of vpdpbusd stores no accumulator: in a "local" (workspace) buffer LLVM had to
    store all of them on every step around the prefetch (2x slower)."""
    from bitcompile.kernels.x86 import schedule_lm_head_int8_vnni

    sch = s_tir.Schedule(ternary.lm_head_int8_func(None, 1024, 512))
    schedule_lm_head_int8_vnni(sch, row_blocks=1, m_tile=8)
    asm = tvm.tirx.build(sch.mod, TARGET).inspect_source("asm")
    blocks = [block.split("\n\tj")[0] for block in re.split(r"\n\.LBB\w+:", asm)]  # label to first jump
    loops = [body for body in blocks if body.count("vpdpbusd") >= 8]
    assert loops and all("prefetcht1" in body for body in loops)
    stores = [line for body in loops for line in body.splitlines()
              if re.match(r"\s*vmov\w*\s+%zmm\d+, .*\(", line)]
    assert not stores, stores


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("m, v", [(1, 96), (1, 100), (3, 64)])
def test_int8_lm_head_is_exact_in_integers(vnni, m, v):
    from bitcompile.kernels.x86 import has_vnni, schedule_lm_head_int8_vnni
    from bitcompile.model.head import block_int8_rows, padded_vocab, quantize_int8_rows
    if vnni and not has_vnni(TARGET):
        pytest.skip("host CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(v + m)
    h = 64
    q, scale = quantize_int8_rows(rng.standard_normal((v, h)).astype(np.float32))
    head = integer_kernel(ternary.lm_head_int8, schedule_lm_head_int8_vnni if vnni else schedule.schedule_lm_head_int8,
                          m, h, (padded_vocab(v) // 16, h // 4, 64), v)
    xq = rng.integers(-128, 128, (m, h)).astype(np.int8)
    np.testing.assert_array_equal(head(xq, block_int8_rows(q)), exact_dot(xq, q))


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 16, 21, 32])
def test_prefill_matmul_with_a_dynamic_token_count_is_exact(vnni, m):
    """The prefill and batched-decode variant (symbolic token count: a prompt chunk, or one token of
    each of 2-32 sequences; padded to whole tiles inside the op)."""
    from bitcompile.kernels.x86 import has_vnni, schedule_ternary_matmul_vnni
    if vnni and not has_vnni(TARGET):
        pytest.skip("host CPU has no AVX-512 VNNI")
    n, k = 128, 96
    matmul = integer_kernel(ternary.ternary_matmul, schedule_ternary_matmul_vnni if vnni else schedule.schedule_ternary_matmul,
                            tvm.tirx.Var("m", "int64"), k, (n // 16, k // 16, 64), n)
    rng = np.random.default_rng(m)
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    np.testing.assert_array_equal(matmul(xq, pack_kernel(t)), exact_dot(xq, t))


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 13])
def test_batched_decode_matmul_padded_to_fours_is_exact(vnni, m):
    """batch_decode's variant on CPUs: rows padded to a multiple of ternary.CPU_ROW_TILE (4), which
    the schedules read from the function's attributes."""
    from bitcompile.kernels.x86 import has_vnni, schedule_ternary_matmul_vnni
    if vnni and not has_vnni(TARGET):
        pytest.skip("host CPU has no AVX-512 VNNI")
    n, k = 128, 96
    func = ternary.ternary_matmul_func(None, n, k, rows="batch", row_tile=ternary.CPU_ROW_TILE)
    assert ternary.padded_row_tile(func) == 4
    sch = s_tir.Schedule(func)
    (schedule_ternary_matmul_vnni if vnni else schedule.schedule_ternary_matmul)(sch)
    lib = tvm.compile(sch.mod, TARGET)
    rng = np.random.default_rng(m)
    t = rng.integers(-1, 2, (n, k)).astype(np.int8)
    xq = rng.integers(-128, 128, (m, k)).astype(np.int8)
    *_, y = run(lib, xq, np.ones(m, np.float32), xq.sum(1, dtype=np.int32), pack_kernel(t), np.ones(n, np.float32),
                np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(y, exact_dot(xq, t))


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("m", [2, 16, 32])
def test_int8_lm_head_with_a_dynamic_token_count_is_exact(vnni, m):
    """The head of a batched step: one row per sequence, the count known only at run time."""
    from bitcompile.kernels.x86 import has_vnni, schedule_lm_head_int8_vnni
    from bitcompile.model.head import block_int8_rows, padded_vocab, quantize_int8_rows
    if vnni and not has_vnni(TARGET):
        pytest.skip("host CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(m)
    h, v = 128, 100
    q, _ = quantize_int8_rows(rng.standard_normal((v, h)).astype(np.float32))
    head = integer_kernel(ternary.lm_head_int8, schedule_lm_head_int8_vnni if vnni else schedule.schedule_lm_head_int8,
                          tvm.tirx.Var("m", "int64"), h, (padded_vocab(v) // 16, h // 4, 64), v)
    xq = rng.integers(-128, 128, (m, h)).astype(np.int8)
    np.testing.assert_array_equal(head(xq, block_int8_rows(q)), exact_dot(xq, q))


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("m, v", [(1, 96), (1, 100), (2, 64), (16, 100), ("dynamic", 100)])
def test_q4_lm_head_matches_group_integer_sums(vnni, m, v):
    """dynamic: a batched step's head, the row count known at run time (rows padded to tiles; 2, 13
    and 16 rows)."""
    from bitcompile.kernels.x86 import has_vnni, schedule_lm_head_q4_vnni
    from bitcompile.model.head import block_q4, quantize_q4_groups
    if vnni and not has_vnni(TARGET):
        pytest.skip("host CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(v)
    h = 128
    q, gscale = quantize_q4_groups(rng.standard_normal((v, h)).astype(np.float32))
    codes, scales = block_q4(q, gscale)
    rows = tvm.tirx.Var("m", "int64") if m == "dynamic" else m
    xq_t, s_t = te.placeholder((rows, h), "int8"), te.placeholder((rows,), "float32")
    w_t, gs_t = te.placeholder(codes.shape, "uint8"), te.placeholder(scales.shape, "float16")
    lib = build([xq_t, s_t, w_t, gs_t, ternary.lm_head_q4(xq_t, s_t, w_t, gs_t, v)],
                schedule_lm_head_q4_vnni if vnni else schedule.schedule_lm_head_q4)
    for count in [2, 13, 16] if m == "dynamic" else [m]:
        xq = rng.integers(-128, 128, (count, h)).astype(np.int8)
        *_, logits = run(lib, xq, np.ones(count, np.float32), codes, scales, np.zeros((count, v), np.float32))
        per_group = np.einsum("vgt,sgt->svg", q.reshape(v, 4, 32).astype(np.int64),
                              xq.reshape(count, 4, 32).astype(np.int64))
        want = (per_group * gscale.astype(np.float64)[None]).sum(axis=2)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-3)


def test_quantization_compiles_to_vector_code():
    """The int8 rounding (nearbyint) must not stop TVM's vectorizer: the scalar fallback was then
    vectorized by LLVM across rows of 16, as gathers and one store per byte (5x slower)."""
    x, w = te.placeholder((tvm.tirx.Var("m", "int64"), 2560), "float32"), te.placeholder((2560,), "float32")
    lib = build([x, w, *ternary.rms_norm_quantize(x, w, 1e-5)], schedule.schedule_quantize_activations)
    ir = lib.mod.inspect_source("ll")
    assert "llvm.nearbyint.v16f32" in ir and "llvm.masked.gather" not in ir


@pytest.mark.parametrize("m, k", [(1, 2560), (7, 256)])
def test_rms_norm_quantize_matches_the_reference_norm_then_quantization(m, k):
    """One operator, the int8 values, scale and sum of numpy's RMSNorm followed by its quantization. The
    sum of squares is reduced in 16 lanes, not numpy's order: 1/rms may differ by an ulp, which can move
    a rare value across a rounding boundary by one step."""
    x, w = te.placeholder((m, k), "float32"), te.placeholder((k,), "float32")
    lib = build([x, w, *ternary.rms_norm_quantize(x, w, 1e-5)], schedule.schedule_quantize_activations)
    rng = np.random.default_rng(k)
    xv, wv = (rng.standard_normal((m, k)) * 3).astype(np.float32), rng.standard_normal(k).astype(np.float32)
    _, _, xq, s, xsum = run(lib, xv, wv, np.zeros((m, k), np.int8), np.zeros(m, np.float32), np.zeros(m, np.int32))
    ref_q, ref_s = reference.quantize_activations(reference.rms_norm(xv, wv, 1e-5))
    steps = np.abs(xq.astype(np.int32) - ref_q)
    assert steps.max() <= 1 and (steps > 0).mean() < 1e-3
    np.testing.assert_allclose(s, ref_s[:, 0], rtol=3e-7)
    np.testing.assert_array_equal(np.abs(xsum - ref_q.sum(axis=1)) <= steps.sum(axis=1), True)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_injective_functions_are_inlined_parallel_and_vectorized(rows):
    """The FFN's split + relu(gate)^2 * up, legalized as four blocks with intermediate tensors: one
    block after InjectiveRule, rows in parallel, 16-lane vectors; the numbers equal numpy's."""
    m = tvm.tirx.Var("m", "int64")
    x = te.placeholder((m, 1, 2 * 96), "float32")
    gate = te.compute((m, 1, 96), lambda i, j, k: x[i, j, k], name="gate")
    up = te.compute((m, 1, 96), lambda i, j, k: x[i, j, k + 96], name="up")
    relu = te.compute((m, 1, 96), lambda i, j, k: tvm.tirx.max(gate[i, j, k], tvm.tirx.const(0, "float32")), name="relu")
    out = te.compute((m, 1, 96), lambda i, j, k: relu[i, j, k] * relu[i, j, k] * up[i, j, k], name="out")
    sch = schedule.InjectiveRule().apply(te.create_prim_func([x, out]), TARGET, False)
    script = sch.mod.script()
    assert len(sch.get_child_blocks(sch.get_sblock("root"))) == 1 and "T.parallel" in script
    assert re.search(r"T\.vectorized\((T\.int64\()?16\)", script)
    data = np.random.default_rng(rows).standard_normal((rows, 1, 192)).astype(np.float32)
    (_, got) = run(tvm.compile(sch.mod, TARGET), data, np.zeros((rows, 1, 96), np.float32))
    np.testing.assert_array_equal(got, np.maximum(data[..., :96], 0) ** 2 * data[..., 96:])
