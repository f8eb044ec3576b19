"""Toolchains: how model.so is linked for a target (the `toolchain` of targets/*.json).

TVM's LLVM backend writes the object files for any triple; only the final link needs a toolchain for
the target: Debian's cross gcc for Raspberry Pi (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf), and
for Android either the NDK (ANDROID_NDK_HOME) or, without one, clang + lld with -nostdlib and empty
stand-ins for libc.so and libm.so (NEEDED libc.so, libm.so as with the NDK; the TVM-FFI symbol is
resolved by the runtime at load).
Targets without a toolchain (host, x86 presets) link with this machine's C compiler, as TVM does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .targets import TargetError, TargetSpec

NDK_BIN = "toolchains/llvm/prebuilt/linux-x86_64/bin"


@dataclasses.dataclass(frozen=True)
class Toolchain:
    cc: str  # compiler driver used as the linker (a name on PATH or a path)
    flags: tuple[str, ...]  # link flags beyond -shared -fPIC
    tools: tuple[str, ...]  # commands that must exist
    packages: tuple[str, ...]  # Debian packages that provide them
    stub_libs: tuple[str, ...] = ()  # system libraries to record as NEEDED via empty stubs (no sysroot)

    def missing(self) -> list[str]:
        return [t for t in self.tools if not (shutil.which(t) or Path(t).is_file())]

    def link(self, output: str, objects: list[str]):
        """export_library's fcompile: link TVM's objects into a shared library for the target."""
        with tempfile.TemporaryDirectory() as stubs:
            _run([self.cc, "-shared", "-fPIC", "-o", output, *objects, *self.flags, *self._stubs(Path(stubs))])

    def _stubs(self, directory: Path) -> list[str]:
        """Empty lib<name>.so stand-ins, so the library names its system libraries (libc, libm: sinf,
        memcpy, …) as NEEDED like an NDK build does; the device's real ones resolve the symbols."""
        for name in self.stub_libs:
            _run([self.cc, *self.flags, "-shared", f"-Wl,-soname,lib{name}.so", "-o", str(directory / f"lib{name}.so"),
                  "-x", "c", os.devnull])
        return [f"-L{directory}", *(f"-l{name}" for name in self.stub_libs)] if self.stub_libs else []


def _run(cmd: list[str]):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"linking failed: {' '.join(cmd)}\n{out.stdout}{out.stderr}")


def toolchain_for(spec: TargetSpec) -> Toolchain | None:
    """The target's toolchain (None: this machine's compiler), the NDK's when ANDROID_NDK_HOME is set."""
    raw = spec.toolchain
    if raw is None:
        return None
    ndk_home = os.environ.get("ANDROID_NDK_HOME")
    if ndk_home and "ndk" in raw:
        cc = str(Path(ndk_home) / NDK_BIN / raw["ndk"]["cc"])
        if not Path(cc).is_file():
            raise TargetError(f"ANDROID_NDK_HOME={ndk_home} has no {NDK_BIN}/{raw['ndk']['cc']}; point it at an "
                              "Android NDK (r23 or later), or unset it to link with clang + lld")
        return Toolchain(cc, tuple(raw["ndk"]["flags"]), (cc,), ("the Android NDK",))
    return Toolchain(raw["cc"], tuple(raw.get("flags", [])), tuple(raw.get("tools", [raw["cc"]])),
                     tuple(raw.get("packages", [])), tuple(raw.get("stub_libs", [])))


def linker_for(spec: TargetSpec):
    """export_library's fcompile for this target (None: TVM's default), after checking it can be built here.

    Raises TargetError naming what to install, before any compile work is done."""
    if spec.device == "cuda":
        from .cuda import check_build_tools

        check_build_tools(spec.name)
        return None  # the host side links with this machine's C compiler; nvcc made the GPU code
    if spec.device != "cpu":
        raise TargetError(f"compiling for {spec.name} ({spec.device}) is not supported: bitcompile "
                          "compiles for CPUs and CUDA GPUs (see `bitcompile targets`)")
    toolchain = toolchain_for(spec)
    if toolchain is None:
        return None
    missing = toolchain.missing()
    if missing:
        raise TargetError(f"target {spec.name} is linked with {' + '.join(toolchain.tools)}; missing here: "
                          f"{', '.join(missing)}; install with: apt-get install {' '.join(toolchain.packages)}")

    def fcompile(output, objects, options=None):
        toolchain.link(output, objects)

    fcompile.output_format = "so"
    return fcompile


def build_status(spec: TargetSpec) -> str:
    """One line for `bitcompile targets`: what building for this target needs, and whether it is here."""
    if spec.device == "cuda":
        from .cuda import missing_tools

        missing = missing_tools()
        return "needs nvcc (CUDA toolkit) + gcc: " + (f"MISSING {', '.join(missing)}" if missing else "installed")
    try:
        toolchain = toolchain_for(spec)
    except TargetError as e:
        return f"error: {e}"
    if toolchain is None:
        return "ready (this machine's C compiler)"
    missing = toolchain.missing()
    needs = " ".join(toolchain.packages)
    return f"needs {needs}: " + (f"MISSING {', '.join(missing)}" if missing else "installed")
