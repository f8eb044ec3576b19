"""The compiled model against the numpy reference, and the KV-cache decode against full recompute."""

import json

import numpy as np
import pytest

import bitcompile
from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel

TOLERANCE = 1e-3  # of max|logit|


@pytest.mark.parametrize("fmt", ["autobitlinear", "bitlinear", "online"])
def test_compiled_logits_equal_reference(checkpoints, artifacts, fmt):
    engine = bitcompile.load(artifacts[fmt])
    ref = ReferenceModel(load_checkpoint(checkpoints[fmt]))
    ids = np.random.default_rng(7).integers(0, engine.config.vocab_size, 80).tolist()
    got, want = engine.logits(ids), ref.logits(ids)
    assert got.shape == (80, engine.config.vocab_size) and got.dtype == np.float32
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_prefill_in_chunks_equals_one_prefill(artifacts):
    ids = np.random.default_rng(3).integers(0, 384, 70).tolist()
    whole = bitcompile.load(artifacts["autobitlinear"]).logits(ids)
    chunked = bitcompile.load(artifacts["autobitlinear"], prefill_chunk=16).logits(ids)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4 * np.abs(whole).max())


def test_greedy_decode_through_kv_cache_equals_full_recompute(engine):
    prompt = engine.encode("The quick brown fox")
    steps = 40
    ids = list(prompt)
    for _ in range(steps):  # full recompute: a fresh prefill of the whole sequence every step
        token = int(np.argmax(engine.logits(ids)[-1]))
        if token in engine.config.eos_token_ids:
            break
        ids.append(token)
    assert len(ids) - len(prompt) >= 32
    cached = "".join(engine.stream(prompt, max_new_tokens=steps, temperature=0))
    assert cached == engine.decode(ids[len(prompt):])


def test_greedy_tokens_equal_reference_greedy(checkpoints, engine):
    ref = ReferenceModel(load_checkpoint(checkpoints["autobitlinear"]))
    prompt = engine.encode("ROMEO:")
    want = ref.greedy(prompt, 12)[len(prompt):]
    assert engine.generate(prompt, max_new_tokens=12, temperature=0) == engine.decode(want)


@pytest.mark.parametrize("head", ["int8", "q4", "f32"])
def test_head_options_equal_reference_with_that_head(checkpoints, tmp_path, head):
    art = bitcompile.compile(checkpoints["autobitlinear"], output=tmp_path / f"{head}.bitc", progress=False, head=head)
    engine = bitcompile.load(art)
    assert engine.manifest["weights"]["head"] == head
    ck = load_checkpoint(checkpoints["autobitlinear"])
    ids = np.random.default_rng(11).integers(0, engine.config.vocab_size, 40).tolist()
    want = ReferenceModel(ck, head=head).logits(ids)
    assert np.abs(engine.logits(ids) - want).max() <= TOLERANCE * np.abs(want).max()


def test_int8_head_error_against_f32_head_stays_small(checkpoints):
    """The cost of the int8 head (int8 rows x int8 activations), stated: <= 1% of max|logit|
    (measured 0.2-0.5% on random tiny and small checkpoints)."""
    ck = load_checkpoint(checkpoints["autobitlinear"])
    ids = np.random.default_rng(12).integers(0, ck.config.vocab_size, 40).tolist()
    exact = ReferenceModel(ck, head="f32").logits(ids)
    err = np.abs(ReferenceModel(ck, head="int8").logits(ids) - exact).max() / np.abs(exact).max()
    assert 0 < err <= 1e-2


def test_q4_head_error_against_f32_head_is_stated(checkpoints):
    """The cost of the 4-bit head (groups of 32, f16 scales, int8 activations), stated: <= 8% of
    max|logit| (measured 4.4-5.3% on random tiny, 2.2-2.6% on random small checkpoints: Gaussian
    rows are the worst case for absmax/7 steps)."""
    ck = load_checkpoint(checkpoints["autobitlinear"])
    ids = np.random.default_rng(12).integers(0, ck.config.vocab_size, 40).tolist()
    exact = ReferenceModel(ck, head="f32").logits(ids)
    err = np.abs(ReferenceModel(ck, head="q4").logits(ids) - exact).max() / np.abs(exact).max()
    assert 0 < err <= 8e-2


def test_f16_kv_cache_error_is_stated(checkpoints, tmp_path):
    """The cost of storing q, k and v in f16 (all three attention kernels: prefill in chunks of 16 runs
    the ragged and the paged prefill kernel, then decode steps), stated: <= 0.5% of max|logit|
    (measured 0.14% on the random tiny checkpoint)."""
    art = bitcompile.compile(checkpoints["autobitlinear"], output=tmp_path / "f16.bitc", progress=False, kv_cache="f16")
    engine = bitcompile.load(art, prefill_chunk=16)
    ids = np.random.default_rng(21).integers(0, engine.config.vocab_size, 60).tolist()
    want = ReferenceModel(load_checkpoint(checkpoints["autobitlinear"])).logits(ids)
    scale = np.abs(want).max()
    prefill_err = np.abs(engine.logits(ids) - want).max() / scale
    engine.prefill(ids[:40])
    decode_err = max(np.abs(engine.step(t) - want[i]).max() / scale for i, t in enumerate(ids[40:], start=40))
    assert 0 < prefill_err <= 5e-3 and 0 < decode_err <= 5e-3
    assert json.loads((art / "manifest.json").read_text())["weights"]["kv_cache"] == "f16"


def test_avx2_target_runs_without_avx512_and_equals_reference(checkpoints, tmp_path):
    """The x86-64-avx2 preset (no VNNI: the portable ternary schedule) runs on this AVX-512 host, so its
    logits can be checked here; its code must not touch a 512-bit register."""
    import subprocess

    art = bitcompile.compile(checkpoints["autobitlinear"], target="x86-64-avx2", output=tmp_path / "avx2.bitc",
                             progress=False)
    code = subprocess.run(["objdump", "-d", str(art / "model.so")], capture_output=True, text=True, check=True).stdout
    assert "ymm" in code and "zmm" not in code and "vpdpbusd" not in code
    engine = bitcompile.load(art)
    ids = np.random.default_rng(5).integers(0, engine.config.vocab_size, 40).tolist()
    want = ReferenceModel(load_checkpoint(checkpoints["autobitlinear"])).logits(ids)
    assert np.abs(engine.logits(ids) - want).max() <= TOLERANCE * np.abs(want).max()
