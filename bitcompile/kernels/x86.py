"""x86 schedules for the ternary matmul: AVX-512 VNNI (`vpdpbusd`) on the b16x16 layout.

One bit plane of a 64-byte weight block is 16 rows x 4 inputs of unsigned codes (t + 1): exactly the
u8 operand of vpdpbusd; the int8 activations of those 4 inputs, broadcast to 16 lanes, are the s8
operand. LLVM never forms vpdpbusd on its own (and TVM's own VNNI intrinsic is broken under LLVM 22,
whose vpdpbusd.512 takes <64 x i8> operands), so the inner 16x4 block is tensorized with ours.

Decode loop nest:
  parallel nbo (groups of `row_blocks` x 16 output rows)
    kb (16 inputs)                            <- unrolled `k_unroll` times
      nbi (row_blocks independent int32x16 accumulators, unrolled)
        one 64-byte block, all 4 bit planes (VNNI_PLANES_16x16):
          plane j = (w >> 2j) & 0x03 per byte, shifted as 16-bit lanes (vpsrlw: LLVM shifts bytes with
          vgf2p8affineqb, and on Zen 4 those three per block, not the loads, bounded one thread at
          31 GB/s; with vpsrlw it reaches 39 GB/s from L3)
          acc[nbi] = vpdpbusd(acc[nbi], plane j, broadcast(x_q[kb*16 + 4j : +4]))   j = 0..3
    y = (acc - sum(x_q)) / s * multiplier     (16 lanes at a time)

Prefill and batched steps (several rows: tokens of a prompt, or one token of each sequence) use one
intrinsic per 64-byte block and tile of `m_tile` rows (rows_intrin): the 4 bit planes are
unpacked once into registers and fed to every row of the tile, and the block 1 KB ahead is
prefetched. With 8 rows the kernel is compute-bound, and without the prefetch its loads of cold
weights stalled it (2B shapes at 8 rows, 2 threads, weights flushed from the caches: 336 -> 385-420
GMAC/s; one core's vpdpbusd peak here is 232).
"""

from __future__ import annotations

import functools

from tvm import s_tir
from tvm.script import tirx as T
from tvm.target import codegen

from .common import (Template, has_blocks, knob_value, register_intrin, rows_in_parallel, scale_logits,
                     vectorize_lanes)
from .ternary import M_TILE, padded_row_tile

VNNI_16x4 = "bitcompile_vnni_u8s8_16x4"


def _vpdpbusd(acc, codes, b, *index):
    """acc (int32x16) += per lane, 4 u8 `codes` (int8x64 bits) times the 4 int8 b[index : index+4]
    (index: one offset, or a row and an offset)."""
    x4 = T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", b.vload(list(index), "int8x4")), 16))
    return T.call_llvm_pure_intrin("int32x16", T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                   acc, codes, x4)


@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    a: T.Buffer((64,), "uint8", offset_factor=1, scope="local"),
    b: T.Buffer((4,), "int8", offset_factor=1),
    c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:16], a[0:64], b[0:4])
        T.writes(c[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vi * 4 + vk], "int32") * T.cast(b[vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    a: T.Buffer((64,), "uint8", offset_factor=1, scope="local"),
    b: T.Buffer((4,), "int8", offset_factor=1),
    c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:16], a[0:64], b[0:4])
        T.writes(c[0:16])
        c[T.ramp(T.int32(0), 1, 16)] = _vpdpbusd(c.vload([0], "int32x16"),
                                                 T.reinterpret("int8x64", a.vload([0], "uint8x64")), b, 0)


VNNI_PLANES_16x16 = "bitcompile_vnni_u2s8_16x16"


@T.prim_func(s_tir=True)
def _planes_16x16_desc(
    a: T.Buffer((64,), "uint8", offset_factor=1),
    b: T.Buffer((16,), "int8", offset_factor=1),
    c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:16], a[0:64], b[0:16])
        T.writes(c[0:16])
        for r, k in T.grid(16, 16):
            with T.sblock("update"):
                vr, vk = T.axis.remap("SR", [r, k])
                c[vr] = c[vr] + T.Cast("int32", T.bitwise_and(T.shift_right(a[vr * 4 + vk % 4], T.Cast(
                    "uint8", vk // 4 * 2)), T.uint8(3))) * T.Cast("int32", b[vk])


def _plane(a, j: int):
    """Bit plane j of a 64-byte block as vpdpbusd's u8 operand: 16-bit lane shifts, then a byte mask."""
    w16 = T.reinterpret("uint16x32", a.vload([0], "uint8x64"))
    if j:
        w16 = T.shift_right(w16, T.broadcast(T.uint16(2 * j), 32))
    return T.reinterpret("int8x64", T.bitwise_and(w16, T.broadcast(T.uint16(0x0303), 32)))


def _vpdpbusd_plane(acc, a, b, j: int):
    return _vpdpbusd(acc, _plane(a, j), b, 4 * j)


@T.prim_func(s_tir=True)
def _planes_16x16_vnni(
    a: T.Buffer((64,), "uint8", offset_factor=1),
    b: T.Buffer((16,), "int8", offset_factor=1),
    c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:16], a[0:64], b[0:16])
        T.writes(c[0:16])
        acc = c.vload([0], "int32x16")
        c[T.ramp(T.int32(0), 1, 16)] = _vpdpbusd_plane(_vpdpbusd_plane(_vpdpbusd_plane(_vpdpbusd_plane(
            acc, a, b, 0), a, b, 1), a, b, 2), a, b, 3)


register_intrin(VNNI_16x4, _dot_16x4_desc, _dot_16x4_vnni)
register_intrin(VNNI_PLANES_16x16, _planes_16x16_desc, _planes_16x16_vnni)


# What each weight block of the rows kernels prefetches (their `prefetch` knob): nothing; the block
# PREFETCH_BYTES further in its row block, into every cache level; or the block at the same offset in the
# next task's weights, into L2, so that DRAM streams the next task while this one computes (2B shapes,
# 16 rows, with the accumulators on the stack: 90 -> 97% of the vpdpbusd peak).
PREFETCH_NONE, PREFETCH_AHEAD, PREFETCH_NEXT_TASK = 0, 1, 2
PREFETCH_BYTES = 1024
# TVM keeps a "global" allocation under 1 KB as a stack alloca; bigger ones, and "local" ones of any size,
# become TVMBackendAllocWorkspace pointers, which LLVM cannot tell apart from the weights' pointer. With
# a prefetch in the loop it then stores every accumulator on every step, in case the prefetch reads it
# (the 16-row int8 head: 2x slower). Accumulators on the stack stay in registers.
STACK_ALLOCA_BYTES = 1024


def on_stack(m_tile: int, row_blocks: int) -> bool:
    """Whether a tile's int32x16 accumulators (m_tile rows x row_blocks blocks) fit the stack."""
    return m_tile * row_blocks * 64 < STACK_ALLOCA_BYTES


def _tile_accumulators(sch: s_tir.Schedule, acc, loop, m_tile: int, row_blocks: int):
    """The tile's accumulators for `acc`, written back at `loop`: on the stack where they fit
    (on_stack), else in TVM's "local" workspace. Returns the writeback block and the scope."""
    scope = "global" if on_stack(m_tile, row_blocks) else "local"
    writeback = sch.cache_write(acc, 0, scope)
    sch.reverse_compute_at(writeback, loop)
    return writeback, scope


M_TILES = (4, 8)  # rows per register tile (ternary.M_TILE, the padding, is a multiple of each)


@functools.cache
def rows_intrin(m_tile: int, prefetch: int = 0, planes: bool = True, locality: int = 3,
                acc_scope: str = "local") -> str:
    """One 64-byte weight block for a tile of `m_tile` rows: c[m] += block . b[m] for each row m.
    planes: the ternary layout's block (VNNI_PLANES_16x16: 4 bit planes of 16 rows x 16 inputs),
    unpacked once for the whole tile; else the int8 head's (VNNI_16x4: 16 rows x 4 inputs, already
    vpdpbusd's u8 operand), loaded once into a register for every row. With `prefetch` (bytes), the
    weights that far ahead are prefetched, into the cache levels `locality` names (3: all, 2: L2
    and beyond). acc_scope: the accumulators' buffer ("global" on the stack: see STACK_ALLOCA_BYTES).
    Registered on first use (once per process)."""
    inputs = 16 if planes else 4
    name = (f"bitcompile_vnni_{'u2' if planes else 'u8'}s8_16x{inputs}_rows{m_tile}_pf{prefetch}"
            + (f"_l{locality}" if locality != 3 else "") + (f"_{acc_scope}" if acc_scope != "local" else ""))

    def code(a, r, k):
        """The u8 operand's value for row r and input k of the block."""
        if planes:
            return T.bitwise_and(T.shift_right(a[r * 4 + k % 4], T.Cast("uint8", k // 4 * 2)), T.uint8(3))
        return a[r * 4 + k]

    @T.prim_func(s_tir=True)
    def desc(a_h: T.handle, b_h: T.handle, c_h: T.handle) -> None:
        sb, sc = T.int64(), T.int64()
        a = T.match_buffer(a_h, (64,), "uint8", offset_factor=1)
        b = T.match_buffer(b_h, (m_tile, inputs), "int8", offset_factor=1, strides=[sb, 1])
        c = T.match_buffer(c_h, (m_tile, 16), "int32", offset_factor=1, scope=acc_scope, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(c[0:m_tile, 0:16], a[0:64], b[0:m_tile, 0:inputs])
            T.writes(c[0:m_tile, 0:16])
            for m, r, k in T.grid(m_tile, 16, inputs):
                with T.sblock("update"):
                    vm, vr, vk = T.axis.remap("SSR", [m, r, k])
                    c[vm, vr] = c[vm, vr] + T.Cast("int32", code(a, vr, vk)) * T.Cast("int32", b[vm, vk])

    def row(c, operands, b, m):
        acc = c.vload([m, 0], "int32x16")
        for j, operand in enumerate(operands):
            acc = _vpdpbusd(acc, operand, b, m, 4 * j)
        return acc

    def operands(a):
        """The block as vpdpbusd's u8 operands: its 4 bit planes, or itself."""
        return [_plane(a, j) for j in range(4)] if planes else [T.reinterpret("int8x64", a.vload([0], "uint8x64"))]

    @T.prim_func(s_tir=True)
    def impl(a_h: T.handle, b_h: T.handle, c_h: T.handle) -> None:
        sb, sc = T.int64(), T.int64()
        a = T.match_buffer(a_h, (64,), "uint8", offset_factor=1)
        b = T.match_buffer(b_h, (m_tile, inputs), "int8", offset_factor=1, strides=[sb, 1])
        c = T.match_buffer(c_h, (m_tile, 16), "int32", offset_factor=1, scope=acc_scope, strides=[sc, 1])
        with T.sblock("root"):
            T.reads(c[0:m_tile, 0:16], a[0:64], b[0:m_tile, 0:inputs])
            T.writes(c[0:m_tile, 0:16])
            if prefetch > 0:  # (read, locality, data)
                T.evaluate(T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id("llvm.prefetch"),
                                              a.access_ptr("r", offset=prefetch), 0, locality, 1))
            for m in T.unroll(m_tile):
                c[m, T.ramp(T.int64(0), 1, 16)] = row(c, operands(a), b, m)

    register_intrin(name, desc, impl)
    return name


def has_vnni(target) -> bool:
    return target.kind.name == "llvm" and bool(codegen.llvm_cpu_has_features(["avx512vnni", "avx512bw"], target))


def row_blocks_for(sch: s_tir.Schedule, loop, preferred: int = 4) -> int:
    """Independent accumulators per task: the largest of preferred, /2, … that divides the 16-row blocks
    (a remainder would put a predicate on the tensorized block)."""
    blocks = int(sch.get(loop).extent) // 16
    g = preferred
    while blocks % g:
        g //= 2
    return g


# Measured on Zen 4, 2 threads (2B-shape matrices): decode streams weights best with 8 independent
# accumulators per task; prefill (tiles of 8 tokens) with 2 row blocks, i.e. 16 accumulators, all in
# registers (8 x 4 spilled to L1 and ran at 2/3 of the speed). Tuning records (compiler/tune.py) override these.
DECODE_ROW_BLOCKS = 8
PREFILL_ROW_BLOCKS = 2  # the sdot nest's (arm.py) prefill; x86's rows intrinsic below takes 1
# Several rows on x86 (2B shapes, 16 and 128 rows, weights streamed): a tile of 4 rows with 2 row
# blocks, i.e. 8 accumulators on the stack, prefetching the next task's weights: 436-458 GMAC/s at 128
# rows, 5% above 8 x 1 with the 1 KB prefetch. By the padding of the rows (ternary.CPU_ROW_TILE: batched steps):
ROWS_DEFAULTS = {8: {"m_tile": 4, "row_blocks": 2, "k_unroll": 1, "prefetch": PREFETCH_NEXT_TASK},
                 4: {"m_tile": 4, "row_blocks": 2, "k_unroll": 1, "prefetch": PREFETCH_NEXT_TASK}}


def schedule_ternary_matmul_vnni(sch: s_tir.Schedule, row_blocks=None, k_unroll=1, intrin: str = VNNI_16x4,
                                 m_tile=None, prefetch=None):
    """Decode (one token) or prefill (tokens padded to M_TILE: see ternary.py) on VNNI.

    Knobs (ints, or a tuner's sampled variables): `row_blocks` independent 16-row accumulators per task,
    `k_unroll` blocks of 16 inputs per unrolled step; for several rows on x86 also `m_tile` rows per
    register tile and `prefetch` (PREFETCH_NONE, _AHEAD or _NEXT_TASK). `intrin`: any TensorIntrin with
    _dot_16x4_desc's description (schedule_arm's sdot uses this nest)."""
    acc = sch.get_sblock("acc")
    prefill = has_blocks(sch, "x_pad")
    if prefill and intrin == VNNI_16x4:
        knobs = {"row_blocks": row_blocks, "k_unroll": k_unroll, "m_tile": m_tile, "prefetch": prefetch}
        defaults = ROWS_DEFAULTS[padded_row_tile(sch.mod["main"])]
        return _schedule_rows(sch, **{k: defaults[k] if v is None else v for k, v in knobs.items()})
    if row_blocks is None:
        preferred = PREFILL_ROW_BLOCKS if prefill else DECODE_ROW_BLOCKS
        row_blocks = row_blocks_for(sch, sch.get_loops(acc)[1], preferred)
    if prefill:
        return _schedule_prefill(sch, row_blocks, k_unroll, intrin)
    if intrin == VNNI_16x4:
        return _schedule_decode_planes(sch, row_blocks, k_unroll)
    y, codes = sch.get_sblock("y"), sch.get_sblock("codes")
    i, n, k = sch.get_loops(acc)
    nbo, nbi, r = sch.split(n, factors=[None, row_blocks, 16])
    kbo, kbi, j, kk = sch.split(k, factors=[None, k_unroll, 4, 4])
    sch.reorder(nbo, i, kbo, kbi, j, nbi, r, kk)
    sch.parallel(nbo)
    writeback = sch.cache_write(acc, 0, "local")  # acc now accumulates in registers; this copies them out
    sch.reverse_compute_at(writeback, i)
    sch.reverse_compute_inline(y)  # y = (acc - sum) / s * multiplier straight from the accumulators
    _unpack_in_registers(sch, codes, nbi)
    sch.decompose_reduction(acc, kbo)
    sch.tensorize(r, intrin)
    for loop in (nbi, j, kbi):
        sch.unroll(loop)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])


def _schedule_decode_planes(sch: s_tir.Schedule, row_blocks, k_unroll):
    """Decode on x86: the unpacking moves into the intrinsic (VNNI_PLANES_16x16), one per block."""
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    i, n, k = sch.get_loops(acc)
    nbo, nbi, r = sch.split(n, factors=[None, row_blocks, 16])
    kbo, kbi, kk = sch.split(k, factors=[None, k_unroll, 16])
    sch.reorder(nbo, i, kbo, kbi, nbi, r, kk)
    sch.parallel(nbo)
    writeback = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(writeback, i)
    sch.reverse_compute_inline(y)
    sch.compute_inline(sch.get_sblock("codes"))
    sch.decompose_reduction(acc, kbo)
    sch.tensorize(r, VNNI_PLANES_16x16)
    sch.unroll(nbi)
    sch.unroll(kbi)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])


def ternary_space(decode_row_blocks=(1, 2, 4, 8, 16), prefill_row_blocks=(1, 2, 4), rows_knobs=False):
    """The knob space of the ternary loop nest for one kernel: candidates that divide its extents
    (a remainder would put a predicate on the tensorized block). Prefill keeps M_TILE tokens of
    accumulators per row block, so it gets fewer row blocks before the registers run out.
    rows_knobs: prefill also chooses m_tile and prefetch (x86's rows intrinsic)."""

    def space(sch: s_tir.Schedule) -> dict:
        _, n, k = sch.get_loops(sch.get_sblock("acc"))
        row_blocks, k_blocks = int(sch.get(n).extent) // 16, int(sch.get(k).extent) // 16
        prefill = has_blocks(sch, "x_pad")
        knobs = {
            "row_blocks": [d for d in (prefill_row_blocks if prefill else decode_row_blocks) if row_blocks % d == 0],
            "k_unroll": [d for d in ((1, 2) if prefill else (1, 2, 4)) if k_blocks % d == 0],
        }
        if prefill and rows_knobs:  # tiles of rows that divide the padding
            tile = padded_row_tile(sch.mod["main"])
            knobs.update(m_tile=[t for t in M_TILES if tile % t == 0],
                         prefetch=[PREFETCH_NONE, PREFETCH_AHEAD, PREFETCH_NEXT_TASK])
        return knobs

    return space


def _schedule_rows(sch: s_tir.Schedule, row_blocks, k_unroll, m_tile, prefetch):
    """Several rows on x86: per task a row-block group streams its weights once; each 64-byte block
    goes through rows_intrin for every tile of m_tile rows. The tile's accumulators are on the stack
    where they fit (on_stack), else a prefetch would cost a store of each of them every step."""
    acc, y, pad = (sch.get_sblock(b) for b in ("acc", "y", "x_pad"))
    i, n, k = sch.get_loops(acc)
    tile, blocks, fetch = (knob_value(sch, knob) for knob in (m_tile, row_blocks, prefetch))
    task_bytes = blocks * int(sch.get(k).extent) // 16 * 64  # one task's weights: row blocks x inputs / 16 x 64 B
    mo, mi = sch.split(i, factors=[None, tile])
    nbo, nbi, r = sch.split(n, factors=[None, blocks, 16])
    kbo, kbi, kk = sch.split(k, factors=[None, k_unroll, 16])
    sch.reorder(nbo, mo, kbo, kbi, nbi, mi, r, kk)
    sch.parallel(nbo)
    writeback, scope = _tile_accumulators(sch, acc, mo, tile, blocks)
    sch.compute_inline(sch.get_sblock("codes"))
    sch.decompose_reduction(acc, kbo)
    distance, locality = {PREFETCH_NONE: (0, 3), PREFETCH_AHEAD: (PREFETCH_BYTES, 3),
                          PREFETCH_NEXT_TASK: (task_bytes, 2)}[fetch]
    sch.tensorize(mi, rows_intrin(tile, distance, locality=locality, acc_scope=scope))
    sch.unroll(nbi)
    sch.unroll(kbi)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])
    rows_in_parallel(sch, pad, y)


def _unpack_in_registers(sch: s_tir.Schedule, codes, loop):
    sch.compute_at(codes, loop)
    sch.set_scope(codes, 0, "local")
    sch.vectorize(sch.get_loops(codes)[-1])


def _schedule_prefill(sch: s_tir.Schedule, row_blocks, k_unroll, intrin: str = VNNI_16x4):
    """Each 64-byte weight block is unpacked once per tile of tokens (the padding's) and fed to all of them."""
    acc, y, codes, pad = (sch.get_sblock(b) for b in ("acc", "y", "codes", "x_pad"))
    i, n, k = sch.get_loops(acc)
    mo, mi = sch.split(i, factors=[None, padded_row_tile(sch.mod["main"])])
    nbo, nbi, r = sch.split(n, factors=[None, row_blocks, 16])
    kbo, kbi, j, kk = sch.split(k, factors=[None, k_unroll, 4, 4])
    sch.reorder(nbo, mo, kbo, kbi, j, nbi, mi, r, kk)
    sch.parallel(nbo)
    writeback = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(writeback, mo)
    _unpack_in_registers(sch, codes, nbi)
    sch.decompose_reduction(acc, kbo)
    sch.tensorize(r, intrin)
    sch.unroll(nbi)
    sch.unroll(kbi)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])
    rows_in_parallel(sch, pad, y)


def schedule_lm_head_int8_vnni(sch: s_tir.Schedule, row_blocks=None, m_tile=None):
    """The int8 head: the ternary loop nest without unpacking (each 64-byte block already holds
    16 rows x 4 inputs of unsigned codes). Several rows (padded to tiles: x_pad): each block is
    loaded once into a register for a tile of `m_tile` rows. Knobs as the ternary template's
    (HEAD_INT8_VNNI); None takes the measured defaults."""
    if has_blocks(sch, "x_pad"):
        return _schedule_head_int8_tiles(sch, HEAD_TILE_ROW_BLOCKS if row_blocks is None else row_blocks,
                                         HEAD_M_TILE if m_tile is None else m_tile)
    acc, out = sch.get_sblock("head_acc"), sch.get_sblock("head_out")
    i, v, h = sch.get_loops(acc)
    if row_blocks is None:
        row_blocks = row_blocks_for(sch, v, 4)
    vbo, vbi, r = sch.split(v, factors=[None, row_blocks, 16])
    hb, kk = sch.split(h, factors=[None, 4])
    sch.reorder(vbo, i, hb, vbi, r, kk)
    sch.parallel(vbo)
    writeback = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(writeback, i)
    block = sch.cache_read(acc, 0, "local")  # the 64-byte weight block, as the intrinsic's local operand
    sch.compute_at(block, vbi)
    sch.vectorize(sch.get_loops(block)[-1])
    sch.decompose_reduction(acc, hb)
    sch.tensorize(r, VNNI_16x4)
    sch.unroll(vbi)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])
    scale_logits(sch, out)


HEAD_TILE_ROW_BLOCKS, HEAD_M_TILE = 1, 8  # 8 accumulators, on the stack: the next task's weights prefetched


def _schedule_head_int8_tiles(sch: s_tir.Schedule, row_blocks, m_tile):
    """Several rows: per task `row_blocks` x 16 vocabulary rows stream their weights once, each 64-byte
    block going through rows_intrin (planes=False) for every tile of m_tile rows. Where the tile's
    accumulators fit the stack (on_stack), each block prefetches the next task's block at its offset
    into L2: the second row tile re-reads this task's weights from L2 while DRAM is already streaming
    the next ones (2B-4T head, 2 threads, 16 rows: 8 x 1 15.3 -> 12.3 ms, 428 GMAC/s, against the 8 x 2
    tile that was the default; at 8 rows the head streams from DRAM, 9.5-10 ms either way)."""
    acc, out, pad = (sch.get_sblock(b) for b in ("head_acc", "head_out", "x_pad"))
    i, v, h = sch.get_loops(acc)
    row_blocks = row_blocks_for(sch, v, knob_value(sch, row_blocks))
    tile = knob_value(sch, m_tile)
    mo, mi = sch.split(i, factors=[None, tile])
    vbo, vbi, r = sch.split(v, factors=[None, row_blocks, 16])
    hb, kk = sch.split(h, factors=[None, 4])
    sch.reorder(vbo, mo, hb, vbi, mi, r, kk)
    sch.parallel(vbo)
    writeback, scope = _tile_accumulators(sch, acc, mo, tile, row_blocks)
    sch.decompose_reduction(acc, hb)
    task_bytes = row_blocks * int(sch.get(hb).extent) * 64  # one task's weights: the next task's block is that far
    intrin = rows_intrin(tile, task_bytes, planes=False, locality=2, acc_scope=scope) if scope == "global" else \
        rows_intrin(tile, planes=False)
    sch.tensorize(mi, intrin)
    sch.unroll(vbi)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])
    rows_in_parallel(sch, pad)
    sch.reverse_compute_at(out, mo)  # each tile's logits scaled while its sums are in L1 (16 rows: -0.25 ms)
    vectorize_lanes(sch, sch.get_loops(out)[-1])


def schedule_lm_head_q4_vnni(sch: s_tir.Schedule, row_blocks=None, m_tile=None):
    """4-bit head: per (16-row block, group of 32 inputs) an int32x16 accumulator from 8 vpdpbusd
    (4 blocks of 8 inputs x 2 nibble planes), then one convert + multiply-add by the group scales
    into float accumulators (row_blocks x 16 lanes) that stay in registers. Several rows (padded to
    tiles: x_pad): _schedule_head_q4_tiles."""
    if has_blocks(sch, "x_pad"):
        return _schedule_head_q4_tiles(sch, HEAD_Q4_ROW_BLOCKS if row_blocks is None else row_blocks,
                                       HEAD_Q4_M_TILE if m_tile is None else m_tile)
    total, acc, codes, out = (sch.get_sblock(b) for b in ("head_total", "group_acc", "codes", "head_out"))
    i, v, g = sch.get_loops(total)
    if row_blocks is None:
        row_blocks = row_blocks_for(sch, v, 4)
    vbo, vbi, r = sch.split(v, factors=[None, row_blocks, 16])
    sch.reorder(vbo, i, g, vbi, r)
    sch.parallel(vbo)
    writeback = sch.cache_write(total, 0, "local")
    sch.reverse_compute_at(writeback, i)
    sch.compute_at(acc, vbi, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    *_, ar, at = sch.get_loops(acc)
    tb, j, kk = sch.split(at, factors=[None, 2, 4])
    sch.reorder(tb, j, ar, kk)
    sch.compute_at(codes, j)
    sch.set_scope(codes, 0, "local")
    sch.vectorize(sch.get_loops(codes)[-1])
    sch.decompose_reduction(acc, tb)
    sch.tensorize(ar, VNNI_16x4)
    sch.unroll(j)
    sch.unroll(tb)
    sch.vectorize(r)
    sch.decompose_reduction(total, g)
    sch.unroll(vbi)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])
    scale_logits(sch, out)


# registers per task: 8 unpacked nibble planes + m_tile int32 group sums + m_tile x row_blocks float sums
HEAD_Q4_ROW_BLOCKS, HEAD_Q4_M_TILE = 4, 4  # 2B head, 8 rows: 11.3 ms (2 x 4: 12.1, 1 x 8: 12.1; per row: 13.3)


def _schedule_head_q4_tiles(sch: s_tir.Schedule, row_blocks, m_tile):
    """The 4-bit head over several rows: per task and tile of m_tile rows, each group's 64-byte blocks
    are unpacked into nibble planes once (in registers) and fed to every row of the tile; each row's
    group sum is scaled into its float accumulators, which stay in registers for the whole row."""
    total, acc, codes, out, pad = (sch.get_sblock(b) for b in ("head_total", "group_acc", "codes", "head_out",
                                                               "x_pad"))
    i, v, g = sch.get_loops(total)
    if isinstance(row_blocks, int):
        row_blocks = row_blocks_for(sch, v, row_blocks)
    mo, mi = sch.split(i, factors=[None, m_tile])
    vbo, vbi, r = sch.split(v, factors=[None, row_blocks, 16])
    sch.reorder(vbo, mo, g, vbi, mi, r)
    sch.parallel(vbo)
    writeback = sch.cache_write(total, 0, "local")
    sch.reverse_compute_at(writeback, mo)
    sch.compute_at(acc, vbi, preserve_unit_loops=True)  # the tile's rows' group sums of these 16 rows
    sch.set_scope(acc, 0, "local")
    *_, ai, _, ar, at = sch.get_loops(acc)
    tb, j, kk = sch.split(at, factors=[None, 2, 4])
    sch.reorder(tb, j, ai, ar, kk)
    sch.compute_at(codes, j)  # one nibble plane of one block, unpacked once for the tile's rows
    sch.set_scope(codes, 0, "local")
    sch.vectorize(sch.get_loops(codes)[-1])
    sch.decompose_reduction(acc, tb)
    sch.tensorize(ar, VNNI_16x4)
    for loop in (ai, j, tb, mi, vbi):
        sch.unroll(loop)
    sch.vectorize(r)
    sch.decompose_reduction(total, g)
    vectorize_lanes(sch, sch.get_loops(writeback)[-1])
    rows_in_parallel(sch, pad)
    scale_logits(sch, out)


# row_blocks is structural: with m_tile it decides whether the accumulators fit the stack (on_stack)
TERNARY_VNNI = Template(schedule_ternary_matmul_vnni, ternary_space(rows_knobs=True),
                        structural=("m_tile", "prefetch", "row_blocks"))


def head_space(sch: s_tir.Schedule) -> dict:
    """The int8 and 4-bit heads' knobs: row blocks per task (that divide the 16-row blocks) and, for
    several rows, the register tile of rows (that divides the padding, ternary.M_TILE)."""
    acc = sch.get_sblock("head_acc" if has_blocks(sch, "head_acc") else "head_total")
    _, v, _ = sch.get_loops(acc)
    blocks = int(sch.get(v).extent) // 16
    several = has_blocks(sch, "x_pad")
    knobs = {"row_blocks": [d for d in ((1, 2, 4) if several else (1, 2, 4, 8, 16)) if blocks % d == 0]}
    if several:
        knobs["m_tile"] = [t for t in M_TILES if M_TILE % t == 0]
    return knobs


# row_blocks is structural too: with m_tile it decides whether the accumulators fit the stack (on_stack)
HEAD_INT8_VNNI = Template(schedule_lm_head_int8_vnni, head_space, structural=("m_tile", "row_blocks"))
HEAD_Q4_VNNI = Template(schedule_lm_head_q4_vnni, head_space)
