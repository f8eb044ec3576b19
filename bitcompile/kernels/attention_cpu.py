"""CPU attention kernels for TVM's paged KV cache: parallel over heads, vectorized over head_dim.

TIRPagedKVCache's own CPU kernels are serial loop nests (one query head after another, one key at a
time, scalar over head_dim): at a 1024-token context they cost more than all the ternary matmuls.
These keep the exact call signatures (the cache calls them through its function table) and the
softmax-state convention (scores in log2 units, lse = m + log2(sum)), and work in chunks of 16 keys:
16 dot products, one max and one rescale per chunk, P·V accumulated 16 lanes at a time.

RoPE: our cache runs in RopeMode.NORMAL, where q and k are rotated before they reach the kernel
(rotary_mode == 0); these kernels do not implement on-the-fly rotation and the graph never asks
for it. The rotation itself is `rope_cpu`, replacing TVM's fused_rope, which calls powf and sincosf
for every element of every head (3840 of each per layer and token for the 2B shape, one thread
in decode); ours computes the 64 cos/sin pairs of a position once and applies them to all heads.
"""

from __future__ import annotations

import math

import numpy as np
from tvm.script import tirx as T

CHUNK = 16
LOG2E = math.log2(math.exp(1))
NEG = -5e4


def _exp2_coefficients(degree: int = 6) -> list[float]:
    """2**f on [0, 1) as a polynomial (Chebyshev fit, relative error 1e-7: float32 rounding level)."""
    f = np.linspace(0.0, 1.0, 4097)
    fit = np.polynomial.Chebyshev.fit(f, np.exp2(f), degree).convert(kind=np.polynomial.Polynomial)
    return [float(c) for c in fit.coef]


EXP2_COEFFICIENTS = _exp2_coefficients()


def _exp2(x):
    """2**x for x <= 0 as float32 arithmetic LLVM vectorizes (llvm.exp2 on a vector becomes one libm call
    per lane): the polynomial of the fraction times 2**floor(x) built in the exponent bits."""
    x = T.max(x, T.float32(-126.0))
    whole = T.floor(x)
    frac = x - whole
    poly = T.float32(EXP2_COEFFICIENTS[-1])
    for c in reversed(EXP2_COEFFICIENTS[:-1]):
        poly = poly * frac + T.float32(c)
    return poly * T.reinterpret("float32", T.shift_left(T.Cast("int32", whole) + 127, 23))


def _attend_macro(D: int, page_size: int, paged: bool, dtype: str = "float32", pair: bool = False,
                  prefetch: bool = False):
    """The loop every kernel shares: one query row of head h (and h + 1 when `pair`: two heads of one
    kv head, so each key and value is loaded and converted once for both; measured 1.3-1.5x faster
    decode attention) against its first n_keys keys, in chunks of 16. Per key, a 16-lane dot product
    summed as a tree (a serial sum of the lanes is a 15-add dependency chain); per chunk, one max, one
    rescale, the 16 exponentials as one vector polynomial (no libm call, so nothing spills), then P.V
    16 lanes at a time. Keys come from the pages (paged) or from ragged k/v tensors. q, k, v and the
    output are `dtype` (float32 or float16); the arithmetic is float32. Every buffer is one head's and
    under 1 KB: TVM keeps those on the stack, where LLVM holds them in registers and knows they do not
    alias the cache (larger ones come from TVM's workspace pool and run slower).

    prefetch (paged): while key/value row t of a chunk is used, row t of the next chunk's page is
    prefetched into L2. In a batched decode step the cache is cold (the weights streamed through
    since the layer's last step) and each page starts a new stream the hardware prefetcher has not
    seen. 30 layers of 192-token sequences, 2 threads, Zen 4: 8 of them 8.3 -> 5.9 ms, 16 of them
    16.6 -> 10.7 ms. Prefetching into L1 instead (prefetcht0) gained a third as much: its few
    outstanding misses per core, not the memory, set the pace. With `next_hk` (>= 0) the task hands
    off instead: its rows are already in L2, so it prefetches kv head next_hk's rows of the sequence
    whose pages start at next_first, which the next task reads; DRAM then streams during the hot pass
    too (16 sequences of 192: 11.2 -> 9.5 ms; 8: 5.8 -> 4.9)."""
    lanes = 16 if D % 16 == 0 else 1
    if paged and page_size % CHUNK:
        raise NotImplementedError(f"page size {page_size} is not a multiple of {CHUNK}")

    def f32(value):
        return T.Cast("float32", value) if dtype != "float32" else value

    def key(keys, page, hk, pos, d):
        return f32(keys[page, 0, hk, pos, d]) if paged else f32(keys[pos, hk, d])

    def value(values, page, hk, pos, d):
        return f32(values[page, 1, hk, pos, d]) if paged else f32(values[pos, hk, d])

    per_line = 64 // (2 if dtype == "float16" else 4)  # elements in a 64-byte cache line

    @T.macro
    def prefetch_row(pages, page, kv, hk, pos):
        for line in T.unroll(D // per_line):  # (read, into L2 and beyond: prefetcht1, data)
            T.evaluate(T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id("llvm.prefetch"),
                                          T.address_of(pages[page, kv, hk, pos, line * per_line]), 0, 2, 1))

    @T.macro
    def init(q, qf, acc, st, row, h, sm_scale):
        for d in T.vectorized(D):
            qf[d] = f32(q[row, h, d]) * sm_scale * T.float32(LOG2E)
            acc[d] = T.float32(0)
        st[0] = T.float32(NEG)  # running max, running sum, this chunk's max
        st[1] = T.float32(0)

    @T.macro
    def score(qf, part, S, st, keys, page, hk, pos, t):
        for l in T.vectorized(lanes):
            part[l] = T.float32(0)
        for d0 in T.unroll(D // lanes):
            for l in T.vectorized(lanes):
                part[l] = part[l] + qf[d0 * lanes + l] * key(keys, page, hk, pos, d0 * lanes + l)
        if lanes == 16:
            for l in T.vectorized(8):
                part[l] = part[l] + part[l + 8]
            for l in T.vectorized(4):
                part[l] = part[l] + part[l + 4]
            S[t] = (part[0] + part[2]) + (part[1] + part[3])
        else:
            S[t] = part[0]
        st[2] = T.max(st[2], S[t])

    @T.macro
    def rescale(acc, S, st):
        alpha: T.let[T.float32] = _exp2(st[0] - st[2])
        st[0] = st[2]
        st[1] = st[1] * alpha
        for d in T.vectorized(D):
            acc[d] = acc[d] * alpha
        for t in T.vectorized(CHUNK):
            S[t] = _exp2(S[t] - st[0])

    @T.macro
    def finish(output, lse, acc, st, row, h):
        for d in T.vectorized(D):
            output[row, h, d] = T.Cast(dtype, acc[d] / T.max(st[1], T.float32(1e-30)))
        lse[row, h] = st[0] + T.log2(T.max(st[1], T.float32(1e-30)))

    @T.macro
    def attend(q, keys, values, output, lse, row, h, hk, n_keys, first, page_values, sm_scale, next_hk=-1,
               next_first=0, next_pages=0):
        qf0 = T.sblock_alloc_buffer((D,), "float32")
        acc0 = T.sblock_alloc_buffer((D,), "float32")
        part0 = T.sblock_alloc_buffer((lanes,), "float32")
        S0 = T.sblock_alloc_buffer((CHUNK,), "float32")
        st0 = T.sblock_alloc_buffer((3,), "float32")
        init(q, qf0, acc0, st0, row, h, sm_scale)
        if pair:
            qf1 = T.sblock_alloc_buffer((D,), "float32")
            acc1 = T.sblock_alloc_buffer((D,), "float32")
            part1 = T.sblock_alloc_buffer((lanes,), "float32")
            S1 = T.sblock_alloc_buffer((CHUNK,), "float32")
            st1 = T.sblock_alloc_buffer((3,), "float32")
            init(q, qf1, acc1, st1, row, h + 1, sm_scale)
        for c in T.serial((n_keys + CHUNK - 1) // CHUNK):
            page: T.let[T.int32] = page_values[first + c * CHUNK // page_size] if paged else 0
            base: T.let[T.int32] = c * CHUNK % page_size if paged else first + c * CHUNK
            # where the next chunk starts (the last chunk's own start again: a harmless prefetch)
            ahead: T.let[T.int32] = T.min((c + 1) * CHUNK, n_keys - 1) // CHUNK * CHUNK
            # a GQA group's last pair finds its rows in L2 (the group's first pair read them): it prefetches
            # the rows the next task reads instead, kv head next_hk of the sequence whose pages start at
            # next_first, at this chunk's position (while that sequence has a page there)
            hand_off: T.let[T.bool] = T.And(next_hk >= 0, c * CHUNK // page_size < next_pages) if prefetch else False
            next_page: T.let[T.int32] = T.if_then_else(hand_off, page_values[next_first + c * CHUNK // page_size],
                                                       page_values[first + ahead // page_size]) if prefetch else 0
            next_base: T.let[T.int32] = T.if_then_else(hand_off, base, ahead % page_size) if prefetch else 0
            fetch_hk: T.let[T.int32] = T.if_then_else(hand_off, next_hk, hk)
            st0[2] = st0[0]
            if pair:
                st1[2] = st1[0]
            for t in T.serial(CHUNK):
                if c * CHUNK + t < n_keys:
                    score(qf0, part0, S0, st0, keys, page, hk, base + t, t)
                    if prefetch:
                        prefetch_row(keys, next_page, 0, fetch_hk, next_base + t)
                    if pair:
                        score(qf1, part1, S1, st1, keys, page, hk, base + t, t)
                else:
                    S0[t] = T.float32(NEG)
                    if pair:
                        S1[t] = T.float32(NEG)
            rescale(acc0, S0, st0)
            if pair:
                rescale(acc1, S1, st1)
            for t in T.serial(CHUNK):
                if c * CHUNK + t < n_keys:
                    st0[1] = st0[1] + S0[t]
                    if prefetch:
                        prefetch_row(values, next_page, 1, fetch_hk, next_base + t)
                    if pair:
                        st1[1] = st1[1] + S1[t]
                    for d in T.vectorized(D):
                        acc0[d] = acc0[d] + S0[t] * value(values, page, hk, base + t, d)
                        if pair:
                            acc1[d] = acc1[d] + S1[t] * value(values, page, hk, base + t, d)
        finish(output, lse, acc0, st0, row, h)
        if pair:
            finish(output, lse, acc1, st1, row, h + 1)

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
    heads = 2 if group % 2 == 0 else 1  # pairs of a GQA group share each key load; 2 threads stay busy
    attend = _attend_macro(D, page_size, paged=True, dtype=dtype, pair=heads == 2, prefetch=True)
    last_pair = group - heads if group > heads else -1  # a group of one pair reads its own rows cold: no hand-off

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
        for bh in T.parallel(B * H_qo // heads):
            with T.sblock("attn"):
                T.reads()
                T.writes()
                b: T.let[T.int32] = bh // (H_qo // heads)
                h: T.let[T.int32] = bh % (H_qo // heads) * heads
                n_keys: T.let[T.int32] = _paged_keys(page_indptr[b], page_indptr[b + 1], length_info[b], page_size)
                # the last pair of a group hands off to the next kv head: this sequence's, or after its last
                # one the next sequence's first. Its own rows are in L2 only if the group's first pair ran on
                # this core: the thread pool gives each thread a contiguous range of tasks, which splits
                # groups only at odd boundaries, and for one sequence (10 tasks, 5 a thread) always did
                # (decode of one sequence: 0.84 -> 0.93 ms, so it keeps its own prefetch)
                last_kv: T.let[T.bool] = h // group + 1 == H_kv
                next_b: T.let[T.int32] = T.if_then_else(last_kv, b + 1, b)
                next_hk: T.let[T.int32] = T.if_then_else(h % group == last_pair and next_b < B and B > 1,
                                                         T.if_then_else(last_kv, 0, h // group + 1), -1)
                target: T.let[T.int32] = T.min(next_b, B - 1)  # in range; past the last, next_hk is -1
                attend(Q, pages, pages, output, lse, b, h, h // group, n_keys, page_indptr[b], page_values, sm_scale,
                       next_hk, page_indptr[target], page_indptr[target + 1] - page_indptr[target])

    return batch_decode_paged_kv_cpu


def attention_prefill_ragged_cpu(h_kv: int, h_q: int, d_qk: int, d_v: int, dtype: str, rope_scaling: dict):
    if dtype not in ("float32", "float16") or d_qk != d_v:
        raise NotImplementedError("bitcompile's CPU prefill attention supports float32/16 with d_qk == d_v")
    D = d_qk
    group = h_q // h_kv
    heads = 2 if group % 2 == 0 else 1  # pairs of a GQA group share each key load
    attend = _attend_macro(D, 0, paged=False, dtype=dtype, pair=heads == 2)

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
            for ih in T.parallel((q_indptr[b + 1] - q_indptr[b]) * (h_q // heads)):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    i: T.let[T.int32] = ih // (h_q // heads)
                    h: T.let[T.int32] = ih % (h_q // heads) * heads
                    n_kv: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                    n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    n_keys: T.let[T.int32] = T.if_then_else(causal > 0, T.min(n_kv, i + 1 + n_kv - n_q), n_kv)
                    attend(q, k, v, output, lse, q_indptr[b] + i, h, h // group, n_keys,
                           kv_indptr[b], q_indptr, sm_scale)

    return batch_prefill_ragged_kv


def attention_prefill_paged_cpu(h_kv: int, h_q: int, d: int, dtype: str, sliding_window: bool, rope_scaling: dict,
                                page_size: int = 16, sliding_window_size: int = 1024):
    if sliding_window or dtype not in ("float32", "float16"):
        raise NotImplementedError("bitcompile's CPU prefill attention supports float32/16 without sliding window")
    D = d
    group = h_q // h_kv
    heads = 2 if group % 2 == 0 else 1  # pairs of a GQA group share each key load
    attend = _attend_macro(D, page_size, paged=True, dtype=dtype, pair=heads == 2)

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
            for ih in T.parallel((q_indptr[b + 1] - q_indptr[b]) * (h_q // heads)):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    i: T.let[T.int32] = ih // (h_q // heads)
                    h: T.let[T.int32] = ih % (h_q // heads) * heads
                    n_kv: T.let[T.int32] = _paged_keys(page_indptr[b], page_indptr[b + 1], length_info[b], page_size)
                    n_q: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                    n_keys: T.let[T.int32] = T.if_then_else(causal > 0, T.min(n_kv, i + 1 + n_kv - n_q), n_kv)
                    attend(q, pages, pages, output, lse, q_indptr[b] + i, h, h // group, n_keys,
                           page_indptr[b], page_values, sm_scale)

    return batch_prefill_paged_kv_cpu


def rope_cpu(theta: float, scale: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str,
             rope_scaling: dict, rotary_dim: int | None = None):
    """TVM's fused_rope (llama_rope_with_position_map, rotate-half, default scaling) with the same
    signature and the same float32 formulas: split fused qkv [s, q+2kv heads, D] into q, k (rotated
    by position_map[s]) and v. Parallel over positions; per position the D/2 frequencies' cos/sin are
    computed once, then every head is rotated with vector arithmetic."""
    if rope_scaling.get("rope_type", "default") != "default" or (rotary_dim or head_dim) != head_dim or head_dim % 2:
        raise NotImplementedError("bitcompile's CPU RoPE supports full-width rotate-half RoPE without scaling")
    D, half = head_dim, head_dim // 2
    fused = num_q_heads + 2 * num_kv_heads

    @T.macro
    def rotate(qkv, out, s, h, oh, cs, apply_rope):
        for d in T.vectorized(half):
            lo: T.let[T.float32] = T.Cast("float32", qkv[s, h, d])
            hi: T.let[T.float32] = T.Cast("float32", qkv[s, h, d + half])
            out[s, oh, d] = T.if_then_else(apply_rope > 0, T.Cast(dtype, cs[0, d] * lo - cs[1, d] * hi), qkv[s, h, d])
            out[s, oh, d + half] = T.if_then_else(apply_rope > 0, T.Cast(dtype, cs[0, d] * hi + cs[1, d] * lo),
                                                  qkv[s, h, d + half])

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused, D), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, D), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, D), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, D), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        for s in T.parallel(seq_len):
            with T.sblock("rope"):
                T.reads()
                T.writes()
                cs = T.sblock_alloc_buffer((2, half), "float32")
                for d in T.serial(half):
                    freq: T.let[T.float32] = T.Cast("float32", position_map[s]) * T.float32(scale) / T.pow(
                        T.float32(theta), T.Cast("float32", d * 2) / T.float32(D))
                    cs[0, d] = T.cos(freq)
                    cs[1, d] = T.sin(freq)
                for h in T.serial(num_q_heads):
                    rotate(qkv, q, s, h, h, cs, apply_rope)
                for h in T.serial(num_kv_heads):
                    rotate(qkv, k, s, num_q_heads + h, h, cs, apply_rope)
                    for d in T.vectorized(D):
                        v[s, h, d] = qkv[s, num_q_heads + num_kv_heads + h, d]

    return fused_rope


def merge_state_cpu(v_dtype: str):
    """TVM's merge_state_inplace_cpu (combine two partial attention results by their log2-sum-exp
    states: V = V*a + V_other*b, S = log2(2^S + 2^S_other)) with the same formulas, parallel over
    (token, head) and vectorized over head_dim; TVM's is one serial scalar loop over all of it,
    which prefill calls once per layer."""

    def blend(V, V_other, n, h, d, scale, other_scale):
        return T.Cast(v_dtype, T.Cast("float32", V[n, h, d]) * scale + T.Cast("float32", V_other[n, h, d]) * other_scale)

    @T.prim_func(s_tir=True)
    def merge_state_inplace_cpu(v: T.handle, s: T.handle, v_other: T.handle, s_other: T.handle):
        T.func_attr({"tirx.is_scheduled": True})
        N = T.int32()
        H = T.int32()
        D = T.int32()
        V = T.match_buffer(v, (N, H, D), v_dtype)
        S = T.match_buffer(s, (N, H), "float32")
        V_other = T.match_buffer(v_other, (N, H, D), v_dtype)
        S_other = T.match_buffer(s_other, (N, H), "float32")
        for nh in T.parallel(N * H):
            with T.sblock("merge"):
                T.reads()
                T.writes()
                n: T.let[T.int32] = nh // H
                h: T.let[T.int32] = nh % H
                s_max: T.let[T.float32] = T.max(S[n, h], S_other[n, h])
                mine: T.let[T.float32] = T.exp2(S[n, h] - s_max)
                other: T.let[T.float32] = T.exp2(S_other[n, h] - s_max)
                scale: T.let[T.float32] = mine / (mine + other)
                other_scale: T.let[T.float32] = other / (mine + other)
                for d0 in T.serial(D // 16):
                    for l in T.vectorized(16):
                        V[n, h, d0 * 16 + l] = blend(V, V_other, n, h, d0 * 16 + l, scale, other_scale)
                for d in T.serial(D % 16):  # head_dim's remainder past whole vectors
                    V[n, h, D // 16 * 16 + d] = blend(V, V_other, n, h, D // 16 * 16 + d, scale, other_scale)
                S[n, h] = T.log2(mine + other) + s_max

    return merge_state_inplace_cpu


def use_fast_cpu_attention():
    """Context manager: a TIRPagedKVCache built inside it uses these kernels for its CPU attention,
    state merging and RoPE (where ours raise NotImplementedError — sliding windows, RoPE scaling,
    which our models never use — TVM's own kernels are kept)."""
    return swap_kv_cache_kernels({
        "_attention_decode_cpu": attention_decode_cpu, "_attention_prefill_cpu": attention_prefill_paged_cpu,
        "_attention_prefill_ragged_cpu": attention_prefill_ragged_cpu, "llama_rope_with_position_map": rope_cpu,
        "_merge_state_inplace_cpu": merge_state_cpu})


def swap_kv_cache_kernels(ours: dict):
    """Context manager: TVM's kv_cache module builds with `ours` ({its function name: our builder});
    where ours raises NotImplementedError, TVM's own builder is used."""
    import contextlib

    from tvm.relax.frontend.nn.llm import kv_cache

    def with_fallback(mine, theirs):
        def make(*args, **kwargs):
            try:
                return mine(*args, **kwargs)
            except NotImplementedError:
                return theirs(*args, **kwargs)
        return make

    @contextlib.contextmanager
    def swapped():
        saved = {name: getattr(kv_cache, name) for name in ours}
        for name, mine in ours.items():
            setattr(kv_cache, name, with_fallback(mine, saved[name]))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(kv_cache, name, fn)

    return swapped()
