"""ModelConfig: the architecture of a BitNet b1.58 model, parsed and validated from config.json.

Every key is checked for its type and range: integers are integers (not `true`), booleans are
booleans, eps and theta are finite positive numbers, token ids lie inside the vocabulary,
`eos_token_id` is an id or a list of ids; each refusal names the file, the key, the value and what
was expected. Keys a checkpoint may leave out take Hugging Face's BitNet defaults (OPTIONAL).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint (config.json, model.safetensors, tokenizer.json) is missing or malformed."""


LINEAR_CLASSES = ("autobitlinear", "bitlinear")
QUANTIZATION_MODES = ("offline", "online")
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")
# What a config.json may leave out, and what it then means (transformers' BitNetConfig, and the
# 2B-4T checkpoint's layout). num_key_value_heads and head_dim default to values derived from others.
OPTIONAL = {"hidden_act": "relu2", "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": None,
            "eos_token_id": None}


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
        """(rows, inputs) of the ternary matrices a layer multiplies, fused as model/bitnet.py fuses them."""
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


class _Reader:
    """Typed reads of one JSON object; errors name the file and the key."""

    def __init__(self, raw: dict, where: str, prefix: str = ""):
        self.raw, self.where, self.prefix = raw, where, prefix

    def fail(self, key: str, value, expected: str):
        raise CheckpointError(f"{self.where}: '{self.prefix}{key}' is {value!r}; expected {expected}")

    def get(self, key: str, default=None):
        if key not in self.raw:
            if key in REQUIRED:
                raise CheckpointError(f"{self.where}: missing key '{self.prefix}{key}'")
            return default
        return self.raw[key]

    def integer(self, key: str, default=None, low: int = 1, high: int | None = None, optional: bool = False):
        value = self.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            self.fail(key, value, f"an integer {span}")
        return value

    def number(self, key: str, default=None) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.fail(key, value, "a finite positive number")
        return float(value)

    def boolean(self, key: str, default=None) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "true or false")
        return value

    def choice(self, key: str, default, choices) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or value not in choices:
            self.fail(key, value, f"one of {', '.join(map(repr, choices))}")
        return value

    def token_ids(self, key: str, vocab: int) -> tuple[int, ...]:
        value = self.get(key)
        ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)):
            self.fail(key, value, f"a token id or a non-empty list of token ids in 0..{vocab - 1}")
        return tuple(ids)


def _rope_theta(r: _Reader) -> float:
    # Older transformers write rope_theta; newer ones write rope_parameters = {"rope_theta": …, "rope_type": …}.
    params = r.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        r.fail("rope_parameters", params, "an object")
    if params:
        p = _Reader(params, r.where, "rope_parameters.")
        p.choice("rope_type", "default", ("default",))
        if "rope_theta" in params:
            return p.number("rope_theta")
    if r.get("rope_scaling"):
        raise CheckpointError(f"{r.where}: rope_scaling {r.raw['rope_scaling']!r} is not supported")
    if "rope_theta" in r.raw:
        return r.number("rope_theta")
    raise CheckpointError(f"{r.where}: missing 'rope_theta' (or 'rope_parameters.rope_theta')")


def _quantization(r: _Reader) -> tuple[str, str]:
    q = r.get("quantization_config")
    if not isinstance(q, dict):
        r.fail("quantization_config", q, "an object with quant_method 'bitnet'")
    qr = _Reader(q, r.where, "quantization_config.")
    qr.choice("quant_method", None, ("bitnet",))
    return qr.choice("linear_class", "bitlinear", LINEAR_CLASSES), qr.choice("quantization_mode", "offline",
                                                                            QUANTIZATION_MODES)


def _architecture(r: _Reader):
    archs = r.get("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        r.fail("architectures", archs, "a list of class names such as ['BitNetForCausalLM']")
    model_type = r.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        r.fail("model_type", model_type, "a string ('bitnet')")
    if "BitNetForCausalLM" not in archs and model_type != "bitnet":
        raise CheckpointError(f"{r.where}: unknown architecture {archs or model_type!r}, expected "
                              "'BitNetForCausalLM' (model_type 'bitnet')")


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    r = _Reader(raw, where)
    _architecture(r)
    r.choice("hidden_act", OPTIONAL["hidden_act"], ("relu2",))
    vocab = r.integer("vocab_size")
    hidden = r.integer("hidden_size")
    heads = r.integer("num_attention_heads")
    kv_heads = r.integer("num_key_value_heads", heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if "head_dim" not in raw and hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = r.integer("head_dim", hidden // heads, optional=True) or hidden // heads
    if head_dim % 2:
        r.fail("head_dim", head_dim, "an even number (rotary embeddings rotate pairs)")
    eos = raw.get("eos_token_id")
    linear_class, mode = _quantization(r)
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=r.integer("intermediate_size"),
        num_hidden_layers=r.integer("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.number("rms_norm_eps", OPTIONAL["rms_norm_eps"]),
        rope_theta=_rope_theta(r),
        max_position_embeddings=r.integer("max_position_embeddings"),
        bos_token_id=r.integer("bos_token_id", None, 0, vocab - 1, optional=True),
        eos_token_ids=r.token_ids("eos_token_id", vocab) if eos is not None or "eos_token_id" in raw else (),
        tie_word_embeddings=r.boolean("tie_word_embeddings", OPTIONAL["tie_word_embeddings"]),
        linear_class=linear_class,
        quantization_mode=mode,
    )


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (expected a Hugging Face BitNet checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, str(path))
