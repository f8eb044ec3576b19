"""CUDA schedules: our operators by their `bitcompile.op` attribute, everything else by dlight's GPU rules.

The ternary matmul (b16x16 layout: byte r*4 + kk of block (nb, kb) holds the 2-bit codes of row
nb*16 + r at inputs kb*16 + 4j + kk, plane j = bits 2j..2j+1). One thread owns one row of a 16-row
block and a slice of the inputs; per 64-byte block it loads its row's 4 bytes once, and per bit plane
j unpacks them into 4 codes, which `__dp4a` multiplies with 4 int8 activations:

  blockIdx.x   nb                 16 output rows
  blockIdx.y   token tile         (prefill: TOKEN_TILE tokens, the weight word is reused for all)
  threadIdx.y  r                  one row each
  threadIdx.x  kc                 K_THREADS slices of the input blocks, summed by a warp shuffle
    for kb in this thread's blocks:   word = w[nb, kb, r*4 : r*4+4]
      for j in 0..3:                  codes = (word >> 2j) & 3 (4 bytes)
        for token in tile:            acc[token] = __dp4a(codes, x_q[token, kb*16 + 4j : +4], acc[token])
  y = (acc - sum(x_q)) / s * multiplier

That nest is prefill's (tiles of 8 tokens, activations in global memory), and decode's only where K is
not a multiple of 128 (activations in shared memory). Decode is otherwise the hand-written
`decode_gemv` below: a GEMV reads each weight byte once, so all that counts is
the memory system (16-byte loads, whole 512-byte lines per warp, many bytes in flight). The float
heads (lm_head) use the rows x input-slices nest without dp4a. Nothing is left unbound: dlight's
Fallback takes what the other rules do not (VerifyMemory rejects a loop not bound to a GPU thread).
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.script import tirx as T

from .common import extent, has_blocks, op_name, register_intrin

ROWS = 16  # output rows per CUDA block: the layout's row block
K_THREADS = 8  # threads sharing one row's inputs (a power of two up to 32: their sum is a warp shuffle)
TOKEN_TILE = 8  # prefill tokens per CUDA block (ternary.M_TILE: prefill pads the tokens to it)


def _dp4a_intrin(x_scope: str):
    """acc += sum of 4 products of u8 codes (0..2, so also valid as s8) with s8 activations."""

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1, align=4, scope="local"),
             b: T.Buffer((4,), "int8", offset_factor=1, align=4, scope=x_scope),
             c: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0], a[0:4], b[0:4])
            T.writes(c[0])
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    c[0] = c[0] + T.cast(a[vk], "int32") * T.cast(b[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1, align=4, scope="local"),
             b: T.Buffer((4,), "int8", offset_factor=1, align=4, scope=x_scope),
             c: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0], a[0:4], b[0:4])
            T.writes(c[0])
            c[0] = T.call_pure_extern("int32", "__dp4a", T.reinterpret("int32", a.vload([0], "uint8x4")),
                                      T.reinterpret("int32", b.vload([0], "int8x4")), c[0])

    name = f"bitcompile_dp4a_u8s8_{x_scope}"
    register_intrin(name, desc, impl)
    return name


DP4A_SHARED_X = _dp4a_intrin("shared")
DP4A_GLOBAL_X = _dp4a_intrin("global")


def rows_by_input_slices(sch: s_tir.Schedule, block, epilogue, tokens: int = 1, k_inner=()):
    """The GEMV/GEMM nest above for a reduction block with loops (token, row, input): returns the
    per-thread partial-sum block and its loops (ko, *k_inner, token-in-tile) from the input loop down.

    The partial sums (rfactor over the K_THREADS slices) stay in registers; a warp shuffle adds them;
    `epilogue` (the elementwise consumer) runs on the sums, one thread per row."""
    i, n, k = sch.get_loops(block)
    mo, mi = sch.split(i, factors=[None, tokens])
    nb, r = sch.split(n, factors=[None, ROWS])
    ko, kc, *inner = sch.split(k, factors=[None, _input_slices(sch, k, k_inner), *k_inner])
    sch.reorder(nb, mo, r, kc, ko, *inner[:-1], mi, *inner[-1:])
    partial = sch.rfactor(kc, 0)
    nb, mo, r, kc, *rest = sch.get_loops(partial)
    for loop, thread in ((nb, "blockIdx.x"), (mo, "blockIdx.y"), (r, "threadIdx.y"), (kc, "threadIdx.x")):
        sch.bind(loop, thread)
    sch.set_scope(partial, 0, "local")
    sch.reverse_compute_at(block, mo)
    slices, *spatial = sch.get_loops(block)[2:]
    sch.reorder(*spatial, slices)  # the cross-thread reduction must be the innermost loop
    sch.bind(spatial[-1], "threadIdx.y")
    sch.bind(slices, "threadIdx.x")
    if epilogue is not None:  # else the sums are the output
        sch.set_scope(block, 0, "local")
        sch.reverse_compute_at(epilogue, mo)
        sch.bind(sch.get_loops(epilogue)[-1], "threadIdx.y")
    return partial, rest


def _input_slices(sch: s_tir.Schedule, k, k_inner) -> int:
    """K_THREADS, halved until it divides the input steps (a remainder would predicate the dp4a)."""
    steps, threads = extent(sch, k) // math.prod(k_inner), K_THREADS
    while steps % threads:
        threads //= 2
    return threads


def _threads_over(sch: s_tir.Schedule, block, threads: int = 128, lanes: int = 4):
    """A copy-like block: its loops fused, `lanes` elements per thread (a vector), threads over the rest."""
    *loops, last = sch.get_loops(block)
    last, vec = sch.split(last, factors=[None, lanes])
    fused = sch.fuse(*loops, last)
    bx, tx = sch.split(fused, factors=[None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)


def _unpack_codes(sch: s_tir.Schedule, plane_loop, word_loop):
    """Each thread loads its row's 4-byte word once per block of 16 inputs and unpacks bit plane j
    into 4 local codes (bytes widened by nvcc; no uint8 vector shifts reach TVM's codegen)."""
    codes = sch.get_sblock("codes")
    sch.compute_at(codes, plane_loop)
    sch.set_scope(codes, 0, "local")
    word = sch.cache_read(codes, 0, "local")
    sch.compute_at(word, word_loop)
    sch.vectorize(sch.get_loops(word)[-1])


def _gemv_warps(groups: int) -> int:
    """Warps splitting the input blocks of one row block: a divisor of the warp steps (no guard) from
    8 down to 4 when there is one, else 4 (the last step guarded)."""
    return next((w for w in range(8, 3, -1) if groups % w == 0), min(4, groups))


def decode_gemv(n: int, k: int):
    """y[0, row] = (sum_i x_q[i] * code[row, i] - x_sum) / scale * multiplier[row] for one token.

    A CUDA block owns one 16-row block (its K/16 x 64 bytes are contiguous); `warps` warps split its
    input blocks. Lane l of a warp loads 16 bytes with one instruction: bytes 16*(l%4)..+16 of input
    block 8*step + l//4, i.e. rows 4*(l%4)..+4 at 16 inputs, so a warp reads 512 contiguous bytes per
    step, and every step's loads are issued before any arithmetic. Per row word, bit plane j masked in
    place (int32 shift + and: 4 codes) meets activation word j in one __dp4a. The 8 lanes of a row quad
    are summed by shuffles, the warps through shared memory."""
    nb, kb = n // 16, k // 16
    groups = kb // 8
    warps = _gemv_warps(groups)
    steps = (groups + warps - 1) // warps

    @T.prim_func(s_tir=True)
    def gemv(xq: T.Buffer((1, k), "int8"), scale: T.Buffer((1,), "float32"), xsum: T.Buffer((1,), "int32"),
             w: T.Buffer((nb, kb, 64), "uint8"), multiplier: T.Buffer((n,), "float32"),
             y: T.Buffer((1, n), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        w32 = T.decl_buffer((nb * kb * 16,), "int32", data=w.data)
        x32 = T.decl_buffer((k // 4,), "int32", data=xq.data)
        for block in T.thread_binding(nb, thread="blockIdx.x"):
            for warp in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(32, thread="threadIdx.x"):
                    with T.sblock("gemv"):
                        wl = T.sblock_alloc_buffer((steps, 4), "int32", scope="local")
                        xl = T.sblock_alloc_buffer((steps, 4), "int32", scope="local")
                        acc = T.sblock_alloc_buffer((4,), "int32", scope="local")
                        red = T.sblock_alloc_buffer((warps, 16), "int32", scope="shared")
                        for s in T.unroll(steps):
                            if (s * warps + warp) * 8 + lane // 4 < kb:
                                for v in T.vectorized(4):
                                    wl[s, v] = w32[(block * kb + (s * warps + warp) * 8 + lane // 4) * 16 + lane % 4 * 4 + v]
                                for v in T.vectorized(4):
                                    xl[s, v] = x32[((s * warps + warp) * 8 + lane // 4) * 4 + v]
                            else:
                                for v in T.vectorized(4):
                                    wl[s, v] = 0
                                    xl[s, v] = 0
                        for r in T.unroll(4):
                            acc[r] = 0
                        for s in T.unroll(steps):
                            for r in T.unroll(4):
                                for j in T.unroll(4):
                                    acc[r] = T.call_pure_extern(
                                        "int32", "__dp4a", T.bitwise_and(T.shift_right(wl[s, r], j * 2), 0x03030303),
                                        xl[s, j], acc[r])
                        for r in T.unroll(4):
                            for m in T.unroll(3):
                                acc[r] = acc[r] + T.call_pure_extern("int32", "__shfl_xor_sync", T.uint32(0xFFFFFFFF),
                                                                     acc[r], 4 << m, 32)
                        if lane < 4:
                            for r in T.unroll(4):
                                red[warp, lane * 4 + r] = acc[r]
                        T.tvm_storage_sync("shared")
                        if warp == 0 and lane < 16:
                            acc[0] = 0
                            for q in T.unroll(warps):
                                acc[0] = acc[0] + red[q, lane]
                            y[0, block * 16 + lane] = (T.Cast("float32", acc[0] - xsum[0]) / scale[0]
                                                       * multiplier[block * 16 + lane])

    return gemv


def _buffers(func: tirx.PrimFunc) -> list[tuple[tuple, str]]:
    return [(tuple(int(d) if isinstance(d, tirx.IntImm) else None for d in p.shape), p.dtype) for p in func.params]


def _gemv_shape(func: tirx.PrimFunc) -> tuple[int, int] | None:
    """(n, k) when `func` is a one-token ternary matmul `decode_gemv` computes (same buffers), else None."""
    buffers = _buffers(func)
    if len(buffers) != 6 or buffers[0][0] != (1, buffers[0][0][1]) or None in buffers[3][0] + buffers[0][0]:
        return None
    n, k = buffers[3][0][0] * 16, buffers[0][0][1]
    if k % 128:  # whole 8-block warp steps
        return None
    return (n, k) if buffers == _buffers(decode_gemv(n, k)) else None


def schedule_ternary_matmul(sch: s_tir.Schedule):
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    prefill = has_blocks(sch, "x_pad")
    if prefill:  # padded activations in global memory (a 8 x K tile would not fit shared memory)
        _threads_over(sch, sch.get_sblock("x_pad"))
    partial, (ko, plane, token, kk) = rows_by_input_slices(sch, acc, y, TOKEN_TILE if prefill else 1, k_inner=(4, 4))
    if not prefill:  # the one token's activations, shared by the block's 16 rows
        x = sch.cache_read(partial, 1, "shared")
        sch.compute_at(x, sch.get_loops(partial)[1])
        _threads_over_block(sch, x)
    _unpack_codes(sch, plane, ko)
    sch.decompose_reduction(partial, ko)
    sch.tensorize(kk, DP4A_GLOBAL_X if prefill else DP4A_SHARED_X)


def _threads_over_block(sch: s_tir.Schedule, copy):
    """A cooperative copy inside a CUDA block: 4 bytes per thread, all ROWS x K_THREADS threads."""
    loop = sch.get_loops(copy)[-1]
    words, vec = sch.split(loop, factors=[None, 4])
    _, ty, tx = sch.split(words, factors=[None, ROWS, K_THREADS])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(vec)


def schedule_lm_head(sch: s_tir.Schedule):
    """Float head (bf16 or f32 table): rows x input slices, f32 partial sums."""
    logits = sch.get_sblock("logits")
    partial, (ko, token) = rows_by_input_slices(sch, logits, None)
    sch.decompose_reduction(partial, ko)


def schedule_lm_head_int8(sch: s_tir.Schedule):
    """int8 head: rows x input slices, integer partial sums (byte r*4 + kk of a block is row r, input kk)."""
    if has_blocks(sch, "x_pad"):  # several rows: padding to tiles is the CPU's business
        sch.compute_inline(sch.get_sblock("x_pad"))
    acc = sch.get_sblock("head_acc")
    partial, (ko, token) = rows_by_input_slices(sch, acc, sch.get_sblock("head_out"))
    sch.decompose_reduction(partial, ko)


def _per_thread(sch: s_tir.Schedule, loop, threads: int):
    """Split `loop` as thread index + stride; returns (stride loop, thread loop)."""
    return sch.split(loop, factors=[None, threads])


def _spatial_loop(sch: s_tir.Schedule, loops):
    """The loop that drives the (one non-unit) spatial iterator of the block under `loops`."""
    realize = sch.get(loops[-1]).body
    spatial = [value for var, value in zip(realize.block.iter_vars, realize.iter_values)
               if var.iter_type == tirx.IterVar.DataPar and isinstance(value, tirx.Var)]
    return next(loop for loop in loops if any(sch.get(loop).loop_var.same_as(v) for v in spatial))


def schedule_quantize_activations(sch: s_tir.Schedule, threads: int = 256):
    """One CUDA block per token: absmax (block reduction), scale, int8 values, their sum (block
    reduction). Thread t handles inputs t, t + threads, ... in every stage, so each reads only what it
    wrote itself (no barrier needed between the global-memory stages). rms_norm_quantize first
    reduces the row's sum of squares the same way; its 1/rms goes through shared memory like the scale,
    and the normalized value is recomputed where it is read."""
    k = sch.get(sch.get_loops(sch.get_sblock("x_q"))[-1]).extent
    while int(k) % threads:
        threads //= 2
    norm = has_blocks(sch, "sum_sq")
    if norm:
        sch.compute_inline(sch.get_sblock("normed"))
    reductions = [sch.get_sblock(name) for name in (["sum_sq"] if norm else []) + ["amax", "x_sum"]]
    partials = []
    for block in reductions:
        _, t = _per_thread(sch, sch.get_loops(block)[-1], threads)
        partials.append(sch.rfactor(t, 1))
    token = sch.get_loops(partials[0])[0]
    sch.bind(token, "blockIdx.x")
    before = [reductions[0], sch.get_sblock("inv_rms"), partials[1]] if norm else []
    for block in before + [sch.get_sblock("amax"), sch.get_sblock("act_scale"), sch.get_sblock("x_q"),
                           partials[-1], reductions[-1]]:
        sch.reverse_compute_at(block, token)
    for block in reductions[:-1]:
        sch.set_scope(block, 0, "local")
    # TVM computes the scale on thread 0 only: x_q reads it from shared memory (after a barrier), not
    # from the global output, which the other threads could read before thread 0 wrote it
    copy_out = sch.cache_write(sch.get_sblock("act_scale"), 0, "shared", consumer_blocks=[sch.get_sblock("x_q")])
    sch.reverse_compute_at(copy_out, token)
    if norm:
        sch.set_scope(sch.get_sblock("inv_rms"), 0, "shared")
    _, t = _per_thread(sch, sch.get_loops(sch.get_sblock("x_q"))[-1], threads)
    sch.bind(t, "threadIdx.x")
    for partial in partials:  # their lane loop (spatial after rfactor) outermost, one lane per thread
        _, *loops = sch.get_loops(partial)
        lane = _spatial_loop(sch, loops)
        sch.reorder(lane, *(loop for loop in loops if loop != lane))
        sch.bind(lane, "threadIdx.x")
        sch.set_scope(partial, 0, "local")
    for block in reductions:
        sch.bind(sch.get_loops(block)[1], "threadIdx.x")


class CudaRules(ScheduleRule):
    """bitcompile's operators on CUDA, by their `bitcompile.op` attribute."""

    rules = {"ternary_matmul": schedule_ternary_matmul, "lm_head": schedule_lm_head,
             "quantize_activations": schedule_quantize_activations,
             "rms_norm_quantize": schedule_quantize_activations, "lm_head_int8": schedule_lm_head_int8}

    def apply(self, func, target, tunable):
        rule = self.rules.get(op_name(func)) if isinstance(func, tirx.PrimFunc) else None
        if rule is None:
            return None
        if rule is schedule_ternary_matmul and (shape := _gemv_shape(func)) is not None:
            return s_tir.Schedule(decode_gemv(*shape).with_attr("bitcompile.op", "ternary_matmul"))
        sch = s_tir.Schedule(func)
        rule(sch)
        return sch


def cuda_schedule_pass():
    return dl.ApplyDefaultSchedule(CudaRules(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                   dl.gpu.GeneralReduction(), dl.gpu.Fallback())
