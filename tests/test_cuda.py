"""CUDA targets: built here without a GPU (SASS inside, manifest, refused here with the fix); the GPU
tests compare a CUDA build with the numpy reference and the CPU build, and skip without a GPU."""

import json

import numpy as np
import pytest
from conftest import require
from test_compiled_model import TOLERANCE

import bitcompile
from bitcompile.compiler import cross, cuda
from bitcompile.compiler.targets import TargetError, resolve_target
from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel
from bitcompile.runtime.machine import device_present

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


def test_info_says_a_cuda_artifact_needs_the_gpu(cuda_build, capsys):
    from bitcompile.cli import main

    main(["info", str(cuda_build("cuda-sm90"))])
    assert "requires      x86_64 + an NVIDIA GPU of sm_90" in capsys.readouterr().out


def test_cuda_artifact_is_refused_without_a_gpu(cuda_build):
    if device_present():
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

    from bitcompile.kernels import cuda as schedule_cuda
    from bitcompile.kernels.ternary import ternary_matmul_func

    for tokens in (1, None):
        for n, k in ((3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)):
            sch = s_tir.Schedule(ternary_matmul_func(tokens, n, k))
            schedule_cuda.schedule_ternary_matmul(sch)
            assert "__dp4a" in sch.mod.script()


@pytest.fixture(scope="session")
def gpu_engine(cuda_build):
    if not device_present():
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


def _scheduled(tokens, n, k) -> str:
    import tvm

    from bitcompile.kernels.cuda import CudaRules
    from bitcompile.kernels.ternary import ternary_matmul_func

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    return CudaRules().apply(ternary_matmul_func(tokens, n, k), target, False).mod.script()


@pytest.mark.parametrize("n, k", [(3840, 2560), (2560, 6912), (512, 256)])
def test_decode_matmul_is_the_hand_gemv(n, k):
    script = _scheduled(1, n, k)
    assert '"gemv"' in script and "__dp4a" in script and "__shfl_xor_sync" in script
    assert "T.vectorized(4)" in script  # the 16-byte weight loads


@pytest.mark.parametrize("tokens, n, k", [(None, 3840, 2560), (1, 64, 64)])
def test_prefill_and_small_k_keep_the_tiled_schedule(tokens, n, k):
    script = _scheduled(tokens, n, k)
    assert "__dp4a" in script and '"gemv"' not in script


def test_gemv_warps_cover_every_input_block():
    from bitcompile.kernels.cuda import _gemv_warps

    for groups in range(1, 200):
        warps = _gemv_warps(groups)
        steps = -(-groups // warps)
        assert 1 <= warps <= 8 and steps * warps >= groups
        assert groups % warps == 0 or warps == min(4, groups)


def test_cuda_kv_cache_decodes_with_our_split_attention():
    """TIRPagedKVCache built for CUDA takes attention_cuda's decode kernel (two kernels: the key
    parts, then their merge); where ours does not apply (sliding window) TVM's stays."""
    import tvm
    from tvm.relax.frontend.nn.llm import kv_cache

    from bitcompile.kernels.attention_cuda import use_fast_cuda_attention

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with use_fast_cuda_attention():
        ours = kv_cache._attention_decode(5, 20, 128, "float16", False, {}, target).script()
        theirs = kv_cache._attention_decode(5, 20, 128, "float16", True, {}, target).script()
    assert '"partial"' in ours and '"merge"' in ours and "part_ml" in ours
    assert "part_ml" not in theirs
    assert kv_cache._attention_decode.__name__ == "_attention_decode"  # restored afterwards


def test_cuda_builds_without_fast_math(monkeypatch):
    """--use_fast_math moved activations across int8 rounding boundaries on the H100 (7e-3 logit error):
    compile_env turns it off for the build and restores the environment after."""
    import os

    import tvm

    from bitcompile.compiler.cuda import compile_env

    require(not cuda.missing_tools(), "needs nvcc and gcc on PATH")
    monkeypatch.delenv("TVM_CUDA_NVCC_NO_FAST_MATH", raising=False)
    with compile_env(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}), "cuda-sm90"):
        assert os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] == "1"
        assert os.environ["TVM_CUDA_COMPILE_MODE"] == "nvcc"
    assert "TVM_CUDA_NVCC_NO_FAST_MATH" not in os.environ


def test_bench_of_a_cuda_artifact_without_a_gpu_names_the_fix(cuda_build, capsys):
    from bitcompile.cli import main

    if device_present():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit):
        main(["bench", str(cuda_build("cuda-sm90"))])
    err = capsys.readouterr().err
    assert "compiled for target 'cuda-sm90' (NVIDIA GPU, sm_90)" in err and "--target host" in err


def test_gpu_bench_report_relates_speed_to_the_copy_bandwidth(cuda_build):
    """bench's GPU rows from one worker result: GB/s = bytes per token x tokens/s, as a fraction of
    the measured copy bandwidth; the ternary linears' GB/s from the manifest's weight bytes."""
    from bitcompile.runtime.artifact import read_manifest
    from bitcompile.tools.bench import format_table
    from bitcompile.tools.bench_gpu import gpu_report, ternary_weight_bytes

    manifest = read_manifest(cuda_build("cuda-sm90"))
    worker = {"prefill_tok_s": 6000.0, "decode_tok_s": 400.0, "ttft_s": 0.08, "peak_rss_mb": 900.0,
              "device_name": "GPU", "copy_gbps": 3000.0,
              "profile": {"kernels": {"ternary_matmul_kernel": {"us": 10.0, "calls": 4.0},
                                      "rms_norm_kernel": {"us": 5.0, "calls": 9.0}},
                          "host_api": {}, "host_issue_us": 2000.0, "step_us": 2100.0},
              "torch_bf16": {"eager_ms": 4.0, "graph_ms": 2.0, "bytes": 4e9}}
    report = gpu_report(worker, manifest, 9e8, {"head": "int8"})
    ours, graph, eager = report["runs"]
    assert ours["gbps"] == pytest.approx(9e8 * 400 / 1e9) and ours["floor_fraction"] == pytest.approx(0.12)
    assert graph["decode_tok_s"] == pytest.approx(500) and eager["decode_tok_s"] == pytest.approx(250)
    linears = report["kernels"][0]
    assert linears["gbps"] == pytest.approx(ternary_weight_bytes(manifest) / 10.0 / 1e3)
    table = format_table({**report, "prompt": 512, "gen": 128, "repeat": 3})
    assert "decode 0.80x torch bf16" in table and "decode 1.60x torch bf16" in table


def test_gpu_bench_runs_on_the_gpu(cuda_build):
    if not device_present():
        pytest.skip(NO_GPU)
    from bitcompile.tools.bench import run_bench

    report = run_bench(cuda_build("cuda-sm90"), [1], 16, 8, None, None, None, repeat=1, say=lambda *_: None)
    assert report["runs"][0]["decode_tok_s"] > 0 and report["bandwidth_gbps"] > 100
