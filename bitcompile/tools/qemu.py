"""Run aarch64 artifacts on an x86 machine: qemu-user (binfmt) in a chroot with the TVM runtime only.

The sysroot (scripts/arm64-sysroot.sh) is Debian arm64 with python3 and the runtime wheels in
/opt/site, without libtvm_compiler.so: what a Raspberry Pi with `pip install bitcompile[device]` has.
`QEMU_CPU` picks the emulated CPU (default "max", which has dotprod; "cortex-a72" has not, like a Pi 4).
Needs root (chroot) and the qemu-aarch64 binfmt handler enabled (.ci/run sets both up).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # the bitcompile package
STAMP = ".bitcompile-sysroot"
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
SETUP = ("apt-get install qemu-user-static binfmt-support debootstrap; mount -t binfmt_misc binfmt_misc "
         "/proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64; scripts/arm64-sysroot.sh")


def sysroot_dir() -> Path:
    default = Path.home() / ".cache" / "bitcompile" / "sysroot-arm64"
    return Path(os.environ.get("BITCOMPILE_SYSROOT_ARM64", default))


def unavailable() -> str | None:
    """Why aarch64 code cannot run here (None when it can), with what to do about it."""
    if os.geteuid() != 0:
        return "running the aarch64 sysroot needs root (chroot)"
    if not (sysroot_dir() / STAMP).is_file():
        return f"no aarch64 sysroot at {sysroot_dir()} (build it: scripts/arm64-sysroot.sh, or set BITCOMPILE_SYSROOT_ARM64)"
    try:
        enabled = BINFMT.read_text().splitlines()[0] == "enabled"
    except OSError:
        enabled = False
    if not enabled:
        return f"the qemu-aarch64 binfmt handler is not enabled; set it up with: {SETUP}"
    return None


def run_python(script: str, args: list[str], artifacts: dict[str, Path], cpu: str | None = None,
               results: tuple[str, ...] = (), timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `python3 -c script args` in the sysroot, with this bitcompile package and `artifacts`
    ({name: path}) copied to a work directory ("{work}" in `args`). Returns the process and the bytes
    of the `results` files the script wrote in the work directory."""
    root = sysroot_dir()
    (root / "tmp").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bitcompile-", dir=root / "tmp"))
    try:
        shutil.copytree(PACKAGE, work / "bitcompile", ignore=shutil.ignore_patterns("__pycache__"))
        for name, path in artifacts.items():
            shutil.copytree(path, work / name)
        inside = f"/tmp/{work.name}"
        cmd, env = chroot_python(["-c", script, *(a.format(work=inside) for a in args)], cpu, inside)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return out, {name: (work / name).read_bytes() for name in results if (work / name).is_file()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def chroot_python(args: list[str], cpu: str | None = None, path: str = "") -> tuple[list[str], dict]:
    """(command, environment) that runs `python3 ARGS` in the sysroot with the runtime-only TVM."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": ":".join(filter(None, ["/opt/site", path])),
           "TVM_USE_RUNTIME_LIB": "1", "LANG": "C.UTF-8", **({"QEMU_CPU": cpu} if cpu else {})}
    return [shutil.which("chroot") or "/usr/sbin/chroot", str(sysroot_dir()), "python3", *args], env


def start_rpc_server(tracker: str, key: str, port: int = 9090, cpu: str | None = None) -> subprocess.Popen:
    """TVM's own RPC server in the sysroot, registered at `tracker` under `key`: an emulated device for
    `bitcompile tune --rpc`. It runs in its own process group (its forked worker keeps the port):
    stop it with os.killpg(proc.pid, signal.SIGTERM)."""
    cmd, env = chroot_python(["-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                              "--port-end", str(port + 1),
                              "--tracker", tracker, "--key", key,
                              "--load-library", "/opt/site/tvm/lib/libtvm_runtime_extra.so"], cpu)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
