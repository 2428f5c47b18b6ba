"""The counter-based dropout hash: a pure function of (key, b, h, q_idx, kv_idx)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import _dropout

M32 = 0xFFFFFFFF


def np_fmix32(x):
    """murmur3's finaliser in Python integers, masked to 32 bits: an independent model."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def np_random_bits(seed, b, h, i, j):
    golden = 0x9E3779B9
    x = np_fmix32(int(seed[0]) ^ golden)
    for v in (int(seed[1]), b, h, i, j):
        x = np_fmix32(x ^ (((v & M32) * golden + 0x7F4A7C15) & M32))
    return x


def grid(B, H, T, S, q_offset=0):
    return (
        jnp.arange(B)[:, None, None, None],
        jnp.arange(H)[None, :, None, None],
        q_offset + jnp.arange(T)[None, None, :, None],
        jnp.arange(S)[None, None, None, :],
    )


def test_uint32_arithmetic_matches_python_model():
    seed = _dropout.key_to_seed(jax.random.key(123))
    bits = _dropout.random_bits(seed, *grid(2, 3, 4, 5, q_offset=7))
    assert bits.dtype == jnp.uint32 and bits.shape == (2, 3, 4, 5)
    bits = np.asarray(bits)
    s = np.asarray(seed)
    for b, h, t, j in [(0, 0, 0, 0), (1, 2, 3, 4), (0, 1, 2, 3), (1, 0, 3, 0)]:
        assert int(bits[b, h, t, j]) == np_random_bits(s, b, h, 7 + t, j)


def test_large_positions_wrap_like_uint32():
    seed = _dropout.key_to_seed(jax.random.key(5))
    pos = jnp.asarray([0, 2**31 - 1, 2**20 + 3], jnp.int32)
    bits = np.asarray(_dropout.random_bits(seed, 0, 0, pos, 1))
    for p, x in zip(np.asarray(pos), bits):
        assert int(x) == np_random_bits(np.asarray(seed), 0, 0, int(p), 1)


def test_determinism_and_key_dependence():
    g = grid(2, 2, 16, 16)
    a = _dropout.keep_mask(_dropout.key_to_seed(jax.random.key(0)), 0.5, *g)
    b = _dropout.keep_mask(_dropout.key_to_seed(jax.random.key(0)), 0.5, *g)
    c = _dropout.keep_mask(_dropout.key_to_seed(jax.random.key(1)), 0.5, *g)
    np.testing.assert_array_equal(a, b)
    assert 0.35 < np.mean(np.asarray(a) != np.asarray(c)) < 0.65
    # Under jit, and evaluated tile by tile: the same bits.
    jitted = jax.jit(lambda s: _dropout.keep_mask(s, 0.5, *g))(_dropout.key_to_seed(jax.random.key(0)))
    np.testing.assert_array_equal(a, jitted)
    seed = _dropout.key_to_seed(jax.random.key(0))
    tile = _dropout.keep_mask(seed, 0.5, 1, 0, jnp.arange(4, 8)[:, None], jnp.arange(8, 16)[None, :])
    np.testing.assert_array_equal(tile, np.asarray(a)[1, 0, 4:8, 8:16])


def test_every_coordinate_matters():
    seed = _dropout.key_to_seed(jax.random.key(3))
    B, H, T, S = 2, 2, 32, 32
    bits = np.asarray(_dropout.random_bits(seed, *grid(B, H, T, S)))
    assert np.mean(bits[0] != bits[1]) > 0.99  # batch
    assert np.mean(bits[:, 0] != bits[:, 1]) > 0.99  # head
    assert np.mean(bits[..., 1:, :] != bits[..., :-1, :]) > 0.99  # query position
    assert np.mean(bits[..., 1:] != bits[..., :-1]) > 0.99  # key position
    off_diagonal = ~np.eye(T, dtype=bool)
    assert np.mean((bits[0, 0] != bits[0, 0].T)[off_diagonal]) > 0.99  # (i, j) and (j, i) differ


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.9])
def test_keep_fraction(rate):
    keep = np.asarray(_dropout.keep_mask(_dropout.key_to_seed(jax.random.key(7)), rate, *grid(4, 4, 64, 64)))
    n = keep.size
    tol = 5 * np.sqrt(rate * (1 - rate) / n)  # five standard deviations
    assert abs(keep.mean() - (1 - rate)) < tol, (keep.mean(), 1 - rate)
    # No structure along rows or columns: every row keeps about 1 - rate.
    rows = keep.reshape(-1, 64).mean(axis=1)
    assert abs(rows.mean() - (1 - rate)) < tol and rows.std() < 3 * np.sqrt(rate * (1 - rate) / 64)


def test_bits_are_uniform():
    bits = np.asarray(_dropout.random_bits(_dropout.key_to_seed(jax.random.key(11)), *grid(2, 2, 64, 64)))
    per_bit = [(bits >> k & 1).mean() for k in range(32)]
    assert np.all(np.abs(np.array(per_bit) - 0.5) < 0.02)


def test_edge_rates():
    seed = _dropout.key_to_seed(jax.random.key(2))
    g = grid(1, 1, 32, 32)
    assert np.all(np.asarray(_dropout.keep_mask(seed, 0.0, *g)))
    assert np.mean(np.asarray(_dropout.keep_mask(seed, 1 - 1e-9, *g))) < 0.01


def test_typed_and_raw_keys():
    typed, raw = jax.random.key(42), jax.random.PRNGKey(42)
    s_typed, s_raw = _dropout.key_to_seed(typed), _dropout.key_to_seed(raw)
    assert s_typed.dtype == jnp.uint32 and s_typed.shape == (2,)
    np.testing.assert_array_equal(s_typed, s_raw)
    np.testing.assert_array_equal(s_typed, jax.random.key_data(typed))
    # Other key implementations give their first two words.
    rbg = jax.random.key(42, impl="rbg")
    np.testing.assert_array_equal(_dropout.key_to_seed(rbg), jax.random.key_data(rbg)[:2])
    # A split key is a different stream.
    assert not np.array_equal(_dropout.key_to_seed(jax.random.split(typed)[0]), s_typed)
    # Under jit, with the key traced.
    np.testing.assert_array_equal(jax.jit(_dropout.key_to_seed)(typed), s_typed)
