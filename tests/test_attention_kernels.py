"""Our CPU attention kernels for the paged KV cache against attention written out in numpy."""

import itertools

import numpy as np
import pytest
import tvm

from bitcompile.compiler.targets import host_target
from bitcompile.kernels.attention_cpu import (
    attention_decode_cpu,
    attention_prefill_paged_cpu,
    attention_prefill_ragged_cpu,
)

HQ, HKV, D, PAGE = 4, 2, 32, 16
SCALE = D**-0.5


def build(func):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), tvm.target.Target(host_target().tvm))
    return lib.jit()["main"]


def attend(q, k, v, visible):
    """q [Hq, D]; k, v [n, Hkv, D]; visible keys -> out [Hq, D], lse in log2 units."""
    k, v = np.repeat(k[:visible], HQ // HKV, axis=1), np.repeat(v[:visible], HQ // HKV, axis=1)
    s = np.einsum("hd,thd->ht", q.astype(np.float64), k) * SCALE
    m = s.max(axis=1, keepdims=True)
    p = np.exp(s - m)
    out = np.einsum("ht,thd->hd", p / p.sum(axis=1, keepdims=True), v)
    return out, (m[:, 0] + np.log(p.sum(axis=1))) / np.log(2)


def paged(rng, keys, values):
    """Scatter keys/values [n, Hkv, D] into randomly ordered pages; return pages, page list, last page length."""
    n = len(keys)
    npages = (n + PAGE - 1) // PAGE
    order = rng.permutation(npages + 2)[:npages].astype(np.int32)
    pages = rng.standard_normal((npages + 2, 2, HKV, PAGE, D)).astype(np.float32)  # garbage outside the sequence
    for pos in range(n):
        pages[order[pos // PAGE], 0, :, pos % PAGE] = keys[pos]
        pages[order[pos // PAGE], 1, :, pos % PAGE] = values[pos]
    return pages, order, np.array([n - (npages - 1) * PAGE], np.int32)


def t(*arrays):
    return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 70])
def test_decode_attends_every_cached_key(n):
    rng = np.random.default_rng(n)
    k, v = rng.standard_normal((2, n, HKV, D)).astype(np.float32)
    q = rng.standard_normal((1, HQ, D)).astype(np.float32)
    pages, order, last = paged(rng, k, v)
    npages = len(order)
    args = t(q, pages, np.array([0, npages], np.int32), order, last, np.zeros(1, np.int32), np.zeros(1, np.int32),
             np.zeros((1, HQ, D), np.float32), np.zeros((1, HQ), np.float32))
    build(attention_decode_cpu(HKV, HQ, D, "float32", False, {}))(*args, 0, 1.0, 1e4, SCALE)
    want, want_lse = attend(q[0], k, v, n)
    np.testing.assert_allclose(args[7].numpy()[0], want, atol=2e-5)
    np.testing.assert_allclose(args[8].numpy()[0], want_lse, atol=2e-5)


@pytest.mark.parametrize("n, causal", [(1, 1), (19, 1), (40, 1), (19, 0)])
def test_ragged_prefill_is_causal_within_the_new_tokens(n, causal):
    rng = np.random.default_rng(n + causal)
    q = rng.standard_normal((n, HQ, D)).astype(np.float32)
    k, v = rng.standard_normal((2, n, HKV, D)).astype(np.float32)
    args = t(q, np.array([0, n], np.int32), k, v, np.array([0, n], np.int32), np.arange(n, dtype=np.int32),
             np.zeros(1, np.int32), np.zeros((n, HQ, D), np.float32), np.zeros((n, HQ), np.float32))
    build(attention_prefill_ragged_cpu(HKV, HQ, D, D, "float32", {}))(*args, causal, 0, 1.0, 1e4, SCALE)
    for i in range(n):
        want, want_lse = attend(q[i], k, v, i + 1 if causal else n)
        np.testing.assert_allclose(args[7].numpy()[i], want, atol=2e-5)
        np.testing.assert_allclose(args[8].numpy()[i], want_lse, atol=2e-5)


@pytest.mark.parametrize("lengths", [[1, 1, 1, 1, 1], [3, 1, 4, 1, 2]], ids=["one-each", "ragged"])
def test_ragged_prefill_of_several_sequences_keeps_them_apart(lengths):
    """A batched step: each sequence's new tokens attend only to that sequence's new tokens."""
    rng = np.random.default_rng(len(lengths) + sum(lengths))
    n = sum(lengths)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q = rng.standard_normal((n, HQ, D)).astype(np.float32)
    k, v = rng.standard_normal((2, n, HKV, D)).astype(np.float32)
    args = t(q, indptr, k, v, indptr, np.zeros(n, np.int32), np.zeros(len(lengths), np.int32),
             np.zeros((n, HQ, D), np.float32), np.zeros((n, HQ), np.float32))
    build(attention_prefill_ragged_cpu(HKV, HQ, D, D, "float32", {}))(*args, 1, 0, 1.0, 1e4, SCALE)
    for start, end in itertools.pairwise(indptr):
        for i in range(start, end):
            want, want_lse = attend(q[i], k[start:end], v[start:end], i - start + 1)
            np.testing.assert_allclose(args[7].numpy()[i], want, atol=2e-5)
            np.testing.assert_allclose(args[8].numpy()[i], want_lse, atol=2e-5)


@pytest.mark.parametrize("cached, new, causal", [(20, 5, 1), (33, 1, 1), (16, 8, 0)])
def test_paged_prefill_sees_the_prefix_and_respects_causality(cached, new, causal):
    rng = np.random.default_rng(cached * new)
    n = cached + new
    q = rng.standard_normal((new, HQ, D)).astype(np.float32)
    k, v = rng.standard_normal((2, n, HKV, D)).astype(np.float32)
    pages, order, last = paged(rng, k, v)
    args = t(q, np.array([0, new], np.int32), pages, np.array([0, len(order)], np.int32), order, last,
             np.zeros(1, np.int32), np.arange(new, dtype=np.int32), np.zeros((new, HQ, D), np.float32),
             np.zeros((new, HQ), np.float32))
    build(attention_prefill_paged_cpu(HKV, HQ, D, "float32", False, {}))(*args, causal, 0, 1.0, 1e4, SCALE)
    for i in range(new):
        want, _ = attend(q[i], k, v, cached + i + 1 if causal else n)
        np.testing.assert_allclose(args[8].numpy()[i], want, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("apply_rope", [1, 0])
def test_rope_rotates_q_and_k_and_passes_v(dtype, apply_rope):
    from bitcompile.kernels.attention_cpu import rope_cpu

    theta, n = 10000.0, 5
    rng = np.random.default_rng(apply_rope)
    qkv = rng.standard_normal((n, HQ + 2 * HKV, D)).astype(dtype)
    positions = np.array([0, 1, 7, 300, 4095], np.int32)
    args = t(qkv, positions, np.zeros((n, HQ, D), dtype), np.zeros((n, HKV, D), dtype), np.zeros((n, HKV, D), dtype))
    build(rope_cpu(theta, 1.0, D, HQ, HKV, dtype, {}))(*args, apply_rope)

    x = qkv.astype(np.float64)
    angle = positions[:, None] * theta ** (-np.arange(0, D, 2) / D)  # [n, D/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    lo, hi = x[..., : D // 2], x[..., D // 2 :]
    rotated = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1) if apply_rope else x
    tol = 2e-3 if dtype == "float16" else 2e-4  # float32 angles at position 4095 carry ~1e-4 rad
    np.testing.assert_allclose(args[2].numpy(), rotated[:, :HQ], atol=tol * 4)
    np.testing.assert_allclose(args[3].numpy(), rotated[:, HQ : HQ + HKV], atol=tol * 4)
    np.testing.assert_array_equal(args[4].numpy(), qkv[:, HQ + HKV :])


@pytest.mark.parametrize("dtype, d", [("float32", 32), ("float16", 40)])
def test_merge_state_combines_two_partial_softmaxes(dtype, d):
    from bitcompile.kernels.attention_cpu import merge_state_cpu

    rng = np.random.default_rng(d)
    n, h = 6, 3
    v, v_other = rng.standard_normal((2, n, h, d)).astype(dtype)
    s, s_other = (rng.standard_normal((2, n, h)) * 4).astype(np.float32)
    args = t(v, s, v_other, s_other)
    build(merge_state_cpu(dtype))(*args)

    a, b = np.exp2(s.astype(np.float64)), np.exp2(s_other.astype(np.float64))  # softmax masses of the two parts
    want = (v * a[..., None] + v_other * b[..., None]) / (a + b)[..., None]
    np.testing.assert_allclose(args[0].numpy(), want, atol=2e-3 if dtype == "float16" else 1e-5)
    np.testing.assert_allclose(args[1].numpy(), np.log2(a + b), atol=1e-5)
