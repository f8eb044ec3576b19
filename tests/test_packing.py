import numpy as np
import pytest

from bitcompile.model.packing import (
    pack_hf,
    pack_kernel,
    ternarize,
    unpack_hf,
    unpack_kernel,
)


def test_hf_unpack_follows_the_documented_bit_layout():
    # 8 output rows, 1 input: packed row r, bits 2i..2i+1 hold original row i*2 + r, stored as t + 1.
    packed = np.array([[0b10_00_01_10], [0b00_10_01_01]], dtype=np.uint8)
    expected = np.array([1, 0, 0, 0, -1, 1, 1, -1], dtype=np.int8).reshape(8, 1)
    np.testing.assert_array_equal(unpack_hf(packed), expected)
    np.testing.assert_array_equal(pack_hf(expected), packed)


def test_kernel_layout_places_16_rows_by_4_inputs_per_bit_plane():
    t = np.random.default_rng(0).integers(-1, 2, (32, 48)).astype(np.int8)
    packed = pack_kernel(t)
    assert packed.shape == (2, 3, 64)
    # byte r*4 + kk of block (nb, kb), bits 2j: row nb*16 + r, input kb*16 + 4j + kk
    nb, kb, r, kk, j = 1, 2, 5, 3, 2
    code = (packed[nb, kb, r * 4 + kk] >> (2 * j)) & 3
    assert code == t[nb * 16 + r, kb * 16 + 4 * j + kk] + 1
    np.testing.assert_array_equal(unpack_kernel(packed), t)


def test_kernel_layout_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="multiples of 16"):
        pack_kernel(np.zeros((20, 16), dtype=np.int8))


def test_ternarize_uses_absmean_scale():
    w = np.array([[0.5, -1.5, 0.05, 2.0]], dtype=np.float32)  # mean|w| = 1.0125
    t, scale = ternarize(w)
    assert scale == pytest.approx(1.0125)
    np.testing.assert_array_equal(t, [[0, -1, 0, 1]])
