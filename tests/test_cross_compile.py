"""The tiny model cross-compiled for the ARM presets: the right ELF, the right libraries, page
alignment, and sdot exactly where the target has dotprod. Runs in CI (fails there if a toolchain is
missing); skipped locally without the Debian cross toolchains."""

import json
import re
import shutil
import struct
import subprocess

import pytest
from conftest import require

import bitcompile
from bitcompile.compiler.targets import TargetError, resolve_target

EM_ARM, EM_AARCH64 = 40, 183
PT_LOAD = 1
# target: (ELF class bits, machine, NEEDED allowed, disassembler)
EXPECTED = {
    "rpi4": (64, EM_AARCH64, {"libc.so.6", "libm.so.6"}, "aarch64-linux-gnu-objdump"),
    "rpi5": (64, EM_AARCH64, {"libc.so.6", "libm.so.6"}, "aarch64-linux-gnu-objdump"),
    "rpi-armv7": (32, EM_ARM, {"libc.so.6", "libm.so.6", "libgcc_s.so.1"}, "arm-linux-gnueabihf-objdump"),
    "android-arm64": (64, EM_AARCH64, {"libc.so", "libm.so"}, "aarch64-linux-gnu-objdump"),
}


def elf_header(path):
    """(class bits, e_machine, [p_align of every PT_LOAD]) read from the ELF header itself."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[5] == 1, "not a little-endian ELF file"
    bits = 64 if data[4] == 2 else 32
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, phentsize, phnum, align_at, word = ((*struct.unpack_from("<Q", data, 32), *struct.unpack_from("<HH", data, 54),
                                                48, "<Q") if bits == 64 else
                                               (*struct.unpack_from("<I", data, 28), *struct.unpack_from("<HH", data, 42),
                                                28, "<I"))
    aligns = [struct.unpack_from(word, data, off + align_at)[0]
              for off in (phoff + i * phentsize for i in range(phnum))
              if struct.unpack_from("<I", data, off)[0] == PT_LOAD]
    return bits, machine, aligns


def needed(path) -> set[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))


def mnemonics(path, objdump) -> set[str]:
    require(shutil.which(objdump) is not None, f"{objdump} is missing (apt-get install binutils-aarch64-linux-gnu "
                                               "binutils-arm-linux-gnueabihf)")
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return {m.group(1) for m in re.finditer(r"^\s+[0-9a-f]+:\s+(\S+)", out, re.M)}


@pytest.mark.parametrize("target", sorted(EXPECTED))
def test_cross_compiled_library_is_an_elf_for_the_target(cross_build, target):
    art = cross_build(target)
    bits, machine, allowed, _ = EXPECTED[target]
    elf_bits, elf_machine, aligns = elf_header(art / "model.so")
    assert (elf_bits, elf_machine) == (bits, machine)
    assert needed(art / "model.so") <= allowed
    page = resolve_target(target).runtime["page_size"]
    assert aligns and all(a % page == 0 for a in aligns), f"PT_LOAD alignments {aligns} vs {page}-byte pages"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"]["name"] == target
    assert manifest["target"]["requires"] == resolve_target(target).requires()


def test_android_library_has_16k_pages_and_only_system_libraries(cross_build):
    art = cross_build("android-arm64")
    _, _, aligns = elf_header(art / "model.so")
    assert min(aligns) >= 16384
    assert needed(art / "model.so") == {"libc.so", "libm.so"}


@pytest.mark.parametrize("target, has_sdot", [("rpi5", True), ("android-arm64", True), ("rpi4", False)])
def test_sdot_exactly_where_the_target_has_dotprod(cross_build, target, has_sdot):
    ops = mnemonics(cross_build(target) / "model.so", EXPECTED[target][3])
    assert ("sdot" in ops) == has_sdot
    assert ops & {"mla", "mul", "add", "smlal", "smull", "fmla", "fmul"}  # NEON/FP code is there either way


def test_armv7_build_uses_neon(cross_build):
    ops = mnemonics(cross_build("rpi-armv7") / "model.so", EXPECTED["rpi-armv7"][3])
    assert {o for o in ops if o.startswith(("vmul", "vadd", "vmla", "vld1"))}, "no NEON instructions"


def test_arm_artifact_is_refused_on_this_machine(cross_build):
    with pytest.raises(TargetError, match=r"compiled for target 'rpi5' \(aarch64\), but this machine is x86_64"):
        bitcompile.load(cross_build("rpi5"))
