"""CPU attention kernels for TVM's paged KV cache: parallel over heads, vectorized over head_dim.

TIRPagedKVCache's own CPU kernels are serial loop nests (one query head after another, one key at a
time, scalar over head_dim): at a 1024-token context they cost more than all the ternary matmuls.
These keep the exact call signatures (the cache calls them through its function table) and the
softmax-state convention (scores in log2 units, lse = m + log2(sum)), and work in chunks of 16 keys:
16 dot products, one max and one rescale per chunk, P·V accumulated 16 lanes at a time.

RoPE: our cache runs in RopeMode.NORMAL, where q and k are rotated before they reach the kernel
(rotary_mode == 0); these kernels do not implement on-the-fly rotation and the graph never asks
for it.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

CHUNK = 16
LOG2E = math.log2(math.exp(1))
NEG = -5e4


def _attend_macro(D: int, page_size: int, paged: bool, dtype: str = "float32"):
    """The loop every kernel shares: one query row of one head against its first n_keys keys, keys in
    chunks of 16 (16 dot products in 16-lane partials, one max and one rescale per chunk, P.V
    16 lanes at a time). Keys come from the pages (paged) or from ragged k/v tensors. q, k, v and the
    output are `dtype` (float32 or float16); the arithmetic is float32."""
    lanes = 16 if D % 16 == 0 else 1

    def f32(value):
        return T.Cast("float32", value) if dtype != "float32" else value

    @T.macro
    def attend(q, keys, values, output, lse, row, h, hk, n_keys, first, page_values, sm_scale):
        acc = T.sblock_alloc_buffer((D,), "float32")
        part = T.sblock_alloc_buffer((lanes,), "float32")
        S = T.sblock_alloc_buffer((CHUNK,), "float32")
        st = T.sblock_alloc_buffer((3,), "float32")  # running max, running sum, chunk max
        for d in T.vectorized(D):
            acc[d] = T.float32(0)
        st[0] = T.float32(NEG)
        st[1] = T.float32(0)
        for c in T.serial((n_keys + CHUNK - 1) // CHUNK):
            st[2] = st[0]
            for t in T.serial(CHUNK):
                if c * CHUNK + t < n_keys:
                    for l in T.vectorized(lanes):
                        part[l] = T.float32(0)
                    for d0 in T.serial(D // lanes):
                        for l in T.vectorized(lanes):
                            if paged:
                                part[l] = part[l] + f32(q[row, h, d0 * lanes + l]) * f32(keys[
                                    page_values[first + (c * CHUNK + t) // page_size], 0, hk,
                                    (c * CHUNK + t) % page_size, d0 * lanes + l])
                            else:
                                part[l] = part[l] + f32(q[row, h, d0 * lanes + l]) * f32(
                                    keys[first + c * CHUNK + t, hk, d0 * lanes + l])
                    S[t] = T.float32(0)
                    for l in T.serial(lanes):
                        S[t] = S[t] + part[l]
                    S[t] = S[t] * sm_scale * T.float32(LOG2E)
                    st[2] = T.max(st[2], S[t])
                else:
                    S[t] = T.float32(NEG)
            alpha: T.let[T.float32] = T.exp2(st[0] - st[2])
            st[0] = st[2]
            st[1] = st[1] * alpha
            for d in T.vectorized(D):
                acc[d] = acc[d] * alpha
            for t in T.serial(CHUNK):
                if c * CHUNK + t < n_keys:
                    p: T.let[T.float32] = T.exp2(S[t] - st[0])
                    st[1] = st[1] + p
                    for d in T.vectorized(D):
                        if paged:
                            acc[d] = acc[d] + p * f32(values[page_values[first + (c * CHUNK + t) // page_size], 1,
                                                             hk, (c * CHUNK + t) % page_size, d])
                        else:
                            acc[d] = acc[d] + p * f32(values[first + c * CHUNK + t, hk, d])
        for d in T.vectorized(D):
            output[row, h, d] = T.Cast(dtype, acc[d] / T.max(st[1], T.float32(1e-30)))
        lse[row, h] = st[0] + T.log2(T.max(st[1], T.float32(1e-30)))

    return attend


def _paged_keys(page_begin, page_end, last_len, page_size: int):
    """Keys held by a sequence's pages: full pages plus the used part of the last one."""
    return T.if_then_else(page_begin != page_end, (page_end - page_begin - 1) * page_size + last_len, 0)


def attention_decode_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, sliding_window: bool,
                         rope_scaling: dict, page_size: int = 16):
    if sliding_window or dtype not in ("float32", "float16"):
        raise NotImplementedError("bitcompile's CPU decode attention supports float32/16 without sliding window")
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    group = H_qo // H_kv
    attend = _attend_macro(D, page_size, paged=True, dtype=dtype)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv_cpu"})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_off = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, page_size, D), dtype)
        page_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_off)
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_off)
        k_rope_pos = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_off)
        q_rope_pos = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")

        assert rotary_mode == 0, "bitcompile decode attention expects pre-rotated q/k"
        for bh in T.parallel(B * H_qo):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                b: T.let[T.int32] = bh // H_qo
                h: T.let[T.int32] = bh % H_qo
                n_keys: T.let[T.int32] = _paged_keys(page_indptr[b], page_indptr[b + 1], length_info[b], page_size)
                attend(Q, pages, pages, output, lse, b, h, h // group, n_keys, page_indptr[b], page_values, sm_scale)

    return batch_decode_paged_kv_cpu


def attention_prefill_ragged_cpu(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str, rope_scaling: dict):
    if dtype not in ("float32", "float16") or d_qk != d_v:
        raise NotImplementedError("bitcompile's CPU prefill attention supports float32/16 with d_qk == d_v")
    D = d_qk
    group = h_q // h_kv
    attend = _attend_macro(D, 0, paged=False, dtype=dtype)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
        var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_prefill_ragged_kv"})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_off = T.int32()
        kv_indptr_off = T.int32()
        q_rope_off = T.int32()
        k_rope_off = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        k = T.match_buffer(var_k, (kv_len, h_kv, D), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_off)
        q_rope_pos = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_off)
        k_rope_pos = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_off)
        output = T.match_buffer(var_output, (qo_len, h_q, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        assert rotary_mode == 0, "bitcompile prefill attention expects pre-rotated q/k"
        for b in T.serial(batch_size):
            for ih in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_q):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    i: T.let[T.int32] = ih // h_q
                    n_kv: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    n_keys: T.let[T.int32] = T.if_then_else(causal > 0, T.min(n_kv, i + 1 + n_kv - n_q), n_kv)
                    attend(q, k, v, output, lse, q_indptr[b] + i, ih % h_q, ih % h_q // group, n_keys,
                           kv_indptr[b], q_indptr, sm_scale)

    return batch_prefill_ragged_kv


def attention_prefill_paged_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling: dict,
                                page_size: int = 16, sliding_window_size: int = 1024):
    if sliding_window or dtype not in ("float32", "float16"):
        raise NotImplementedError("bitcompile's CPU prefill attention supports float32/16 without sliding window")
    D = d
    group = h_q // h_kv
    attend = _attend_macro(D, page_size, paged=True, dtype=dtype)

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
        var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
        causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_prefill_paged_kv_cpu"})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_off = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_off = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_off)
        k_rope_pos = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_off)
        q_rope_pos = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(var_output, (total_len, h_q, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        assert rotary_mode == 0, "bitcompile prefill attention expects pre-rotated q/k"
        for b in T.serial(batch_size):
            for ih in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_q):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    i: T.let[T.int32] = ih // h_q
                    n_kv: T.let[T.int32] = _paged_keys(page_indptr[b], page_indptr[b + 1], length_info[b], page_size)
                    n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    n_keys: T.let[T.int32] = T.if_then_else(causal > 0, T.min(n_kv, i + 1 + n_kv - n_q), n_kv)
                    attend(q, pages, pages, output, lse, q_indptr[b] + i, ih % h_q, ih % h_q // group, n_keys,
                           page_indptr[b], page_values, sm_scale)

    return batch_prefill_paged_kv_cpu


def use_fast_cpu_attention():
    """Context manager: a TIRPagedKVCache built inside it uses these kernels for its CPU attention
    (the sliding-window variants, which our models never call, keep TVM's own kernels)."""
    import contextlib

    from tvm.relax.frontend.nn.llm import kv_cache

    names = ("_attention_decode_cpu", "_attention_prefill_cpu", "_attention_prefill_ragged_cpu")
    ours = (attention_decode_cpu, attention_prefill_paged_cpu, attention_prefill_ragged_cpu)

    def with_fallback(mine, theirs):
        def make(*args, **kwargs):
            sliding = kwargs.get("sliding_window", args[4] if len(args) > 4 and isinstance(args[4], bool) else False)
            return theirs(*args, **kwargs) if sliding else mine(*args, **kwargs)
        return make

    @contextlib.contextmanager
    def swapped():
        saved = [getattr(kv_cache, n) for n in names]
        for name, mine, theirs in zip(names, ours, saved):
            setattr(kv_cache, name, with_fallback(mine, theirs))
        try:
            yield
        finally:
            for name, fn in zip(names, saved):
                setattr(kv_cache, name, fn)

    return swapped()
