"""Helpers every schedule family uses: finding blocks and operators, vector loops, knob templates."""

from __future__ import annotations

import dataclasses
from typing import Callable

from tvm import s_tir, tirx
from tvm.s_tir import TensorIntrin


def op_name(func: tirx.PrimFunc) -> str | None:
    attrs = func.attrs
    return str(attrs["bitcompile.op"]) if attrs is not None and "bitcompile.op" in attrs else None


def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def vectorize_lanes(sch: s_tir.Schedule, loop, lanes: int = 16):
    """Split `loop` into lanes-wide vectors and vectorize them (all our extents are multiples of 16)."""
    sch.vectorize(sch.split(loop, factors=[None, lanes])[1])


def rows_in_parallel(sch: s_tir.Schedule, *blocks):
    """2-D elementwise blocks (the rows padded to tiles, a matmul's scaled output): rows in
    parallel, 16-lane vectors along each row."""
    for block in blocks:
        rows, cols = sch.get_loops(block)
        sch.parallel(rows)
        vectorize_lanes(sch, cols)


def scale_logits(sch: s_tir.Schedule, out):
    """The heads' last step (integer sums -> scaled logits): 16-wide vectors over the vocabulary,
    vector chunks in parallel."""
    _, vocab = sch.get_loops(out)
    chunks, lanes = sch.split(vocab, factors=[None, 16])
    sch.parallel(chunks)
    sch.vectorize(lanes)


def has_blocks(sch: s_tir.Schedule, *names: str) -> bool:
    try:
        for name in names:
            sch.get_sblock(name)
        return True
    except Exception:  # the schedule raises a generic FFI error for an unknown block name
        return False


@dataclasses.dataclass(frozen=True)
class Template:
    """A schedule template with knobs: apply(sch, **knobs) schedules a kernel (missing knobs take the
    template's measured defaults); space(sch) names each knob's candidate values for this kernel.
    bitcompile tune searches the space; the records it writes supply the knobs at compile time.
    structural: knobs that change which instructions apply issues (not just loop extents): apply gets
    them as concrete values (knob_value), and the tuner searches each value in a space of its own."""

    apply: Callable
    space: Callable[[s_tir.Schedule], dict]
    structural: tuple[str, ...] = ()


def knob_value(sch: s_tir.Schedule, knob) -> int:
    """A knob as an int: given as one, or a tuner's sampled variable (its value in this schedule)."""
    return knob if isinstance(knob, int) else int(sch.get(knob))


def register_intrin(name: str, desc, impl):
    """Register a TensorIntrin once (a module imported twice must not register it again)."""
    try:
        TensorIntrin.get(name)
    except (ValueError, Exception):  # not registered yet
        TensorIntrin.register(name, desc, impl)
