"""The rpi5 (dotprod) artifact run on an emulated aarch64 machine, runtime only: qemu-user in a
chroot with aarch64 python3 + the TVM runtime wheels (no libtvm_compiler), see bitcompile/qemu.py.

Its logits equal the numpy reference, its greedy tokens equal the x86 build's, and on a CPU without
dotprod (QEMU_CPU=cortex-a72, a Pi 4) our runtime refuses it from AT_HWCAP before loading it, while
the same library loaded past that gate dies of SIGILL. Skipped locally without root/binfmt/the
sysroot; fails in CI instead (conftest.require)."""

import io
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import require
from test_compiled_model import TOLERANCE

from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel
from bitcompile.tools import qemu

pytestmark = pytest.mark.qemu

IDS = list(range(1, 41))
GREEDY = r"""
import json, sys
import numpy as np
import bitcompile

engine = bitcompile.load(sys.argv[1])
np.save(sys.argv[2], engine.logits(json.loads(sys.argv[3])))
ids = engine.encode("ROMEO:")
logits = engine.prefill(ids)
for _ in range(12):
    ids.append(int(np.argmax(logits)))
    logits = engine.step(ids[-1])
print(json.dumps(ids))
"""
UNGATED = r"""
import sys
import bitcompile.runtime.engine as runtime

runtime.check_runnable = lambda requires, name: None  # what the hardware does without our gate
runtime.Engine(sys.argv[1]).logits([1, 2, 3])
"""


@pytest.fixture(scope="module")
def rpi5(cross_build):
    require(qemu.unavailable() is None, f"aarch64 under qemu: {qemu.unavailable()}")
    return cross_build("rpi5")


def run_rpi5(script, artifact, *args, cpu=None, results=()):
    return qemu.run_python(script, ["{work}/art", *args], {"art": artifact}, cpu=cpu, results=results)


def test_rpi5_artifact_under_qemu_equals_reference_and_x86_greedy(rpi5, artifacts, checkpoints, tmp_path):
    out, files = run_rpi5(GREEDY, rpi5, "{work}/logits.npy", json.dumps(IDS), results=("logits.npy",))
    assert out.returncode == 0, out.stderr[-3000:]
    got, arm_greedy = np.load(io.BytesIO(files["logits.npy"])), json.loads(out.stdout.strip().splitlines()[-1])
    ref = ReferenceModel(load_checkpoint(checkpoints["autobitlinear"]))
    want = ref.logits(IDS)
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()
    host = subprocess.run([sys.executable, "-c", GREEDY, str(artifacts["autobitlinear"]), str(tmp_path / "x.npy"),
                           json.dumps(IDS)], capture_output=True, text=True, timeout=300)
    assert host.returncode == 0, host.stderr
    x86_greedy = json.loads(host.stdout.strip().splitlines()[-1])
    assert arm_greedy == x86_greedy
    assert arm_greedy == ref.greedy(arm_greedy[:-12], 12)


def test_dotprod_artifact_is_refused_on_a_cpu_without_dotprod(rpi5):
    """Feature gating by our runtime: qemu's cortex-a72 has no asimddp in AT_HWCAP."""
    out, _ = run_rpi5(GREEDY, rpi5, "{work}/logits.npy", "[1]", cpu="cortex-a72")
    assert out.returncode == 1
    assert "TargetError: this artifact was compiled for target 'rpi5', which needs CPU features this machine " \
           "lacks: asimddp" in out.stderr


def test_dotprod_artifact_past_the_gate_dies_of_sigill_on_cortex_a72(rpi5):
    """What the gate prevents: sdot on a CPU without it is an illegal instruction (the default CPU runs it)."""
    out, _ = run_rpi5(UNGATED, rpi5, cpu="cortex-a72")
    assert out.returncode in (-signal.SIGILL, 128 + signal.SIGILL), (out.returncode, out.stderr[-2000:])
    out, _ = run_rpi5(UNGATED, rpi5)
    assert out.returncode == 0, out.stderr[-2000:]


SIGNED = r"""
import sys
import bitcompile

engine = bitcompile.load(sys.argv[1], trusted_keys=[sys.argv[2]])
print(engine.signer, len(engine.generate("hi", max_new_tokens=4, temperature=0)) >= 0)
"""


def test_signed_rpi5_artifact_loads_with_its_key_in_the_runtime_only_chroot(rpi5, tmp_path):
    import shutil

    from bitcompile.runtime.trust import fingerprint, keygen, load_public, sign

    signed = tmp_path / "signed.bitc"
    shutil.copytree(rpi5, signed)
    private, public = keygen(tmp_path / "keys")
    sign(signed, private)
    out, _ = qemu.run_python(SIGNED, ["{work}/art", "{work}/keys/public.pem"], {"art": signed, "keys": tmp_path / "keys"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == [fingerprint(load_public(public)), "True"]
    other = keygen(tmp_path / "other")[1]
    shutil.copy(other, tmp_path / "keys" / "other.pem")
    out, _ = qemu.run_python(SIGNED, ["{work}/art", "{work}/keys/other.pem"], {"art": signed, "keys": tmp_path / "keys"})
    assert out.returncode == 1 and "which is not among the trusted keys" in out.stderr
