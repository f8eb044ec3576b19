"""Property-based tests (hypothesis) of everything bitcompile parses: config.json's keys, the
safetensors header, an artifact's manifest.json, any file replaced by random bytes, and the numbers
a user passes to generate/stream. Each example ends in a successful load that says what was written,
or in the project's own error type naming the file or the value: never another exception, never a hang.

CI runs a fixed, bounded number of examples (derandomized); run many more locally with
BITCOMPILE_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py.
"""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitcompile
from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.model.config import CheckpointError, load_config
from bitcompile.runtime.artifact import ArtifactError

EXAMPLES = int(os.environ.get("BITCOMPILE_FUZZ_EXAMPLES", "30"))
# CI: the same examples every run; a local run with BITCOMPILE_FUZZ_EXAMPLES explores new ones
FUZZ = settings(max_examples=EXAMPLES, derandomize="BITCOMPILE_FUZZ_EXAMPLES" not in os.environ, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8,
)
# each config key whose value lands in a ModelConfig field as it was written
FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
          "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
          "num_key_value_heads": "num_key_value_heads", "max_position_embeddings": "max_position_embeddings",
          "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "bos_token_id": "bos_token_id",
          "tie_word_embeddings": "tie_word_embeddings", "head_dim": "head_dim"}
KEYS = sorted(FIELDS) + ["eos_token_id", "model_type", "architectures", "hidden_act", "quantization_config",
                         "rope_parameters", "rope_scaling"]


@pytest.fixture(scope="module")
def checkpoint(checkpoints, tmp_path_factory):
    return checkpoints["autobitlinear"]


def _copy(src: Path, root: Path) -> Path:
    dst = root / "copy"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@FUZZ
@given(key=st.sampled_from(KEYS), value=JSON_VALUES | st.integers(0, 600) | st.sampled_from([True, False, 1e-6, 0.0]))
def test_any_config_value_loads_as_written_or_is_refused_by_name(checkpoint, tmp_path_factory, key, value):
    path = _copy(checkpoint, tmp_path_factory.getbasetemp() / "cfg")
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    try:
        cfg = load_config(path)
    except CheckpointError as e:
        assert str(path / "config.json") in str(e)
        return
    if key in FIELDS and value is not None:
        got = getattr(cfg, FIELDS[key])
        assert got == value and type(got) is (float if key in ("rms_norm_eps", "rope_theta") else type(value))
    if key == "eos_token_id":
        assert cfg.eos_token_ids == (tuple(value) if isinstance(value, list) else (value,))
    try:
        load_checkpoint(path)  # the tensors must fit the config too
    except CheckpointError as e:
        assert str(path) in str(e) or "config.json" in str(e)


@pytest.mark.parametrize("value, message", [
    ([], r"'rms_norm_eps' is \[\]; expected a finite positive number"),
    ("x", "'rms_norm_eps' is 'x'; expected a finite positive number"),
    (True, "'rms_norm_eps' is True; expected a finite positive number"),
])
def test_rms_norm_eps_of_the_wrong_type_is_named(checkpoint, tmp_path, value, message):
    _check_refused(checkpoint, tmp_path, "rms_norm_eps", value, message)


@pytest.mark.parametrize("key, value, message", [
    ("tie_word_embeddings", "x", "'tie_word_embeddings' is 'x'; expected true or false"),
    ("tie_word_embeddings", 1000000000, "'tie_word_embeddings' is 1000000000; expected true or false"),
    ("tie_word_embeddings", -1, "'tie_word_embeddings' is -1; expected true or false"),
    ("eos_token_id", True, r"'eos_token_id' is True; expected a token id or a non-empty list of token ids in 0\.\.383"),
    ("eos_token_id", -1, "'eos_token_id' is -1; expected a token id"),
    ("eos_token_id", {}, r"'eos_token_id' is \{\}; expected a token id"),
    ("eos_token_id", None, "'eos_token_id' is None; expected a token id"),
    ("eos_token_id", 384, r"'eos_token_id' is 384; expected a token id or a non-empty list of token ids in 0\.\.383"),
    ("bos_token_id", "x", r"'bos_token_id' is 'x'; expected an integer in 0\.\.383"),
    ("model_type", {}, r"'model_type' is \{\}; expected a string"),
    ("hidden_size", True, "'hidden_size' is True; expected an integer >= 1"),
    ("rope_theta", float("inf"), "'rope_theta' is inf; expected a finite positive number"),
])
def test_wrong_types_are_refused_with_file_key_value_and_expectation(checkpoint, tmp_path, key, value, message):
    _check_refused(checkpoint, tmp_path, key, value, message)


def _check_refused(checkpoint, tmp_path, key, value, message):
    path = _copy(checkpoint, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as e:
        load_config(path)
    assert str(path / "config.json") in str(e.value)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_mutated_safetensors_header_is_refused_by_name_or_harmless(checkpoint, tmp_path_factory, edits):
    path = _copy(checkpoint, tmp_path_factory.getbasetemp() / "st")
    data = bytearray((path / "model.safetensors").read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    for at, byte in edits:
        data[at % header] = byte
    (path / "model.safetensors").write_bytes(bytes(data))
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert "model.safetensors" in str(e) or str(path) in str(e)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3))
def test_a_mutated_manifest_is_refused_before_loading(artifacts, tmp_path_factory, edits):
    art = _copy(artifacts["autobitlinear"], tmp_path_factory.getbasetemp() / "man")
    data = bytearray((art / "manifest.json").read_bytes())
    for at, byte in edits:
        data[at % len(data)] = byte
    if bytes(data) == (artifacts["autobitlinear"] / "manifest.json").read_bytes():
        return
    (art / "manifest.json").write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as e:
        bitcompile.load(art)
    assert str(art) in str(e.value)


CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json"]
ARTIFACT_FILES = ["manifest.json", "model.so", "params.bin", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json"]


@FUZZ
@given(name=st.sampled_from(CHECKPOINT_FILES), junk=st.binary(max_size=300))
def test_random_bytes_in_place_of_a_checkpoint_file(checkpoint, tmp_path_factory, name, junk):
    path = _copy(checkpoint, tmp_path_factory.getbasetemp() / "junk")
    (path / name).write_bytes(junk)
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert name in str(e)
        return
    # only an empty JSON object may pass, as a tokenizer or generation config without settings
    assert name.endswith("_config.json") and json.loads(junk) == {}


@FUZZ
@given(name=st.sampled_from(ARTIFACT_FILES), junk=st.binary(max_size=300))
def test_random_bytes_in_place_of_an_artifact_file(artifacts, tmp_path_factory, name, junk):
    art = _copy(artifacts["autobitlinear"], tmp_path_factory.getbasetemp() / "ajunk")
    (art / name).write_bytes(junk)
    with pytest.raises(ArtifactError) as e:
        bitcompile.load(art)
    assert name in str(e.value) or "manifest" in str(e.value)


NUMBERS = (st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4) | st.none()
           | st.lists(st.integers(0, 5), max_size=2))
ARGS = ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"]


@FUZZ
@given(arg=st.sampled_from(ARGS), value=NUMBERS)
def test_generate_takes_a_value_or_refuses_it_by_name(engine, arg, value):
    kwargs = {"max_new_tokens": 4, "temperature": 0.5, arg: value}
    if arg == "max_new_tokens" and isinstance(value, int) and not isinstance(value, bool):
        kwargs[arg] = min(value, 8) if value >= 0 else value  # a huge count is valid: keep the run short
    try:
        text = engine.generate("hi", **kwargs)
    except ValueError as e:
        assert f"invalid {arg}=" in str(e)
        return
    assert isinstance(text, str)
    if isinstance(value, float) and not math.isfinite(value):
        assert arg == "stop", f"{arg}={value} was taken"
