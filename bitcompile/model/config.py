"""ModelConfig: the architecture of a BitNet b1.58 model, parsed and validated from config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint (config.json, model.safetensors, tokenizer.json) is missing or malformed."""


LINEAR_CLASSES = ("autobitlinear", "bitlinear")
QUANTIZATION_MODES = ("offline", "online")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool
    linear_class: str  # "autobitlinear": y *= weight_scale; "bitlinear": y /= weight_scale
    quantization_mode: str  # "offline": packed uint8 weights; "online": float master weights

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def fused_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(rows, inputs) of the ternary matrices a layer multiplies, fused as model.py fuses them."""
        h = self.hidden_size
        return {"qkv": (self.q_size + 2 * self.kv_size, h), "o": (h, self.q_size),
                "gate_up": (2 * self.intermediate_size, h), "down": (h, self.intermediate_size)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)


def _require(raw: dict, key: str, kind: type, where: str):
    if key not in raw:
        raise CheckpointError(f"{where}: missing key '{key}'")
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CheckpointError(f"{where}: '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CheckpointError(f"{where}: '{key}' must be a number, got {value!r}")
    if kind in (int, float) and value <= 0:
        raise CheckpointError(f"{where}: '{key}' must be positive, got {value!r}")
    return value


def _rope_theta(raw: dict, where: str) -> float:
    # Older transformers write rope_theta; newer ones write rope_parameters = {"rope_theta": …, "rope_type": …}.
    params = raw.get("rope_parameters") or {}
    if params:
        rope_type = params.get("rope_type", "default")
        if rope_type != "default":
            raise CheckpointError(f"{where}: rope_parameters.rope_type '{rope_type}' is not supported (only 'default')")
        if "rope_theta" in params:
            return float(_require(params, "rope_theta", float, f"{where} rope_parameters"))
    if raw.get("rope_scaling"):
        raise CheckpointError(f"{where}: rope_scaling {raw['rope_scaling']!r} is not supported")
    if "rope_theta" in raw:
        return float(_require(raw, "rope_theta", float, where))
    raise CheckpointError(f"{where}: missing 'rope_theta' (or 'rope_parameters.rope_theta')")


def _quantization(raw: dict, where: str) -> tuple[str, str]:
    q = raw.get("quantization_config")
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: missing 'quantization_config' (expected quant_method 'bitnet')")
    if q.get("quant_method") != "bitnet":
        raise CheckpointError(f"{where}: quantization_config.quant_method is {q.get('quant_method')!r}, expected 'bitnet'")
    linear_class = q.get("linear_class", "bitlinear")
    if linear_class not in LINEAR_CLASSES:
        raise CheckpointError(
            f"{where}: quantization_config.linear_class {linear_class!r} is unknown, expected one of {LINEAR_CLASSES}"
        )
    mode = q.get("quantization_mode", "offline")
    if mode not in QUANTIZATION_MODES:
        raise CheckpointError(
            f"{where}: quantization_config.quantization_mode {mode!r} is unknown, expected one of {QUANTIZATION_MODES}"
        )
    return linear_class, mode


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    archs = raw.get("architectures") or []
    if "BitNetForCausalLM" not in archs and raw.get("model_type") != "bitnet":
        raise CheckpointError(
            f"{where}: unknown architecture {archs or raw.get('model_type')!r}, expected 'BitNetForCausalLM' (model_type 'bitnet')"
        )
    act = raw.get("hidden_act", "relu2")
    if act != "relu2":
        raise CheckpointError(f"{where}: hidden_act {act!r} is not supported, expected 'relu2'")
    hidden = _require(raw, "hidden_size", int, where)
    heads = _require(raw, "num_attention_heads", int, where)
    kv_heads = raw.get("num_key_value_heads", heads)
    head_dim = raw.get("head_dim") or hidden // heads
    if hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim % 2:
        raise CheckpointError(f"{where}: head_dim {head_dim} must be even for rotary embeddings")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    linear_class, mode = _quantization(raw, where)
    return ModelConfig(
        vocab_size=_require(raw, "vocab_size", int, where),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size", int, where),
        num_hidden_layers=_require(raw, "num_hidden_layers", int, where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(raw, where),
        max_position_embeddings=_require(raw, "max_position_embeddings", int, where),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        linear_class=linear_class,
        quantization_mode=mode,
    )


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face BitNet checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, str(path))
