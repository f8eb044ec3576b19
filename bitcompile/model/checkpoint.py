"""Load a Hugging Face BitNet b1.58 checkpoint directory: the only place checkpoint formats are parsed.

Every weight is checked (present, dtype, shape, valid codes) before anything is built from it.
Ternary weights stay 2-bit packed (HF layout) here; the multiplier folds the linear_class semantics:
y = (x_q . T^T) / s * multiplier, with multiplier = weight_scale ("autobitlinear") or 1/weight_scale
("bitlinear"), or mean|W| for float master weights ("online").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from .config import CheckpointError, ModelConfig, load_config
from .packing import pack_hf, ternarize, unpack_hf

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
FLOAT_DTYPES = {"BF16", "F16", "F32"}


@dataclasses.dataclass
class TernaryWeight:
    packed: np.ndarray  # uint8 [N/4, K], Hugging Face packing
    multiplier: np.float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0] * 4, self.packed.shape[1]

    def ternary(self) -> np.ndarray:
        return unpack_hf(self.packed)


@dataclasses.dataclass
class LayerWeights:
    input_norm: np.ndarray
    post_attention_norm: np.ndarray
    attn_sub_norm: np.ndarray
    ffn_sub_norm: np.ndarray
    linears: dict[str, TernaryWeight]  # q_proj … down_proj


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    embed: np.ndarray  # bfloat16 [V, H]
    final_norm: np.ndarray  # float32 [H]
    layers: list[LayerWeights]
    lm_head: np.ndarray | None  # bfloat16 [V, H], None when tied to embed
    tokenizer_path: Path
    model_dir: Path

    @property
    def head(self) -> np.ndarray:
        return self.embed if self.lm_head is None else self.lm_head


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (cfg.q_size, h),
        "k_proj": (cfg.kv_size, h),
        "v_proj": (cfg.kv_size, h),
        "o_proj": (h, cfg.q_size),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def _module(name: str) -> str:
    return "self_attn" if name in ATTN_PROJ else "mlp"


class _TensorFile:
    """Tensors of model.safetensors (or a sharded index), checked by name, dtype and shape."""

    def __init__(self, model_dir: Path):
        single = model_dir / "model.safetensors"
        index = model_dir / "model.safetensors.index.json"
        if single.is_file():
            shards = {None: single}
        elif index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = {name: model_dir / f for name, f in weight_map.items()}
        else:
            raise CheckpointError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json)")
        self.where = str(single if None in shards else index)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        for path in set(shards.values()):
            if not path.is_file():
                raise CheckpointError(f"{model_dir}: shard {path.name} named in {index.name} is missing")
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
            self._handles[path] = handle
            for name in handle.keys():
                self._file_of[name] = path

    def get(self, name: str, dtypes: set[str], shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._file_of:
            raise CheckpointError(f"{self.where}: missing tensor '{name}'")
        handle = self._handles[self._file_of[name]]
        try:
            meta = handle.get_slice(name)
            dtype, got_shape = meta.get_dtype(), tuple(meta.get_shape())
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{self._file_of[name]}: tensor '{name}' cannot be read ({e})") from None
        if dtype not in dtypes:
            raise CheckpointError(f"{self.where}: tensor '{name}' has dtype {dtype}, expected {' or '.join(sorted(dtypes))}")
        if got_shape != tuple(shape):
            raise CheckpointError(f"{self.where}: tensor '{name}' has shape {list(got_shape)}, expected {list(shape)}")
        try:
            return handle.get_tensor(name)
        except Exception as e:  # a header whose offsets do not fit the file
            raise CheckpointError(f"{self._file_of[name]}: tensor '{name}' cannot be read ({e})") from None

    def has(self, name: str) -> bool:
        return name in self._file_of


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float32))


def _scalar_scale(t: np.ndarray, name: str, where: str) -> np.float32:
    value = np.float32(t.astype(np.float32).reshape(-1)[0])
    if not np.isfinite(value) or value <= 0:
        raise CheckpointError(f"{where}: tensor '{name}' is {value}, expected a positive finite scale")
    return value


def _load_ternary(tf: _TensorFile, cfg: ModelConfig, name: str, shape: tuple[int, int]) -> TernaryWeight:
    n, k = shape
    if cfg.quantization_mode == "online":
        ternary, scale = ternarize(tf.get(name + ".weight", FLOAT_DTYPES, (n, k)))
        return TernaryWeight(pack_hf(ternary), scale)
    packed = tf.get(name + ".weight", {"U8"}, (n // 4, k))
    if ((packed & 0x55) & (packed >> 1)).any():  # any 2-bit field equal to 3
        raise CheckpointError(f"{tf.where}: tensor '{name}.weight' contains the packed value 3 (valid codes are 0, 1, 2)")
    scale = _scalar_scale(tf.get(name + ".weight_scale", FLOAT_DTYPES, (1,)), name + ".weight_scale", tf.where)
    multiplier = scale if cfg.linear_class == "autobitlinear" else np.float32(1.0) / scale
    return TernaryWeight(np.ascontiguousarray(packed), np.float32(multiplier))


def _to_bf16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x if x.dtype == ml_dtypes.bfloat16 else x.astype(np.float32).astype(ml_dtypes.bfloat16))


def _check_divisible(cfg: ModelConfig, where: Path):
    for name, value in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size),
                        ("num_key_value_heads * head_dim", cfg.kv_size),
                        ("num_attention_heads * head_dim", cfg.q_size)):
        if value % 16:
            raise CheckpointError(f"{where}: {name} = {value} must be a multiple of 16 for the ternary kernels")


def load_checkpoint(model_dir: str | Path, progress=None) -> Checkpoint:
    """Read and validate a checkpoint directory. `progress(n)` is called once per layer loaded."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (expected a Hugging Face BitNet checkpoint)")
    cfg = load_config(model_dir)
    _check_divisible(cfg, model_dir / "config.json")
    _check_chat_files(model_dir, cfg)
    tokenizer_path = model_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.json (the tokenizer is part of the checkpoint)")
    tf = _TensorFile(model_dir)
    h, v = cfg.hidden_size, cfg.vocab_size
    embed = _to_bf16(tf.get("model.embed_tokens.weight", FLOAT_DTYPES, (v, h)))
    final_norm = _f32(tf.get("model.norm.weight", FLOAT_DTYPES, (h,)))
    lm_head = None
    if not cfg.tie_word_embeddings:
        lm_head = _to_bf16(tf.get("lm_head.weight", FLOAT_DTYPES, (v, h)))
    layers = []
    shapes = linear_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            input_norm=_f32(tf.get(p + "input_layernorm.weight", FLOAT_DTYPES, (h,))),
            post_attention_norm=_f32(tf.get(p + "post_attention_layernorm.weight", FLOAT_DTYPES, (h,))),
            attn_sub_norm=_f32(tf.get(p + "self_attn.attn_sub_norm.weight", FLOAT_DTYPES, (h,))),
            ffn_sub_norm=_f32(tf.get(p + "mlp.ffn_sub_norm.weight", FLOAT_DTYPES, (cfg.intermediate_size,))),
            linears={n: _load_ternary(tf, cfg, f"{p}{_module(n)}.{n}", s) for n, s in shapes.items()},
        ))
        if progress:
            progress(1)
    _check_tokenizer(tokenizer_path, cfg)
    return Checkpoint(cfg, embed, final_norm, layers, lm_head, tokenizer_path, model_dir)


def _check_chat_files(model_dir: Path, cfg: ModelConfig):
    """tokenizer_config.json (the chat template) and generation_config.json, as the runtime reads them."""
    from ..runtime.chat import ChatError, ChatTemplate, generation_defaults

    try:
        ChatTemplate.from_dir(model_dir)
        generation_defaults(model_dir, cfg.vocab_size)
    except ChatError as e:
        raise CheckpointError(str(e)) from None


def _check_tokenizer(path: Path, cfg: ModelConfig):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid Hugging Face tokenizer ({e})") from None
    if tok.get_vocab_size(with_added_tokens=True) > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, "
            f"more than the model's vocab_size {cfg.vocab_size}"
        )
