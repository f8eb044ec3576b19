"""Checkpoint loading: both config spellings, the three weight formats, and every bad input named."""

import json
import shutil

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.model.config import CheckpointError
from bitcompile.model.packing import unpack_hf

Q = "model.layers.1.self_attn.q_proj"


@pytest.fixture
def ckpt_dir(checkpoints, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(checkpoints["autobitlinear"], d)
    return d


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_loads_packed_weights_with_both_scale_semantics(checkpoints):
    auto = load_checkpoint(checkpoints["autobitlinear"])
    bitl = load_checkpoint(checkpoints["bitlinear"])
    raw_auto = load_file(str(checkpoints["autobitlinear"] / "model.safetensors"))
    raw_bitl = load_file(str(checkpoints["bitlinear"] / "model.safetensors"))
    w = auto.layers[1].linears["q_proj"]
    np.testing.assert_array_equal(w.ternary(), unpack_hf(raw_auto[Q + ".weight"]))
    assert w.multiplier == np.float32(raw_auto[Q + ".weight_scale"].astype(np.float32)[0])  # multiply
    assert bitl.layers[1].linears["q_proj"].multiplier == pytest.approx(
        1.0 / raw_bitl[Q + ".weight_scale"].astype(np.float32)[0])  # divide


def test_online_master_weights_are_ternarized_at_load(checkpoints):
    ck = load_checkpoint(checkpoints["online"])
    raw = load_file(str(checkpoints["online"] / "model.safetensors"))[Q + ".weight"].astype(np.float32)
    scale = np.abs(raw).mean()
    w = ck.layers[1].linears["q_proj"]
    assert w.multiplier == pytest.approx(scale, rel=1e-6)
    np.testing.assert_array_equal(w.ternary(), np.clip(np.rint(raw / scale), -1, 1))


def test_rope_theta_in_both_spellings(ckpt_dir):
    edit_config(ckpt_dir, rope_theta=None, rope_parameters={"rope_theta": 123456.0, "rope_type": "default"})
    assert load_checkpoint(ckpt_dir).config.rope_theta == 123456.0
    edit_config(ckpt_dir, rope_parameters=None, rope_theta=777.0)
    assert load_checkpoint(ckpt_dir).config.rope_theta == 777.0
    edit_config(ckpt_dir, rope_theta=None)
    with pytest.raises(CheckpointError, match="missing 'rope_theta'"):
        load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unknown architecture.*LlamaForCausalLM"),
    ({"hidden_act": "silu"}, "'hidden_act' is 'silu'; expected one of 'relu2'"),
    ({"hidden_size": None}, "missing key 'hidden_size'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"quantization_config": {"quant_method": "gptq"}}, "'quantization_config.quant_method' is 'gptq'; expected one of 'bitnet'"),
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "fancy"}}, "'quantization_config.linear_class' is 'fancy'; expected one of 'autobitlinear', 'bitlinear'"),
    ({"rope_parameters": {"rope_theta": 1.0, "rope_type": "yarn"}}, "'rope_parameters.rope_type' is 'yarn'; expected one of 'default'"),
    ({"intermediate_size": 120}, "intermediate_size = 120 must be a multiple of 16"),
])
def test_bad_config_is_named(ckpt_dir, change, message):
    edit_config(ckpt_dir, **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt_dir)


def test_missing_tensor_is_named(ckpt_dir):
    edit_tensors(ckpt_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_checkpoint(ckpt_dir)


def test_wrong_shape_is_named(ckpt_dir):
    def shrink(t):
        t[Q + ".weight"] = t[Q + ".weight"][:-1]
    edit_tensors(ckpt_dir, shrink)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.q_proj.weight' has shape \[15, 64\], expected \[16, 64\]"):
        load_checkpoint(ckpt_dir)


def test_wrong_dtype_is_named(ckpt_dir):
    def to_int8(t):
        t[Q + ".weight"] = t[Q + ".weight"].astype(np.int8)
    edit_tensors(ckpt_dir, to_int8)
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.q_proj.weight' has dtype I8, expected U8"):
        load_checkpoint(ckpt_dir)


def test_packed_value_3_is_refused(ckpt_dir):
    def poison(t):
        t[Q + ".weight"][3, 7] = 0b00_11_00_00
    edit_tensors(ckpt_dir, poison)
    with pytest.raises(CheckpointError, match="q_proj.weight' contains the packed value 3"):
        load_checkpoint(ckpt_dir)


def test_bad_weight_scale_is_named(ckpt_dir):
    def zero(t):
        t[Q + ".weight_scale"] = np.zeros(1, dtype=ml_dtypes.bfloat16)
    edit_tensors(ckpt_dir, zero)
    with pytest.raises(CheckpointError, match="weight_scale' is 0.0, expected a positive finite scale"):
        load_checkpoint(ckpt_dir)


@pytest.mark.parametrize("name, message", [
    ("config.json", "no config.json"),
    ("model.safetensors", "no model.safetensors"),
    ("tokenizer.json", "no tokenizer.json"),
])
def test_missing_file_is_named(ckpt_dir, name, message):
    (ckpt_dir / name).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt_dir)


def test_garbage_files_are_named(ckpt_dir):
    (ckpt_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(ckpt_dir)
    (ckpt_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(ckpt_dir)
