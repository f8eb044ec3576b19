"""BitNet b1.58 as a Relax graph (tvm.relax.frontend.nn), read top to bottom like the architecture.

Differences from Llama that matter: ternary linears with per-token int8 activations, a sub-norm before
o_proj and before down_proj, relu² on the gate. q/k/v share one ternary kernel (and one activation
quantization), as do gate/up; their per-tensor scales become per-row multipliers.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from ..kernels import ternary
from ..kernels.attention_cpu import use_fast_cpu_attention
from ..kernels.attention_cuda import use_fast_cuda_attention
from .config import ModelConfig
from .head import padded_vocab
from .packing import BLOCK_COLS, BLOCK_ROWS

# set while an entry point of several rows is traced: (kind, row tile) for its ternary linears.
# kind "batch" (batch_decode: one row per sequence) is tuned apart from prefill's (None)
SEVERAL_ROWS: contextvars.ContextVar[tuple[str | None, int] | None] = contextvars.ContextVar("several_rows",
                                                                                           default=None)


def quantize(x: Tensor):
    """Per-token absmax int8: (x_q, 127 / max|x|, sum(x_q))."""
    return op.tensor_expr_op(ternary.quantize_activations, "quantize_activations", [x],
                             attrs=ternary.op_attrs("quantize_activations"))


class QuantizingRMSNorm(nn.Module):
    """RMSNorm whose output only feeds a ternary linear: returns that linear's int8 input
    (x_q, scale, sum(x_q)) computed in one operator, with the input's leading shape."""

    def __init__(self, hidden_size: int, eps: float):
        self.eps = eps
        self.weight = nn.Parameter((hidden_size,), "float32")

    def forward(self, x: Tensor):
        *lead, k = x.shape
        quantized = op.tensor_expr_op(ternary.rms_norm_quantize, "rms_norm_quantize",
                                      [op.reshape(x, (-1, k)), self.weight, self.eps],
                                      attrs=ternary.op_attrs("rms_norm_quantize"))
        return quantized, lead


class TernaryLinear(nn.Module):
    """y = ternary(x_q . T^T) / s * multiplier; T stays 2-bit packed (b16x16 layout) in memory.
    x: float activations, or a QuantizingRMSNorm's output (already int8)."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter((out_features // BLOCK_ROWS, in_features // BLOCK_COLS, 64), "uint8")
        self.multiplier = nn.Parameter((out_features,), "float32")

    def forward(self, x) -> Tensor:
        if isinstance(x, tuple):
            (xq, scale, xsum), lead = x
        else:
            *lead, k = x.shape
            xq, scale, xsum = quantize(op.reshape(x, (-1, k)))
        kind, tile = SEVERAL_ROWS.get() or (None, ternary.M_TILE)
        matmul = functools.partial(ternary.ternary_matmul, row_tile=tile)
        y = op.tensor_expr_op(matmul, "ternary_matmul", [xq, scale, xsum, self.weight, self.multiplier],
                              attrs=ternary.op_attrs("ternary_matmul", kind, tile))
        return op.reshape(y, (*lead, self.out_features))


class BF16Embedding(nn.Module):
    """Token embedding (and tied lm_head) as bf16 bit patterns: exact, half the bytes of f32.

    The graph takes the prompt's rows, not its ids: the runtime reads those few rows of the table from
    the parameter file itself (runtime.Engine._embedding_rows). A gather from the memory-mapped table
    would make the kernel map 64 KB around every row it touches (fault-around), tens of MB of RSS
    for the ~5 KB rows a prompt needs."""

    def __init__(self, vocab_size: int, hidden_size: int):
        self.weight = nn.Parameter((vocab_size, hidden_size), "uint16")

    def forward(self, rows: Tensor) -> Tensor:
        b, s, h = rows.shape
        x = op.tensor_expr_op(ternary.embedding_bf16, "embedding", [op.reshape(rows, (-1, h))],
                              attrs=ternary.op_attrs("embedding"))
        return op.reshape(x, (b, s, h))

    def lm_head(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        logits = op.tensor_expr_op(ternary.lm_head_bf16, "lm_head", [op.reshape(x, (-1, h)), self.weight],
                                   attrs=ternary.op_attrs("lm_head"))
        return op.reshape(logits, (b, s, -1))


class LMHead(nn.Module):
    """A separate output head: int8 rows + per-row scale, bf16 (untied models) or f32 (see model/head.py)."""

    def __init__(self, vocab_size: int, hidden_size: int, kind: str):
        self.kind = kind
        self.vocab_size = vocab_size
        if kind == "int8":
            self.weight = nn.Parameter((padded_vocab(vocab_size) // 16, hidden_size // 4, 64), "uint8")
            self.scale = nn.Parameter((vocab_size,), "float32")
        elif kind == "q4":
            self.weight = nn.Parameter((padded_vocab(vocab_size) // 16, hidden_size // 8, 64), "uint8")
            self.scale = nn.Parameter((padded_vocab(vocab_size) // 16, hidden_size // 32, 16), "float16")
        else:
            self.weight = nn.Parameter((vocab_size, hidden_size), "uint16" if kind == "bf16" else "float32")

    def forward(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        x2 = op.reshape(x, (-1, h))
        if self.kind == "int8":
            xq, scale, xsum = quantize(x2)
            logits = op.tensor_expr_op(ternary.lm_head_int8, "lm_head_int8",
                                       [xq, scale, xsum, self.weight, self.scale],
                                       attrs=ternary.op_attrs("lm_head_int8"))
        elif self.kind == "q4":
            xq, scale, _ = quantize(x2)
            logits = op.tensor_expr_op(ternary.lm_head_q4, "lm_head_q4",
                                       [xq, scale, self.weight, self.scale, self.vocab_size],
                                       attrs=ternary.op_attrs("lm_head_q4"))
        else:
            fn = ternary.lm_head_bf16 if self.kind == "bf16" else ternary.lm_head_f32
            logits = op.tensor_expr_op(fn, "lm_head", [x2, self.weight], attrs=ternary.op_attrs("lm_head"))
        return op.reshape(logits, (b, s, -1))


class BitNetAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, kv_dtype: str = "float32"):
        self.cfg, self.kv_dtype = cfg, kv_dtype
        self.qkv_proj = TernaryLinear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size)
        self.attn_sub_norm = QuantizingRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.o_proj = TernaryLinear(cfg.q_size, cfg.hidden_size)

    def forward(self, x, cache: PagedKVCache, layer_id: int) -> Tensor:
        """x: the input norm's quantized output (QuantizingRMSNorm)."""
        cfg = self.cfg
        qkv = self.qkv_proj(x)
        b, s, _ = qkv.shape
        qkv = op.reshape(qkv, (b, s, cfg.num_attention_heads + 2 * cfg.num_key_value_heads, cfg.head_dim))
        # RoPE (rotate-half) is applied to q and k inside the cache's attention, before k is stored.
        # The cache stores (and attention reads) kv_dtype; everything around it stays float32.
        qkv = qkv.astype(self.kv_dtype) if self.kv_dtype != "float32" else qkv
        a = cache.attention_with_fused_qkv(layer_id, qkv, cfg.num_attention_heads, sm_scale=cfg.head_dim**-0.5)
        a = op.reshape(a.astype("float32") if self.kv_dtype != "float32" else a, (b, s, cfg.q_size))
        return self.o_proj(self.attn_sub_norm(a))


class BitNetMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = TernaryLinear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.ffn_sub_norm = QuantizingRMSNorm(cfg.intermediate_size, cfg.rms_norm_eps)
        self.down_proj = TernaryLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x) -> Tensor:
        """x: the post-attention norm's quantized output (QuantizingRMSNorm)."""
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        gate = op.relu(gate)
        return self.down_proj(self.ffn_sub_norm(gate * gate * up))


class BitNetBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, kv_dtype: str = "float32"):
        self.input_layernorm = QuantizingRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = BitNetAttention(cfg, kv_dtype)
        self.post_attention_layernorm = QuantizingRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = BitNetMLP(cfg)

    def forward(self, h: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cache, layer_id)
        return h + self.mlp(self.post_attention_layernorm(h))


class BitNetForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, target, head: str = "bf16", kv_dtype: str = "float32"):
        self.cfg, self.target, self.kv_dtype = cfg, target, kv_dtype
        self.embed_tokens = BF16Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([BitNetBlock(cfg, kv_dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False)
        self.shares_embedding = cfg.tie_word_embeddings and head == "bf16"
        if not self.shares_embedding:
            self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, head)

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.embed_tokens.lm_head(hidden) if self.shares_embedding else self.lm_head(hidden)

    def _hidden(self, rows: Tensor, cache: PagedKVCache) -> Tensor:
        h = self.embed_tokens(rows)
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, cache, layer_id)
        return self.norm(h)

    @contextlib.contextmanager
    def _several_rows(self, kind: str | None):
        """Trace an entry point whose linears see a dynamic number of rows, padded to tiles: CPUs pad
        to multiples of ternary.CPU_ROW_TILE, CUDA to its token tiles (M_TILE)."""
        tile = ternary.M_TILE if self.target.kind.name == "cuda" else ternary.CPU_ROW_TILE
        marker = SEVERAL_ROWS.set((kind, tile))
        try:
            yield
        finally:
            SEVERAL_ROWS.reset(marker)

    def prefill(self, token_rows: Tensor, cache: PagedKVCache):
        """Final hidden states of every prompt position (logits come from `head`). token_rows: the
        tokens' embedding rows, bf16 bits [1, seq_len, hidden]."""
        with self._several_rows(None):
            return self._hidden(token_rows, cache), cache

    def decode(self, token_rows: Tensor, cache: PagedKVCache):
        return self._logits(self._hidden(token_rows, cache)), cache

    def batch_decode(self, token_rows: Tensor, cache: PagedKVCache):
        """One new token for each of B sequences (the cache's begin_forward names them, lengths 1):
        token_rows [B, 1, hidden] -> logits [B, 1, vocab]. The linears see B rows, so each weight
        block is read once for all of them; their kernels are tuned for a few rows (op_attrs)."""
        with self._several_rows("batch"):
            return self._logits(self._hidden(token_rows, cache)), cache

    def batch_prefill(self, token_rows: Tensor, logit_positions: Tensor, cache: PagedKVCache):
        """Chunks of several sequences, concatenated (token_rows [1, n, hidden]; begin_forward gives
        each sequence's length): logits [1, b, vocab] only at the b positions asked for."""
        with self._several_rows(None):
            hidden = self._hidden(token_rows, cache)

        def gather(x, positions):
            return te.compute((1, positions.shape[0], x.shape[2]), lambda _, i, j: x[0, positions[i], j],
                              name="logit_rows")

        return self._logits(op.tensor_expr_op(gather, "logit_rows", [hidden, logit_positions])), cache

    def head(self, hidden: Tensor) -> Tensor:
        return self._logits(hidden)

    def head_last(self, hidden: Tensor) -> Tensor:
        def last_position(x):
            b, s, h = x.shape
            return te.compute((b, 1, h), lambda i, _, j: x[i, s - 1, j], name="last_position")

        return self._logits(op.tensor_expr_op(last_position, "last_position", [hidden]))

    def create_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                        page_size: tirx.Var, support_sliding_window: tirx.Var) -> PagedKVCache:
        kind = self.target.kind.name
        fast_kernels = (use_fast_cpu_attention() if kind == "llvm" else use_fast_cuda_attention() if kind == "cuda"
                        else contextlib.nullcontext())
        with fast_kernels:
            return self._paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                        support_sliding_window)

    def _paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window):
        cfg = self.cfg
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, cfg.num_hidden_layers]), num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
            qk_head_dim=cfg.head_dim, v_head_dim=cfg.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=cfg.rope_theta, rope_scaling={},
            rope_ext_factors=rx.prim_value(0), rotary_dim=cfg.head_dim, enable_disaggregation=False,
            dtype=self.kv_dtype, target=self.target,
        )

    def spec(self) -> nn.spec.ModuleSpec:
        h = self.cfg.hidden_size
        packed = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        return nn.spec.ModuleSpec.from_raw({
            "prefill": {"token_rows": nn.spec.Tensor([1, "seq_len", h], "uint16"), "cache": cache, "$": packed},
            "decode": {"token_rows": nn.spec.Tensor([1, 1, h], "uint16"), "cache": cache, "$": packed},
            "batch_decode": {"token_rows": nn.spec.Tensor(["batch", 1, h], "uint16"), "cache": cache, "$": packed},
            "batch_prefill": {"token_rows": nn.spec.Tensor([1, "seq_len", h], "uint16"),
                              "logit_positions": nn.spec.Tensor(["batch"], "int32"), "cache": cache, "$": packed},
            "head": {"hidden": nn.spec.Tensor([1, "n", h], "float32"), "$": packed},
            "head_last": {"hidden": nn.spec.Tensor([1, "seq_len", h], "float32"), "$": packed},
            "create_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }, self)
