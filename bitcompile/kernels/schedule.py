"""Schedule rules: how each operator of the graph runs on a target family.

The ternary operators (ternary.py) are found by their `bitcompile.op` attribute; everything else
(norms, residual adds, activations) falls to dlight's generic CPU rules, then to a last-resort rule
that parallelizes the outermost loop, so no operator is left as a serial loop nest.
"""

from __future__ import annotations

import functools
import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule

from .common import Template, extent, has_blocks, op_name, rows_in_parallel, scale_logits, vectorize_lanes


def _lane_partials(sch: s_tir.Schedule, name: str, lanes: int = 16):
    """rfactor the last axis of a reduction into `lanes` partial results (one vector), so it runs as
    a vector loop instead of a scalar dependency chain; returns the partials' block."""
    block = sch.get_sblock(name)
    _, lane = sch.split(sch.get_loops(block)[-1], factors=[None, lanes])
    return sch.rfactor(lane, 1)


def _lane_and_reduction_loops(sch: s_tir.Schedule, partials):
    """The loops of an rfactor block (_lane_partials) that drive its lane axis (its first iterator)
    and its reduction axis."""
    loops = sch.get_loops(partials)
    realize = sch.get(loops[-1]).body
    reduction = next(value for var, value in zip(realize.block.iter_vars, realize.iter_values)
                     if var.iter_type == tirx.IterVar.CommReduce)

    def loop_of(value):
        return next(loop for loop in loops if sch.get(loop).loop_var.same_as(value))

    return loop_of(realize.iter_values[0]), loop_of(reduction)


def schedule_quantize_activations(sch: s_tir.Schedule):
    """Per token: absmax, scale and int8 values in one pass, the sum in a second over the cached
    int8 row; both reductions in 16 vector lanes. Tokens in parallel, every stage of a token inside
    one parallel loop, when the count is not 1 (for one decode token a parallel launch costs more
    than the work). rms_norm_quantize: the row's sum of squares (16 lanes) comes first in each
    token's pass, and the normalized value is recomputed where the quantization reads it."""
    norm = []
    if has_blocks(sch, "sum_sq"):
        sch.compute_inline(sch.get_sblock("normed"))
        norm = [_lane_partials(sch, "sum_sq"), sch.get_sblock("sum_sq"), sch.get_sblock("inv_rms")]
    amax_partials, sum_partials = _lane_partials(sch, "amax"), _lane_partials(sch, "x_sum")
    token = sch.get_loops(norm[0] if norm else amax_partials)[0]
    for block in (norm[1:] + ([amax_partials] if norm else [])
                  + [sch.get_sblock(n) for n in ("amax", "act_scale", "x_q")] + [sum_partials, sch.get_sblock("x_sum")]):
        sch.reverse_compute_at(block, token, preserve_unit_loops=True)
    vectorize_lanes(sch, sch.get_loops(sch.get_sblock("x_q"))[-1])
    if extent(sch, token) != 1:
        sch.parallel(token)
    for partials in norm[:1] + [amax_partials, sum_partials]:
        lane, k = _lane_and_reduction_loops(sch, partials)
        sch.reorder(k, lane)  # reverse_compute_at orders the loops lane first
        sch.vectorize(lane)
        sch.decompose_reduction(partials, k)


def schedule_ternary_matmul(sch: s_tir.Schedule):
    """Blocks of 16 output rows in parallel, the 16 rows of a block vectorized (the layout's row block)."""
    acc, y = sch.get_sblock("acc"), sch.get_sblock("y")
    sch.compute_inline(sch.get_sblock("codes"))
    if has_blocks(sch, "x_pad"):
        sch.compute_inline(sch.get_sblock("x_pad"))
    i, j, k = sch.get_loops(acc)
    jo, ji = sch.split(j, factors=[None, 16])
    ko, ki = sch.split(k, factors=[None, 16])
    sch.reorder(jo, i, ko, ki, ji)
    sch.parallel(jo)
    sch.vectorize(ji)
    init = sch.decompose_reduction(acc, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    rows_in_parallel(sch, y)


def schedule_lm_head(sch: s_tir.Schedule):
    """Vocabulary rows in parallel; the hidden dimension reduced in 16 vector lanes (rfactor)."""
    blk = sch.get_sblock("logits")
    i, j, h = sch.get_loops(blk)
    sch.reorder(j, i, h)
    ho, hi = sch.split(h, factors=[None, 16])
    rf = sch.rfactor(hi, 2)
    j, i, ho, hi = sch.get_loops(rf)
    sch.reverse_compute_at(blk, i)
    sch.parallel(j)
    sch.vectorize(hi)
    sch.decompose_reduction(rf, ho)


def schedule_embedding(sch: s_tir.Schedule):
    rows_in_parallel(sch, sch.get_sblock("embed"))


def schedule_rms_norm(sch: s_tir.Schedule):
    """RMSNorm as legalized by TOPI: each row's sum of squares once, in 16 vector lanes, then the
    normalization vectorized; rows in parallel when there are several.

    dlight's CPU Reduction rule parallelizes the hidden axis for a single row and recomputes the
    whole sum of squares per element (O(hidden^2)); this rule keeps it O(hidden)."""
    for name in ("T_cast_1", "T_cast", "T_multiply"):
        sch.compute_inline(sch.get_sblock(name))
    out = sch.get_sblock("T_rms_norm")
    consumers = sch.get_consumers(out)
    if consumers:
        sch.reverse_compute_inline(consumers[0])
    partials = _lane_partials(sch, "T_multiply_red")
    *p_rows, p_k, p_lane = sch.get_loops(partials)
    *rows, h = sch.get_loops(out)
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.compute_at(sch.get_sblock("rsqrt"), row, preserve_unit_loops=True)
    if extent(sch, row) != 1:
        sch.parallel(row)
        sch.parallel(sch.fuse(*p_rows) if len(p_rows) > 1 else p_rows[0])
    vectorize_lanes(sch, h)
    sch.vectorize(p_lane)
    sch.decompose_reduction(partials, p_k)


def _is_rms_norm(sch: s_tir.Schedule) -> bool:
    return has_blocks(sch, "T_multiply_red", "rsqrt", "T_rms_norm", "T_cast_1", "T_cast", "T_multiply")


class RMSNormRule(ScheduleRule):
    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        if not _is_rms_norm(sch):
            return None
        schedule_rms_norm(sch)
        return sch


def schedule_lm_head_int8(sch: s_tir.Schedule):
    """Portable int8 head: 16-row blocks in parallel, the 16 rows vectorized."""
    if has_blocks(sch, "x_pad"):
        sch.compute_inline(sch.get_sblock("x_pad"))
    acc, out = sch.get_sblock("head_acc"), sch.get_sblock("head_out")
    i, v, h = sch.get_loops(acc)
    vo, vi = sch.split(v, factors=[None, 16])
    sch.reorder(vo, i, h, vi)
    sch.parallel(vo)
    sch.vectorize(vi)
    init = sch.decompose_reduction(acc, h)
    sch.vectorize(sch.get_loops(init)[-1])
    scale_logits(sch, out)


def schedule_lm_head_q4(sch: s_tir.Schedule):
    """Portable 4-bit head: 16-row blocks in parallel; per group, the 32-input integer sum vectorized
    over the 16 rows, then scaled into float accumulators."""
    sch.compute_inline(sch.get_sblock("codes"))
    if has_blocks(sch, "x_pad"):
        sch.compute_inline(sch.get_sblock("x_pad"))
    total, acc, out = sch.get_sblock("head_total"), sch.get_sblock("group_acc"), sch.get_sblock("head_out")
    i, v, g = sch.get_loops(total)
    vb, r = sch.split(v, factors=[None, 16])
    sch.reorder(vb, i, g, r)
    sch.parallel(vb)
    sch.compute_at(acc, g, preserve_unit_loops=True)
    *_, ar, at = sch.get_loops(acc)
    sch.reorder(at, ar)
    sch.vectorize(ar)
    sch.decompose_reduction(acc, at)
    sch.vectorize(r)
    sch.decompose_reduction(total, g)
    scale_logits(sch, out)


def tunable_template(func: tirx.PrimFunc, target) -> Template | None:
    """The template of a tunable kernel: the ternary matmul on targets with a dot-product
    instruction (VNNI, sdot), the int8 and 4-bit heads on VNNI; others use their fixed schedules."""
    from .arm import TERNARY_SDOT, has_dotprod
    from .x86 import HEAD_INT8_VNNI, HEAD_Q4_VNNI, TERNARY_VNNI, has_vnni

    name = op_name(func)
    if name in ("lm_head_int8", "lm_head_q4"):
        return (HEAD_INT8_VNNI if name == "lm_head_int8" else HEAD_Q4_VNNI) if has_vnni(target) else None
    if name != "ternary_matmul":
        return None
    if has_vnni(target):
        return TERNARY_VNNI
    return TERNARY_SDOT if has_dotprod(target) else None


class TernaryRules(ScheduleRule):
    """Dispatch a bitcompile operator to its schedule by the `bitcompile.op` attribute; tunable
    kernels take their knobs from `records` (a records.RecordStore) when it has them."""

    rules = {
        "quantize_activations": schedule_quantize_activations,
        "rms_norm_quantize": schedule_quantize_activations,
        "lm_head": schedule_lm_head,
        "embedding": schedule_embedding,
    }

    def __init__(self, records=None):
        super().__init__()
        self.records = records

    def apply(self, func, target, tunable):
        name = op_name(func) if isinstance(func, tirx.PrimFunc) else None
        rule = self.rules.get(name)
        template = tunable_template(func, target) if name else None
        if template is not None:
            knobs = self.records.lookup(func) if self.records is not None else None
            rule = functools.partial(template.apply, **(knobs or {}))
        elif name == "ternary_matmul":
            rule = schedule_ternary_matmul
        elif name == "lm_head_int8":
            from .x86 import has_vnni, schedule_lm_head_int8_vnni

            rule = schedule_lm_head_int8_vnni if has_vnni(target) else schedule_lm_head_int8
        elif name == "lm_head_q4":
            from .x86 import has_vnni, schedule_lm_head_q4_vnni

            rule = schedule_lm_head_q4_vnni if has_vnni(target) else schedule_lm_head_q4
        if rule is None:
            return None
        sch = s_tir.Schedule(func)
        rule(sch)
        return sch


class InjectiveRule(ScheduleRule):
    """Functions of spatial blocks only (the residual adds, casts, reshapes, split + relu² * up):
    every intermediate block inlined into the last, whose rows go in parallel (when there are more
    than a few thousand elements) with 16-lane vectors along the innermost axis. Unscheduled, the
    legalized split + relu² * up of a batched step wrote four intermediate tensors, one element at a
    time (47 us for 8 rows of 6912; prefill's, one thread)."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        if not has_blocks(sch, "root"):
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if not blocks or any(iv.iter_type != tirx.IterVar.DataPar for b in blocks for iv in sch.get(b).iter_vars):
            return None
        try:
            for block in blocks[:-1]:
                sch.compute_inline(block)
            (block,) = sch.get_child_blocks(sch.get_sblock("root"))
            loops = sch.get_loops(block)
            extents = [extent(sch, loop) for loop in loops]
            lanes = extents[-1] is not None and extents[-1] % 16 == 0
            outer = loops[:-1] if lanes else loops
            if lanes:
                sch.vectorize(sch.split(loops[-1], factors=[None, 16])[1])
            if outer and (None in extents or math.prod(extents) > 8192):
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        except Exception:  # a layout this rule does not handle: ParallelOuterLoop's turn
            return None
        return sch


class ParallelOuterLoop(ScheduleRule):
    """Last resort: parallelize the outermost spatial loop of every block that has one."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")) if has_blocks(sch, "root") else []:
            loops = sch.get_loops(block)
            if loops and sch.get(block).iter_vars and sch.get(block).iter_vars[0].iter_type == tirx.IterVar.DataPar:
                outer = extent(sch, loops[0])
                if outer is None or outer > 1:
                    try:
                        sch.parallel(loops[0])
                        changed = True
                    except Exception:  # not parallelizable (e.g. a carried dependence): leave it
                        pass
        return sch if changed else None


def cpu_schedule_pass(records=None) -> tvm.transform.Pass:
    return dl.ApplyDefaultSchedule(TernaryRules(records), RMSNormRule(), dl.cpu.GEMV(), dl.cpu.Reduction(),
                                   InjectiveRule(), ParallelOuterLoop())
