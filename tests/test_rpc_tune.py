"""Tuning on a device over TVM RPC, on loopback: a tracker here, TVM's own RPC server in the aarch64
sysroot under qemu (runtime-only TVM) as the device. A few trials on one ternary kernel for rpi5: the
candidates are cross-linked here, timed there, the chosen one verified there against numpy; the record
is saved and the next compile for rpi5 applies it. Emulated timings are plumbing evidence only."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import require

from bitcompile.compiler import records, tune
from bitcompile.tools import qemu

pytestmark = pytest.mark.qemu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_key(tracker_port: int, key: str, processes, timeout: float = 120):
    from tvm import rpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.args[:4])}... exited:\n{proc.stdout.read().decode()[-3000:]}")
        try:
            summary = rpc.connect_tracker("127.0.0.1", tracker_port).summary()
            if any(q == key and v["free"] for q, v in summary["queue_info"].items()):
                return
        except (ConnectionError, RuntimeError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"no RPC server registered as {key!r} within {timeout} s")


@pytest.fixture(scope="module")
def device():
    """(tracker address, key) of an emulated rpi5 registered at a local tracker."""
    require(qemu.unavailable() is None, f"aarch64 under qemu: {qemu.unavailable()}")
    tracker_port, key = _free_port(), "rpi5-qemu"
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    server = qemu.start_rpc_server(f"127.0.0.1:{tracker_port}", key, port=_free_port())
    try:
        _wait_for_key(tracker_port, key, (tracker, server))
        yield f"127.0.0.1:{tracker_port}", key
    finally:
        for proc in (server, tracker):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_tuning_over_rpc_writes_a_record_the_next_rpi5_compile_applies(device, checkpoints, tmp_path):
    import tvm

    import bitcompile
    from bitcompile.compiler.targets import resolve_target

    tracker, key = device
    model, schedules = checkpoints["autobitlinear"], tmp_path / "schedules"
    (row,) = tune.tune(model, target="rpi5", trials=2, schedules=schedules, only="decode 64x64", progress=False,
                       rpc=tracker, key=key)
    assert row["trials"] == 2 and row["us"] > 0
    store = records.RecordStore(schedules, tvm.target.Target(resolve_target("rpi5").tvm))
    (record_path,) = store.dir.glob("*.json")
    record = json.loads(record_path.read_text())
    assert store.dir.name == "aarch64-cortex-a76" and "dotprod" in record["key"]["target"]["isa"]
    assert record["measured_on"].startswith("the RPC device") and record["verified"].startswith("exact")

    art = bitcompile.compile(model, target="rpi5", output=tmp_path / "rpi5.bitc", progress=False,
                             schedules=schedules)
    used = json.loads((art / "manifest.json").read_text())["schedules"]
    assert len(used["tuned"]) == 1 and "int8[1,64]" in used["tuned"][0]


def test_tuning_an_arm_target_without_a_device_says_how():
    with pytest.raises(ValueError, match="--rpc"):
        tune.tune("models/shakespeare-tiny", target="rpi5", trials=1)
