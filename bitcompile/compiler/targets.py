"""Target descriptions: what a compiled artifact is for (TVM target, machine, CPU features it needs).

Presets are data in targets/*.json (TVM target, machine, CPU features, toolchain to link with, device
facts); "host" is this machine, read from LLVM; a plain triple borrows the toolchain of the preset with
that triple. Toolchains are cross.py's business; runtime/machine.py checks an artifact's `requires` against
the machine it runs on (no compiler needed: /proc/cpuinfo, or AT_HWCAP on ARM).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

from ..paths import data_dir
from ..runtime.machine import TargetError

# LLVM feature name -> the flag Linux prints in /proc/cpuinfo, for the ISA extensions code may use.
X86_FEATURE_FLAGS = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "movbe": "movbe", "avxvnni": "avx_vnni",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
}


# LLVM feature name -> the name Linux gives it (/proc/cpuinfo "Features", AT_HWCAP), for the ARM
# extensions generated code may use. Presets list their `cpu_features`; for ARM the features LLVM
# enables for the target's cpu and mattr are added, so `--cpu cortex-a76` alone still requires asimddp.
AARCH64_FEATURE_FLAGS = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "fullfp16": "asimdhp",
                         "sve": "sve", "bf16": "bf16"}
ARM32_FEATURE_FLAGS = {"neon": "neon", "vfp4": "vfpv4", "d32": "vfpd32"}
@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str
    tvm: dict  # the TVM target dict
    arch: str  # platform.machine() of the machine that runs it ("armv7l" for 32-bit ARM userlands)
    device: str  # "cpu" or "cuda"
    cpu_features: tuple[str, ...]  # /proc/cpuinfo flags the code needs
    description: str = ""
    toolchain: dict | None = None  # how to link model.so (cross.py); None: this machine's C compiler
    runtime: dict = dataclasses.field(default_factory=dict)  # facts about the device: page_size, dotprod, i8mm

    def requires(self) -> dict:
        needs = {"arch": self.arch, "device": self.device, "cpu_features": list(self.cpu_features)}
        return needs | ({"cuda_arch": self.tvm["arch"]} if self.device == "cuda" else {})


def _preset_dir() -> Path:
    presets = data_dir("targets")
    if not presets.is_dir():
        raise TargetError("target descriptions (targets/*.json) are missing from this installation")
    return presets


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


def _load_preset(name: str) -> TargetSpec:
    raw = json.loads((_preset_dir() / f"{name}.json").read_text())
    return TargetSpec(raw.get("name", name), raw["tvm"], raw["arch"], raw.get("device", "cpu"),
                      tuple(raw.get("cpu_features", [])), raw.get("description", ""), raw.get("toolchain"),
                      raw.get("runtime", {}))


def _triple(tvm_target: dict) -> str:
    return tvm_target.get("mtriple", "").replace("-unknown-", "-")


def _preset_for_triple(triple: str) -> TargetSpec | None:
    """The first preset compiled for `triple`: a plain triple borrows its toolchain and runtime facts."""
    presets = [_load_preset(n) for n in preset_names()[1:]]
    return next((p for p in presets if p.device == "cpu" and _triple(p.tvm) == triple.replace("-unknown-", "-")),
                None)


def _unknown(name: str) -> TargetError:
    triples = sorted({_triple(_load_preset(n).tvm) for n in preset_names()[1:]} - {""})
    return TargetError(f"unknown target {name!r}; known targets: {', '.join(preset_names())} "
                       f"(or a triple with --cpu/--features: {', '.join(triples)})")


def resolve_target(name: str | TargetSpec, cpu: str | None = None, features: str | None = None) -> TargetSpec:
    """A preset name, "host", or a plain LLVM triple (aarch64-linux-gnu, …), with an optional CPU and
    feature list ("+dotprod,+i8mm") replacing the preset's."""
    if isinstance(name, TargetSpec):
        spec = name
    elif name == "host":
        spec = host_target()
    elif (_preset_dir() / f"{name}.json").is_file():
        spec = _load_preset(name)
    elif (base := _preset_for_triple(name)) is not None:
        spec = dataclasses.replace(base, name=name, description=f"{name} (from preset {base.name})")
    else:
        raise _unknown(name)
    if cpu or features:
        spec = _with_cpu(spec, cpu, features)
    return dataclasses.replace(spec, cpu_features=_required_flags(spec)) if spec.arch != "x86_64" else spec


def _with_cpu(spec: TargetSpec, cpu: str | None, features: str | None) -> TargetSpec:
    from tvm.target import codegen

    tvm_target = dict(spec.tvm)
    if cpu:
        if not codegen.llvm_is_valid_cpu(cpu, tvm_target.get("mtriple", "")):
            raise TargetError(f"LLVM does not know the CPU {cpu!r} for {tvm_target.get('mtriple')}; "
                              "use an LLVM -mcpu name such as cortex-a72, cortex-a76, cortex-a78")
        tvm_target["mcpu"] = cpu
    if features:
        attrs = [f.strip() for f in features.split(",") if f.strip()]
        bad = [f for f in attrs if f[0] not in "+-"]
        if bad:
            raise TargetError(f"--features {features!r}: each feature needs a + or - sign, e.g. +dotprod,+i8mm")
        tvm_target["mattr"] = list(tvm_target.get("mattr", [])) + attrs
    return dataclasses.replace(spec, tvm=tvm_target)


def _required_flags(spec: TargetSpec) -> tuple[str, ...]:
    """The preset's cpu_features plus every ARM extension LLVM enables for this cpu and mattr."""
    from tvm.target import Target, codegen

    table = AARCH64_FEATURE_FLAGS if spec.arch == "aarch64" else ARM32_FEATURE_FLAGS
    enabled = set(map(str, codegen.llvm_get_cpu_features(Target(spec.tvm))))
    return tuple(sorted(set(spec.cpu_features) | {flag for f, flag in table.items() if f in enabled}))
