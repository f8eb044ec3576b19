"""CUDA decode attention for TVM's paged KV cache, split over the keys.

TVM's GPU decode kernel gives each (sequence, KV head) one CUDA block that walks every key: five
blocks for the 2B-4T shape at batch 1, so five of 132 SMs do the work (8 us per layer at a 100-token
context, 50 us at 600). Here the keys are cut into SPLITS parts, one block per (KV head, part) — 160
blocks — and a second kernel merges the parts' softmax states (flash-decoding):

  kernel 1, block (b, kv head, part), warp w = query head kv_head * group + w, lanes split head_dim:
    for each tile of 8 keys of the part: 8 page lookups, 8 K and V rows loaded together (8-byte
    loads, one warp per row), 8 dot products summed across lanes by shuffles, one online-softmax
    rescale; the warps of a block share each K/V row through L1.
  kernel 2, block (b, query head), one thread per dim: o = sum_p 2^(m_p - m) o_p / sum_p 2^(m_p - m) l_p.

Same signature and conventions as TVM's kernel (scores in log2 units, lse = m + log2 l, q and k
rotated before the call: rotary_mode 0). Raises NotImplementedError where it does not apply (sliding
window, head_dim not a multiple of 32, groups over 8 query heads); the cache then keeps TVM's.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .attention_cpu import LOG2E, NEG, _paged_keys, swap_kv_cache_kernels

SPLITS = 32  # parts of the keys: SPLITS x KV heads blocks (160 for the 2B-4T shape)
TILE = 8  # keys per step of a warp: their loads are in flight together


def attention_decode_cuda(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, sliding_window: bool,
                          rope_scaling: dict, target=None, page_size: int = 16):
    group = num_qo_heads // num_kv_heads
    if sliding_window or dtype not in ("float32", "float16") or head_dim % 32 or head_dim > 256 or group > 8:
        raise NotImplementedError("bitcompile's CUDA decode attention: no sliding window, f32/f16, head_dim a "
                                  "multiple of 32 up to 256, at most 8 query heads per KV head")
    H_qo, H_kv, D = num_qo_heads, num_kv_heads, head_dim
    lanes_d = D // 32  # dims per lane

    def f32(x):
        return T.Cast("float32", x)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle,
        rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv"})
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
        part_o = T.alloc_buffer((B, H_qo, SPLITS, D), "float32", scope="global")
        part_ml = T.alloc_buffer((B, H_qo, SPLITS, 2), "float32", scope="global")

        assert rotary_mode == 0, "bitcompile decode attention expects pre-rotated q/k"
        for b in T.thread_binding(B, thread="blockIdx.y"):
            for hs in T.thread_binding(H_kv * SPLITS, thread="blockIdx.x"):
                for w in T.thread_binding(group, thread="threadIdx.y"):
                    for lane in T.thread_binding(32, thread="threadIdx.x"):
                        with T.sblock("partial"):
                            T.reads()
                            T.writes()
                            q = T.sblock_alloc_buffer((lanes_d,), "float32", scope="local")
                            o = T.sblock_alloc_buffer((lanes_d,), "float32", scope="local")
                            kt = T.sblock_alloc_buffer((TILE, lanes_d), "float32", scope="local")
                            vt = T.sblock_alloc_buffer((TILE, lanes_d), "float32", scope="local")
                            s = T.sblock_alloc_buffer((TILE,), "float32", scope="local")
                            st = T.sblock_alloc_buffer((3,), "float32", scope="local")  # m, l, new m
                            kv: T.let[T.int32] = hs // SPLITS
                            part: T.let[T.int32] = hs % SPLITS
                            h: T.let[T.int32] = kv * group + w
                            n_keys: T.let[T.int32] = _paged_keys(page_indptr[b], page_indptr[b + 1], length_info[b],
                                                                 page_size)
                            chunk: T.let[T.int32] = (n_keys + SPLITS - 1) // SPLITS
                            first: T.let[T.int32] = part * chunk
                            last: T.let[T.int32] = T.min(first + chunk, n_keys)
                            for v in T.unroll(lanes_d):
                                q[v] = f32(Q[b, h, lane * lanes_d + v]) * sm_scale * LOG2E
                                o[v] = T.float32(0)
                            st[0] = T.float32(NEG)
                            st[1] = T.float32(0)
                            for step in T.serial((T.max(last - first, 0) + TILE - 1) // TILE):
                                for t in T.unroll(TILE):
                                    if first + step * TILE + t < last:
                                        pos: T.let[T.int32] = first + step * TILE + t
                                        page: T.let[T.int32] = page_values[page_indptr[b] + pos // page_size]
                                        for v in T.vectorized(lanes_d):
                                            kt[t, v] = f32(pages[page, 0, kv, pos % page_size, lane * lanes_d + v])
                                        for v in T.vectorized(lanes_d):
                                            vt[t, v] = f32(pages[page, 1, kv, pos % page_size, lane * lanes_d + v])
                                    else:
                                        for v in T.unroll(lanes_d):
                                            kt[t, v] = T.float32(0)
                                            vt[t, v] = T.float32(0)
                                for t in T.unroll(TILE):
                                    s[t] = T.float32(0)
                                    for v in T.unroll(lanes_d):
                                        s[t] = s[t] + q[v] * kt[t, v]
                                    for m in T.unroll(5):
                                        s[t] = s[t] + T.call_pure_extern("float32", "__shfl_xor_sync",
                                                                         T.uint32(0xFFFFFFFF), s[t], 1 << m, 32)
                                st[2] = st[0]
                                for t in T.unroll(TILE):
                                    if first + step * TILE + t < last:
                                        st[2] = T.max(st[2], s[t])
                                st[1] = st[1] * T.exp2(st[0] - st[2])
                                for v in T.unroll(lanes_d):
                                    o[v] = o[v] * T.exp2(st[0] - st[2])
                                st[0] = st[2]
                                for t in T.unroll(TILE):
                                    if first + step * TILE + t < last:
                                        s[t] = T.exp2(s[t] - st[0])
                                        st[1] = st[1] + s[t]
                                        for v in T.unroll(lanes_d):
                                            o[v] = o[v] + s[t] * vt[t, v]
                            for v in T.unroll(lanes_d):
                                part_o[b, h, part, lane * lanes_d + v] = o[v]
                            if lane == 0:
                                part_ml[b, h, part, 0] = st[0]
                                part_ml[b, h, part, 1] = st[1]
        for b in T.thread_binding(B, thread="blockIdx.y"):
            for h in T.thread_binding(H_qo, thread="blockIdx.x"):
                for d in T.thread_binding(D, thread="threadIdx.x"):
                    with T.sblock("merge"):
                        T.reads()
                        T.writes()
                        st = T.sblock_alloc_buffer((3,), "float32", scope="local")  # m, l, sum of o
                        st[0] = T.float32(NEG)
                        for p in T.serial(SPLITS):
                            st[0] = T.max(st[0], part_ml[b, h, p, 0])
                        st[1] = T.float32(0)
                        st[2] = T.float32(0)
                        for p in T.serial(SPLITS):
                            st[1] = st[1] + T.exp2(part_ml[b, h, p, 0] - st[0]) * part_ml[b, h, p, 1]
                            st[2] = st[2] + T.exp2(part_ml[b, h, p, 0] - st[0]) * part_o[b, h, p, d]
                        output[b, h, d] = T.Cast(dtype, T.if_then_else(st[1] > 0, st[2] / st[1], T.float32(0)))
                        if d == 0:
                            lse[b, h] = T.if_then_else(st[1] > 0, st[0] + T.log2(st[1]), T.float32(NEG))

    return batch_decode_paged_kv


def use_fast_cuda_attention():
    """Context manager: a TIRPagedKVCache built inside it decodes with `attention_decode_cuda`."""
    return swap_kv_cache_kernels({"_attention_decode": attention_decode_cuda})
