"""Synthetic BitNet checkpoints in the exact Hugging Face layout: random ternary weights, a real BPE
tokenizer of the right vocabulary size. For tests (tiny) and benchmarks (the 2B4T shape: speed does
not depend on the weight values)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ..atomic import atomic_directory
from ..model.packing import pack_hf

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, rope_theta=10000.0),
    "small": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=256, rope_theta=10000.0),
    "2b4t": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                 num_key_value_heads=5, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
}
FORMATS = ("autobitlinear", "bitlinear", "online")


# The chat template of microsoft/bitnet-b1.58-2B-4T: "Role: content<|eot_id|>" turns after the BOS token,
# "Assistant: " as the generation prompt.
BITNET_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def _special_layout(vocab_size: int) -> tuple[int, int]:
    """(number of regular BPE tokens, number of special tokens) — LLaMA-3 style reserved block."""
    specials = 256 if vocab_size > 4096 else 3
    return vocab_size - specials, specials


def _special_names(specials: int) -> list[str]:
    """LLaMA-3's names: begin/end of text, then <|eot_id|> (at +9 in a full reserved block, as there)."""
    if specials < 10:
        return ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"][:specials]
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_{i}|>" for i in range(specials - 2)]
    names[9] = "<|eot_id|>"
    return names


def make_tokenizer(vocab_size: int) -> dict:
    """A byte-level BPE tokenizer.json with exactly vocab_size ids: 256 bytes, synthetic merges, specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    regular, specials = _special_layout(vocab_size)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    rng = np.random.default_rng(0)
    tokens = list(alphabet)
    while len(vocab) < regular:
        a = tokens[int(rng.integers(len(tokens)))]
        b = alphabet[int(rng.integers(len(alphabet)))]
        if a + b not in vocab and len(a + b) <= 8:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
            tokens.append(a + b)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_special_names(specials))
    return json.loads(tok.to_str())


def _ternary(rng, shape) -> np.ndarray:
    return rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=shape, p=[0.3, 0.4, 0.3])


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(ml_dtypes.bfloat16)


def make_config(preset: str, fmt: str) -> dict:
    p = PRESETS[preset]
    regular, _ = _special_layout(p["vocab_size"])
    return {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
        **p, "rms_norm_eps": 1e-5, "bos_token_id": regular, "eos_token_id": regular + 1,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "bitlinear" if fmt == "bitlinear" else "autobitlinear",
            "quantization_mode": "online" if fmt == "online" else "offline",
        },
    }


def _linear_tensors(rng, name: str, shape: tuple[int, int], fmt: str) -> dict:
    if fmt == "online":
        return {name + ".weight": _bf16(rng.standard_normal(shape, dtype=np.float32) * 0.02)}
    scale = np.float32(rng.uniform(0.01, 0.03))  # small: keeps random layers from amplifying int8 rounding flips
    stored = scale if fmt == "autobitlinear" else np.float32(1.0) / scale
    return {name + ".weight": pack_hf(_ternary(rng, shape)), name + ".weight_scale": _bf16(np.array([stored]))}


def make_tensors(cfg: dict, fmt: str, seed: int, progress=None) -> dict[str, np.ndarray]:
    from ..model.checkpoint import ATTN_PROJ, linear_shapes
    from ..model.config import parse_config

    mc = parse_config(cfg)
    rng = np.random.default_rng(seed)
    h, i = mc.hidden_size, mc.intermediate_size

    def norm(n):
        return _bf16(1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32))

    tensors = {
        "model.embed_tokens.weight": _bf16(rng.standard_normal((mc.vocab_size, h), dtype=np.float32)),
        "model.norm.weight": norm(h),
    }
    for layer in range(mc.num_hidden_layers):
        p = f"model.layers.{layer}."
        tensors |= {p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                    p + "self_attn.attn_sub_norm.weight": norm(h), p + "mlp.ffn_sub_norm.weight": norm(i)}
        for name, shape in linear_shapes(mc).items():
            module = "self_attn" if name in ATTN_PROJ else "mlp"
            tensors |= _linear_tensors(rng, f"{p}{module}.{name}", shape, fmt)
        if progress:
            progress(1)
    return tensors


def write_checkpoint(out: str | Path, preset: str = "tiny", fmt: str = "autobitlinear", seed: int = 0,
                     overwrite: bool = False, progress=None, tokenizer: str | Path | None = None) -> Path:
    """Write a random checkpoint directory (config.json, model.safetensors, tokenizer.json, and
    tokenizer_config.json with BitNet-2B-4T's chat template, generation_config.json).
    `tokenizer`: a tokenizer.json to copy instead of building one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg = make_config(preset, fmt)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(make_tensors(cfg, fmt, seed, progress), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is None:
            (tmp / "tokenizer.json").write_text(json.dumps(make_tokenizer(cfg["vocab_size"])))
        else:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": BITNET_CHAT_TEMPLATE}))
        regular, specials = _special_layout(cfg["vocab_size"])
        eot = regular + _special_names(specials).index("<|eot_id|>")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], eot], "do_sample": True,
             "temperature": 0.6, "top_p": 0.9}))
    return Path(out)
