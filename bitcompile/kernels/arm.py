"""ARM schedules for the ternary matmul: `sdot` (dotprod) on the b16x16 layout.

One bit plane of a 64-byte weight block is 16 rows x 4 inputs of codes t + 1 in {0, 1, 2}: four
16-byte quarters of 4 rows x 4 inputs, each exactly the first operand of one `sdot` (4 int32 lanes,
each the dot product of 4 int8 pairs); the second operand is the token's 4 int8 activations
broadcast to the 4 lanes. sdot is signed x signed, and codes 0..2 read the same as int8, so the
u8-code trick of the x86 kernel carries over unchanged: sum(code * x) - sum(x). The intrinsic has
x86's description (schedule_x86._dot_16x4_desc), so the x86 loop nest is reused as is with ARM knobs.

That description treats `a` as uint8; the sdot implementation is exact only for a < 128, which holds
for the ternary codes (and would for the q4 head's 0..15, but not for the int8 head's q + 128:
those heads keep their portable schedules on ARM).

Without dotprod (Raspberry Pi 4, 32-bit ARM) the portable schedule runs: its 16 rows are 16-lane
int32 vectors, which LLVM lowers to NEON.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T
from tvm.target import codegen

from .common import Template, has_blocks, register_intrin
from .x86 import _dot_16x4_desc, schedule_ternary_matmul_vnni, ternary_space

SDOT_16x4 = "bitcompile_sdot_s8s8_16x4"


@T.prim_func(s_tir=True)
def _dot_16x4_sdot(
    a: T.Buffer((64,), "uint8", offset_factor=1, scope="local"),
    b: T.Buffer((4,), "int8", offset_factor=1),
    c: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:16], a[0:64], b[0:4])
        T.writes(c[0:16])
        x = T.reinterpret(T.broadcast(T.reinterpret(b.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        for q in T.unroll(4):  # rows 4q .. 4q+3
            c[T.ramp(q * 4, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                c.vload([q * 4], dtype="int32x4"),
                T.reinterpret(a.vload([q * 16], "uint8x16"), dtype="int8x16"),
                x,
                dtype="int32x4",
            )


register_intrin(SDOT_16x4, _dot_16x4_desc, _dot_16x4_sdot)


def has_dotprod(target) -> bool:
    return (target.kind.name == "llvm" and str(target.attrs.get("mtriple", "")).startswith("aarch64")
            and bool(codegen.llvm_cpu_has_features(["dotprod"], target)))


# 32 NEON registers of 4 int32: decode keeps 4 row blocks x 4 registers of accumulators (plus the
# unpacked codes and the broadcast activations); prefill's tile of 8 tokens takes 8 x 4 per row block.
DECODE_ROW_BLOCKS = 4
PREFILL_ROW_BLOCKS = 1


def schedule_ternary_matmul_sdot(sch: s_tir.Schedule, row_blocks=None, k_unroll=1):
    if row_blocks is None:
        row_blocks = PREFILL_ROW_BLOCKS if has_blocks(sch, "x_pad") else DECODE_ROW_BLOCKS
    schedule_ternary_matmul_vnni(sch, row_blocks, k_unroll, intrin=SDOT_16x4)


# Knobs for `bitcompile tune --rpc` on the device: at most 8 row blocks of 4 NEON accumulators each.
TERNARY_SDOT = Template(schedule_ternary_matmul_sdot, ternary_space((1, 2, 4, 8), (1, 2)))

