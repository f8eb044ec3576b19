"""CUDA targets: building GPU machine code without a GPU (finding the GPU at run time: runtime/cuda.py).

TVM turns the CUDA kernels into machine code (an nvcc fatbin with SASS for the target's
sm_XX) only when its CUDA runtime sidecar, tvm/lib/libtvm_runtime_cuda.so, is loaded; the sidecar
needs libcuda.so.1, the driver. Without a driver it fails to load silently and the library would
carry CUDA source instead (compiled on the GPU machine at load time, with a compiler it may lack).
So on a machine without a driver we build a stand-in libcuda.so.1 (every symbol the sidecar imports,
each returning CUDA_ERROR_NO_DEVICE), load it into this process, then the sidecar. nvcc compiles
(TVM_CUDA_COMPILE_MODE=nvcc) inside `with target:` so it gets the target's arch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import struct
import subprocess
from pathlib import Path

from ..paths import cache_dir
from ..runtime.machine import CudaError, load_sidecar, sidecar_loaded

# The driver API symbols libtvm_runtime_cuda.so imports (nm -D --undefined-only); 100 = CUDA_ERROR_NO_DEVICE.
DRIVER_SYMBOLS = ("cuInit", "cuDriverGetVersion", "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName",
                  "cuGetErrorString", "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData",
                  "cuModuleUnload", "cuTensorMapEncodeTiled")
NVCC_FIX = ("install the CUDA toolkit (NVIDIA's apt repository: apt-get install cuda-nvcc-13-0, or Debian's "
            "nvidia-cuda-toolkit) and put nvcc on PATH (e.g. export PATH=/usr/local/cuda/bin:$PATH)")
FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190


def missing_tools() -> list[str]:
    return [tool for tool in ("nvcc", "gcc") if shutil.which(tool) is None]


def check_build_tools(target_name: str):
    missing = missing_tools()
    if "nvcc" in missing:
        raise CudaError(f"compiling for {target_name} needs nvcc, which is not on PATH: {NVCC_FIX}")
    if missing:
        raise CudaError(f"compiling for {target_name} needs gcc (nvcc's host compiler): apt-get install gcc")


def _stub_dir() -> Path:
    return cache_dir() / "cuda-driver-stub"


def stub_driver() -> Path:
    """A stand-in libcuda.so.1 (built once with gcc into the cache): loads, answers 'no device'."""
    library = _stub_dir() / "libcuda.so.1"
    source = "typedef int CUresult;\n" + "".join(f"CUresult {name}(void) {{ return 100; }}\n"
                                               for name in DRIVER_SYMBOLS)
    c_file = library.with_name("libcuda_stub.c")
    if library.is_file() and c_file.is_file() and c_file.read_text() == source:
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    c_file.write_text(source)
    partial = library.with_name(f".libcuda.so.1.{os.getpid()}")
    out = subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(partial), str(c_file)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise CudaError(f"building the CUDA driver stand-in failed (gcc):\n{out.stderr}")
    partial.replace(library)
    return library


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def ensure_build_backend():
    """TVM's CUDA sidecar loaded in this process: with the real driver if there is one, else the stub."""
    if sidecar_loaded():
        return
    if not _driver_present():
        ctypes.CDLL(str(stub_driver()), mode=ctypes.RTLD_GLOBAL)
    load_sidecar()


@contextlib.contextmanager
def compile_env(target, target_name: str):
    """Around tvm.compile + export_library for a CUDA target: kernels become an nvcc fatbin of SASS.
    The static parts of each call (decode: everything between the attention calls) are captured and
    replayed as CUDA graphs (a launch costs ~1.2 us in a graph, ~5 us without); BITCOMPILE_CUDA_GRAPH=0
    builds without them."""
    import tvm

    check_build_tools(target_name)
    ensure_build_backend()
    graphs = {"relax.backend.use_cuda_graph": os.environ.get("BITCOMPILE_CUDA_GRAPH", "1") != "0"}
    # TVM compiles with --use_fast_math unless told not to: its approximate division, rsqrt, sin/cos
    # and pow moved activations across int8 rounding boundaries (logits 7e-3 off the reference on the
    # H100); the kernels are memory-bound, exact math costs nothing measurable
    with _environ(TVM_CUDA_COMPILE_MODE="nvcc", TVM_CUDA_NVCC_NO_FAST_MATH="1"):
        with target, tvm.transform.PassContext(config=graphs):
            yield


@contextlib.contextmanager
def _environ(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fatbin_entries(library: str | Path) -> list[dict]:
    """What the CUDA fatbins embedded in a compiled library hold: [{kind: "sass"|"ptx", arch: 90,
    elf_machine: 190}] (fatbin header 0xBA55ED50; entry kind 2 = ELF cubin, 1 = PTX)."""
    data = Path(library).read_bytes()
    entries, start = [], data.find(struct.pack("<I", FATBIN_MAGIC))
    while start >= 0:
        _, _, header, size = struct.unpack_from("<IHHQ", data, start)
        pos, end = start + header, start + header + size
        while pos < end:
            kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", data, pos)
            arch = struct.unpack_from("<I", data, pos + 28)[0]
            body = data[pos + entry_header : pos + entry_header + 20]
            machine = struct.unpack_from("<H", body, 18)[0] if body[:4] == b"\x7fELF" else None
            entries.append({"kind": {1: "ptx", 2: "sass"}.get(kind, str(kind)), "arch": arch, "elf_machine": machine})
            pos += entry_header + entry_size
        start = data.find(struct.pack("<I", FATBIN_MAGIC), end)
    return entries
