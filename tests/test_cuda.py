"""CUDA targets: built here without a GPU (SASS inside, manifest, refused here with the fix); the GPU
tests compare a CUDA build with the numpy reference and the CPU build, and skip without a GPU."""

import json

import numpy as np
import pytest

import bitcompile
from bitcompile import cross, cuda
from bitcompile.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel
from bitcompile.targets import TargetError, resolve_target

from conftest import require
from test_compiled_model import TOLERANCE

NO_GPU = "no CUDA device here: run on a GPU machine (pytest there, or scripts/cuda_device_check.py)"


@pytest.fixture(scope="session")
def cuda_build(cross_build):
    def build(target: str):
        require(not cuda.missing_tools(), f"compiling for {target} needs nvcc and gcc on PATH")
        return cross_build(target)

    return build


@pytest.mark.parametrize("target, arch", [("cuda-sm90", 90), ("cuda-sm80", 80)])
def test_cuda_library_embeds_sass_for_the_target_arch(cuda_build, target, arch):
    library = cuda_build(target) / "model.so"
    entries = cuda.fatbin_entries(library)
    assert entries, "no CUDA fatbin in model.so"
    assert all(e == {"kind": "sass", "arch": arch, "elf_machine": cuda.EM_CUDA} for e in entries), entries
    assert b"__global__" not in library.read_bytes()  # machine code, not CUDA source to compile at load


def test_cuda_manifest_requires_the_gpu_arch(cuda_build):
    manifest = json.loads((cuda_build("cuda-sm90") / "manifest.json").read_text())
    assert manifest["target"]["requires"] == {"arch": "x86_64", "device": "cuda", "cpu_features": [],
                                              "cuda_arch": "sm_90"}


def test_cuda_artifact_is_refused_without_a_gpu(cuda_build):
    if cuda.device_present():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(TargetError, match=r"compiled for target 'cuda-sm90' \(NVIDIA GPU, sm_90\).*"
                                          r"run it on a machine with an NVIDIA sm_90 GPU.*--target host"):
        bitcompile.load(cuda_build("cuda-sm90"))


def test_missing_nvcc_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TargetError, match=r"compiling for cuda-sm90 needs nvcc, which is not on PATH: "
                                          r"install the CUDA toolkit"):
        cross.linker_for(resolve_target("cuda-sm90"))


def test_dp4a_kernels_for_2b_shapes():
    """Decode and prefill schedules of the 2B4T ternary shapes tensorize to __dp4a (no compiling)."""
    from tvm import s_tir

    from bitcompile import schedule_cuda
    from bitcompile.ternary_ops import ternary_matmul_func

    for tokens in (1, None):
        for n, k in ((3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)):
            sch = s_tir.Schedule(ternary_matmul_func(tokens, n, k))
            schedule_cuda.schedule_ternary_matmul(sch)
            assert "__dp4a" in sch.mod.script()


@pytest.fixture(scope="session")
def gpu_engine(cuda_build):
    if not cuda.device_present():
        pytest.skip(NO_GPU)
    return bitcompile.load(cuda_build("cuda-sm90"))


def test_gpu_logits_equal_reference(checkpoints, gpu_engine):
    ref = ReferenceModel(load_checkpoint(checkpoints["autobitlinear"]))
    ids = np.random.default_rng(7).integers(0, gpu_engine.config.vocab_size, 80).tolist()
    got, want = gpu_engine.logits(ids), ref.logits(ids)
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_gpu_greedy_tokens_equal_cpu_build(engine, gpu_engine):
    prompt = engine.encode("The quick brown fox")
    want = engine.generate(prompt, max_new_tokens=24, temperature=0)
    assert gpu_engine.generate(prompt, max_new_tokens=24, temperature=0) == want
