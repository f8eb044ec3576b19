"""Target descriptions: what a compiled artifact is for (TVM target, machine, CPU features it needs).

Presets are data in targets/*.json; "host" is this machine, read from LLVM. The runtime checks an
artifact's `requires` against the machine it runs on (no compiler needed: /proc/cpuinfo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

# LLVM feature name -> the flag Linux prints in /proc/cpuinfo, for the ISA extensions code may use.
X86_FEATURE_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "movbe": "movbe", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
}


class TargetError(ValueError):
    """Unknown target name, or an artifact that cannot run on this machine."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    tvm: dict  # the TVM target dict
    arch: str  # platform.machine() of the machine that runs it
    device: str  # "cpu" or "cuda"
    cpu_features: tuple[str, ...]  # /proc/cpuinfo flags the code needs
    description: str = ""

    def requires(self) -> dict:
        return {"arch": self.arch, "device": self.device, "cpu_features": list(self.cpu_features)}


def _preset_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "targets", here / "targets"):
        if candidate.is_dir():
            return candidate
    raise TargetError("target descriptions (targets/*.json) are missing from this installation")


def preset_names() -> list[str]:
    return ["host"] + sorted(p.stem for p in _preset_dir().glob("*.json"))


def host_target(num_cores: int | None = None) -> TargetSpec:
    from tvm.target import Target, codegen

    cpu = codegen.llvm_get_system_cpu()
    features = codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mcpu": cpu}))
    flags = sorted(X86_FEATURE_FLAGS[f] for f in map(str, features) if f in X86_FEATURE_FLAGS)
    tvm_target = {"kind": "llvm", "mtriple": f"{platform.machine()}-unknown-linux-gnu", "mcpu": cpu,
                  "num-cores": num_cores or os.cpu_count() or 1}
    return TargetSpec("host", tvm_target, platform.machine(), "cpu", tuple(flags), f"this machine ({cpu})")


def resolve_target(name: str) -> TargetSpec:
    if name == "host":
        return host_target()
    path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(preset_names())}")
    raw = json.loads(path.read_text())
    return TargetSpec(raw.get("name", name), raw["tvm"], raw["arch"], raw.get("device", "cpu"),
                      tuple(raw.get("cpu_features", [])), raw.get("description", ""))


def machine_cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def check_runnable(requires: dict, target_name: str):
    """Raise TargetError unless this machine can run code built with `requires`."""
    arch = platform.machine()
    if requires.get("arch") != arch:
        raise TargetError(
            f"this artifact was compiled for target '{target_name}' ({requires.get('arch')}), "
            f"but this machine is {arch}; compile the model for this machine with `bitcompile compile MODEL --target host`"
        )
    missing = sorted(set(requires.get("cpu_features", [])) - machine_cpu_flags())
    if missing:
        raise TargetError(
            f"this artifact was compiled for target '{target_name}', which needs CPU features this machine lacks: "
            f"{', '.join(missing)}; compile it for this machine with `bitcompile compile MODEL --target host`"
        )
