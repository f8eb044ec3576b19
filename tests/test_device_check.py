"""scripts/cuda_device_check.py, the tool carried to the GPU machine, exercised here on CPU artifacts:
params.bin rebuilt from synth's recipe, and check's verdicts against saved references."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cuda_device_check.py"


def device_check(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_params_rebuilds_the_blob_from_the_synthetic_recipe(artifacts, tmp_path):
    """The autobitlinear checkpoint is synth's tiny preset, seed 0: the rebuilt params.bin must hash
    to what compile wrote; another seed must be reported as different (exit 1)."""
    art = shutil.copytree(artifacts["autobitlinear"], tmp_path / "art.bitc")
    (art / "params.bin").unlink()
    out = device_check("params", art, "--preset", "tiny", "--seed", 0, "--work", tmp_path / "w0")
    assert out.returncode == 0 and "identical to the blob compiled with" in out.stdout, out.stderr
    out = device_check("params", art, "--preset", "tiny", "--seed", 1, "--work", tmp_path / "w1")
    assert out.returncode == 1 and "DIFFERS" in out.stdout


def test_check_passes_an_equal_build_and_fails_a_different_one(artifacts, checkpoints, tmp_path):
    art = artifacts["autobitlinear"]
    ref = tmp_path / "ref.npz"
    out = device_check("reference", art, "-o", ref, "--checkpoint", checkpoints["autobitlinear"])
    assert out.returncode == 0, out.stderr
    saved = dict(np.load(ref))
    assert {"ids", "logits", "greedy", "numpy_logits"} <= saved.keys()
    out = device_check("check", art, "--reference", ref)
    assert out.returncode == 0 and "32/32 (ok)" in out.stdout, out.stdout + out.stderr
    saved["logits"] = saved["logits"] + 0.01 * np.abs(saved["logits"]).max()  # a build 1% off
    np.savez(tmp_path / "off.npz", **saved)
    out = device_check("check", art, "--reference", tmp_path / "off.npz")
    assert out.returncode == 1 and "FAIL" in out.stdout
