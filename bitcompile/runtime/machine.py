"""What this machine can run: an artifact's `requires` checked before its library is loaded.

CPU artifacts: the architecture and the CPU features as Linux names them (/proc/cpuinfo, or AT_HWCAP on
ARM). CUDA artifacts: a driver, TVM's CUDA sidecar (tvm/lib/libtvm_runtime_cuda.so, loaded here when
the TVM runtime was imported alone: TVM_USE_RUNTIME_LIB=1 skips backend autoload) and GPU 0 of the
artifact's architecture. Every refusal names the fix.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

# Bit positions of those names in the kernel's AT_HWCAP / AT_HWCAP2 (asm/hwcap.h). The auxiliary
# vector is what the kernel, or qemu-user, says this process may use; under qemu-user /proc/cpuinfo
# describes the host CPU instead.
AARCH64_HWCAP = {"fp": 0, "asimd": 1, "aes": 3, "pmull": 4, "sha1": 5, "sha2": 6, "crc32": 7, "atomics": 8,
                 "fphp": 9, "asimdhp": 10, "asimdrdm": 12, "asimddp": 20, "sve": 22, "asimdfhm": 23}
AARCH64_HWCAP2 = {"sve2": 1, "i8mm": 13, "bf16": 14}
ARM32_HWCAP = {"half": 1, "thumb": 2, "fastmult": 4, "vfp": 6, "edsp": 7, "neon": 12, "vfpv3": 13, "tls": 15,
               "vfpv4": 16, "idiva": 17, "idivt": 18, "vfpd32": 19, "lpae": 20}
AT_HWCAP, AT_HWCAP2 = 16, 26


class TargetError(ValueError):
    """Unknown target name, a target this installation cannot build, or an artifact that cannot run here."""


def machine_arch() -> str:
    """platform.machine(), except that a 32-bit ARM userland says armv7l (on a 64-bit kernel too)."""
    machine = platform.machine()
    if machine in ("aarch64", "arm64", "armv8l") and struct.calcsize("P") == 4:
        return "armv7l"
    return machine


def physical_cores() -> int:
    """Cores this process may run on, each counted once however many hardware threads it has."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs topology (some containers): every CPU counts
            cores.add(cpu)
    return max(1, len(cores))


def default_threads():
    """Before TVM's thread pool starts: give it one thread per core unless the user set
    TVM_NUM_THREADS (or OMP_NUM_THREADS). TVM's own default on x86 is half the logical CPUs, assuming
    two hardware threads per core: on a machine without SMT (2 cores, 2 CPUs) that ran every kernel
    on one core at about half the speed."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    # Workers spin this many rounds for the next parallel loop before they sleep. The runtime-only
    # library (TVM_USE_RUNTIME_LIB=1, as on a device) spins less than the full one by default, and a
    # step launches hundreds of parallel loops: waking the workers cost 6 ms of a 67 ms batched step.
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "300000")


def _auxval(key: int) -> int:
    """getauxval(key) from libc; 0 where unknown."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return 0
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    return getauxval(key)


def _hwcap_flags() -> set[str]:
    """ARM: the feature names set in this process's AT_HWCAP/AT_HWCAP2."""
    tables = ([(AT_HWCAP, AARCH64_HWCAP), (AT_HWCAP2, AARCH64_HWCAP2)] if machine_arch() == "aarch64"
              else [(AT_HWCAP, ARM32_HWCAP)])
    return {name for key, bits in tables for name, bit in bits.items() if _auxval(key) >> bit & 1}


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def machine_cpu_flags() -> set[str]:
    """CPU features of this machine as Linux names them. ARM: the auxiliary vector first (right under
    qemu-user too), /proc/cpuinfo where it says nothing."""
    if machine_arch().startswith(("aarch64", "arm")):
        return _hwcap_flags() or _cpuinfo_flags()
    return _cpuinfo_flags()


def check_runnable(requires: dict, target_name: str):
    """Raise TargetError unless this machine can run code built with `requires`."""
    arch = machine_arch()
    if requires.get("arch") != arch:
        raise TargetError(
            f"this artifact was compiled for target '{target_name}' ({requires.get('arch')}), "
            f"but this machine is {arch}; compile the model for this machine with `bitcompile compile MODEL --target host`"
        )
    if requires.get("device") == "cuda":
        check_device(requires["cuda_arch"], target_name)
    missing = sorted(set(requires.get("cpu_features", [])) - machine_cpu_flags())
    if missing:
        raise TargetError(
            f"this artifact was compiled for target '{target_name}', which needs CPU features this machine lacks: "
            f"{', '.join(missing)}; compile it for this machine with `bitcompile compile MODEL --target host`"
        )


class CudaError(TargetError):
    """A CUDA build or run this machine cannot do; the message names the fix."""


def sidecar_loaded() -> bool:
    from tvm.base import _LOADED_LIBS

    return "tvm_runtime_cuda" in _LOADED_LIBS


def load_sidecar():
    """Load tvm/lib/libtvm_runtime_cuda.so into this process (registers the CUDA module functions)."""
    from tvm.base import _LOADED_LIBS

    path = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(path))


def load_runtime():
    """The TVM runtime's CUDA support, in runtime-only mode too; CudaError when there is no driver."""
    if sidecar_loaded():
        return
    try:
        load_sidecar()
    except OSError as e:
        raise CudaError(f"TVM's CUDA runtime does not load here ({e}): it needs the NVIDIA driver (libcuda.so.1) "
                        "and libcudart.so.13 (on a GPU machine: `import torch` first, or the CUDA 13 runtime "
                        "on LD_LIBRARY_PATH)") from None


def device_present() -> bool:
    """Whether this process can use a CUDA GPU (driver, TVM's CUDA runtime, device 0)."""
    try:
        load_runtime()
    except CudaError:
        return False
    import tvm

    return bool(tvm.cuda(0).exist)


def check_device(cuda_arch: str, target_name: str):
    """Raise CudaError unless GPU 0 runs code compiled for `cuda_arch` (SASS: same major, minor >= ours)."""
    fix = (f"run it on a machine with an NVIDIA {cuda_arch} GPU, or compile the model for this machine with "
           "`bitcompile compile MODEL --target host`")
    try:
        load_runtime()
    except CudaError as e:
        raise CudaError(f"this artifact was compiled for target '{target_name}' (NVIDIA GPU, {cuda_arch}), "
                        f"but {e}; {fix}") from None
    import tvm

    device = tvm.cuda(0)
    if not device.exist:
        raise CudaError(f"this artifact was compiled for target '{target_name}' (NVIDIA GPU, {cuda_arch}), but this "
                        f"machine has no CUDA device; {fix}")
    have, want = device.compute_version.split("."), (cuda_arch[3:-1], cuda_arch[-1])
    if have[0] != want[0] or int(have[1]) < int(want[1]):
        raise CudaError(f"this artifact holds machine code for {cuda_arch}, but GPU 0 ({device.device_name}) is "
                        f"sm_{''.join(have)}; compile for its architecture (a cuda-sm{''.join(have)} target)")
