"""Target presets, plain triples, toolchain checks and the runtime's feature gate (no compiling here)."""

import os
import subprocess
import sys

import pytest

from bitcompile.compiler import cross, targets
from bitcompile.compiler.targets import TargetError, resolve_target
from bitcompile.runtime import machine

ARM_PRESETS = ["rpi4", "rpi5", "rpi-armv7", "android-arm64"]


def test_presets_exist_and_describe_their_toolchain():
    names = targets.preset_names()
    assert {"host", "x86-64-avx512", "x86-64-avx2", *ARM_PRESETS, "cuda-sm80", "cuda-sm90"} <= set(names)
    for name in ARM_PRESETS:
        spec = resolve_target(name)
        assert spec.toolchain["cc"] and spec.toolchain["packages"] and spec.runtime["page_size"] >= 4096
    assert resolve_target("android-arm64").runtime["page_size"] == 16384
    assert resolve_target("cuda-sm90").tvm == {"kind": "cuda", "arch": "sm_90",
                                               "host": {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"}}


@pytest.mark.parametrize("name, needs, lacks", [
    ("rpi4", {"asimd"}, {"asimddp"}),
    ("rpi5", {"asimd", "asimddp"}, set()),
    ("android-arm64", {"asimd", "asimddp"}, set()),
    ("rpi-armv7", {"neon"}, {"asimddp"}),
])
def test_arm_requirements_are_linux_feature_names(name, needs, lacks):
    required = set(resolve_target(name).requires()["cpu_features"])
    assert needs <= required and not lacks & required


def test_plain_triple_with_cpu_and_features():
    spec = resolve_target("aarch64-linux-gnu", cpu="cortex-a76", features="+dotprod,+i8mm")
    assert spec.tvm["mtriple"] == "aarch64-linux-gnu" and spec.tvm["mcpu"] == "cortex-a76"
    assert spec.tvm["mattr"][-2:] == ["+dotprod", "+i8mm"] and spec.arch == "aarch64"
    assert {"asimddp", "i8mm"} <= set(spec.cpu_features)
    assert spec.toolchain["cc"] == "aarch64-linux-gnu-gcc"
    # the CPU alone implies dotprod in LLVM, so the artifact must require it
    assert "asimddp" in resolve_target("aarch64-linux-gnu", cpu="cortex-a76").cpu_features


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "pdp11"}, r"unknown target 'pdp11'; known targets: host, .*rpi5.*aarch64-linux-gnu"),
    ({"name": "aarch64-linux-gnu", "cpu": "cortex-a99"}, "LLVM does not know the CPU 'cortex-a99'"),
    ({"name": "rpi4", "features": "dotprod"}, r"needs a \+ or - sign"),
])
def test_bad_targets_name_the_fix(kwargs, message):
    with pytest.raises(TargetError, match=message):
        resolve_target(**kwargs)


def test_missing_cross_toolchain_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(TargetError, match=r"missing here: aarch64-linux-gnu-gcc; install with: "
                                          r"apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"):
        cross.linker_for(resolve_target("rpi5"))
    with pytest.raises(TargetError, match="apt-get install clang lld"):
        cross.linker_for(resolve_target("android-arm64"))


def test_android_ndk_home_is_honoured(monkeypatch, tmp_path):
    clang = tmp_path / cross.NDK_BIN / "aarch64-linux-android29-clang"
    clang.parent.mkdir(parents=True)
    clang.write_text("#!/bin/sh\n")
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path))
    toolchain = cross.toolchain_for(resolve_target("android-arm64"))
    assert toolchain.cc == str(clang) and "-Wl,-z,max-page-size=16384" in toolchain.flags and not toolchain.stub_libs
    monkeypatch.setenv("ANDROID_NDK_HOME", str(tmp_path / "nope"))
    with pytest.raises(TargetError, match="has no toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android29-clang"):
        cross.toolchain_for(resolve_target("android-arm64"))


def test_targets_command_lists_presets_and_what_they_need():
    out = subprocess.run([sys.executable, "-m", "bitcompile.cli", "targets"], capture_output=True, text=True,
                         env={**os.environ, "PATH": os.path.dirname(sys.executable)})  # no cross tools on PATH
    assert out.returncode == 0, out.stderr
    assert "needs gcc-aarch64-linux-gnu libc6-dev-arm64-cross: MISSING aarch64-linux-gnu-gcc" in out.stdout
    assert "cuda-sm90" in out.stdout and "needs nvcc (CUDA toolkit) + gcc: MISSING nvcc" in out.stdout
    assert all(name in out.stdout for name in ARM_PRESETS)


@pytest.mark.parametrize("hwcap, hwcap2, flags", [
    (1 << 1 | 1 << 10 | 1 << 20, 1 << 13, {"asimd", "asimdhp", "asimddp", "i8mm"}),
    (1 << 1, 0, {"asimd"}),
])
def test_arm_features_come_from_the_auxiliary_vector(monkeypatch, hwcap, hwcap2, flags):
    """On ARM the gate reads AT_HWCAP/AT_HWCAP2 (what qemu-user and the kernel grant), not /proc/cpuinfo."""
    monkeypatch.setattr(machine, "machine_arch", lambda: "aarch64")
    monkeypatch.setattr(machine, "_auxval", lambda key: {machine.AT_HWCAP: hwcap, machine.AT_HWCAP2: hwcap2}[key])
    assert machine.machine_cpu_flags() >= flags
    requires = resolve_target("rpi5").requires()
    if "asimddp" in flags:
        machine.check_runnable(requires, "rpi5")
    else:
        with pytest.raises(TargetError, match="'rpi5', which needs CPU features this machine lacks: asimddp"):
            machine.check_runnable(requires, "rpi5")

