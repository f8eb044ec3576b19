"""Tuning records: the knob values `bitcompile tune` chose for one kernel on one target.

A record is a small JSON file in schedules/<target-key>/, keyed by the kernel's full configuration:
operator, argument shapes and dtypes, weight packing layout, schedule-template version and the
target's CPU and ISA features. Compile looks a kernel's key up and uses the record only on an exact
match, so a record can never reach a different kernel (or a changed template).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tvm import tirx

from ..atomic import atomic_write_text
from ..model.packing import KERNEL_LAYOUT
from ..paths import data_dir

# Bump when a template's knobs change meaning: old records then stop matching instead of misleading.
# 2: x86 decode unpacks inside its intrinsic (16-bit shifts), so the best knobs moved
# 3: x86 prefill and batched steps: one intrinsic per block and tile of rows (knobs m_tile, prefetch)
# 4: x86 rows kernels: accumulators on the stack where they fit; prefetch is none / 1 KB ahead / next task
TEMPLATE_VERSION = 4
# ISA features a schedule template may depend on; the record is only valid for targets with the same set.
ISA_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "neon", "dotprod", "i8mm")


def schedules_dir() -> Path:
    """The committed records: schedules/ beside the package (checkout) or bitcompile/schedules (installed)."""
    return data_dir("schedules")


def isa_features(target) -> list[str]:
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return []
    return [f for f in ISA_FEATURES if codegen.llvm_cpu_has_features([f], target)]


def target_key(target) -> str:
    """Folder name for a target's records, e.g. x86_64-znver4, aarch64-cortex-a76, cuda-sm_90."""
    attrs = target.attrs
    if target.kind.name == "cuda":
        name = f"cuda-{attrs.get('arch', 'unknown')}"
    else:
        name = f"{str(attrs.get('mtriple', 'unknown')).split('-')[0]}-{attrs.get('mcpu', 'generic')}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _dims(param) -> str:
    return ",".join(str(int(d)) if isinstance(d, tirx.IntImm) else "?" for d in param.shape)


def kernel_key(func: tirx.PrimFunc, target) -> dict:
    attrs = target.attrs
    several_rows = {name: str(func.attrs[f"bitcompile.{name}"]) for name in ("rows", "row_tile")
                    if f"bitcompile.{name}" in func.attrs}
    return {
        "op": str(func.attrs["bitcompile.op"]),
        **several_rows,
        "args": [f"{p.dtype}[{_dims(p)}]" for p in func.params],
        "ternary_layout": KERNEL_LAYOUT,
        "template": TEMPLATE_VERSION,
        "target": {
            "kind": target.kind.name,
            "mtriple": str(attrs.get("mtriple", "")),
            "mcpu": str(attrs.get("mcpu", "")),
            "mattr": sorted(str(a) for a in attrs.get("mattr", [])),
            "isa": isa_features(target),
        },
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class RecordStore:
    """The records of one target: lookup by kernel, save atomically; remembers what it was asked."""

    def __init__(self, root: Path | str | None, target):
        self.target = target
        self.dir = Path(root if root is not None else schedules_dir()) / target_key(target)
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, key: dict) -> Path:
        return self.dir / f"{key['op']}-{key_digest(key)}.json"

    def lookup(self, func: tirx.PrimFunc) -> dict | None:
        """The knobs recorded for exactly this kernel, or None (then the default schedule applies)."""
        key = kernel_key(func, self.target)
        path = self.path(key)
        record = json.loads(path.read_text()) if path.is_file() else None
        label = f"{key['op']}{' ' + key['rows'] if 'rows' in key else ''} {' '.join(key['args'])}"
        if record is None or record.get("key") != key:
            self.misses.append(label)
            return None
        self.hits.append(label)
        return dict(record["knobs"])

    def save(self, func: tirx.PrimFunc, knobs: dict, stats: dict) -> Path:
        key = kernel_key(func, self.target)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "knobs": knobs, **stats}, indent=1, sort_keys=True) + "\n")
        return path

    def report(self) -> dict:
        return {"records": self.dir.name, "tuned": sorted(set(self.hits)), "default": sorted(set(self.misses))}

    def summary(self) -> str:
        tuned, default = len(set(self.hits)), len(set(self.misses))
        if not tuned:
            return f"schedules: default for all {default} tunable kernels (no tuning records in {self.dir})"
        return f"schedules: {tuned} tuned kernels from {self.dir}, {default} default"
