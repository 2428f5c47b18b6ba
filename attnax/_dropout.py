"""Counter-based dropout: the keep mask is a pure function of (key, b, h, i, j).

Every kernel (XLA chunks, Pallas tiles, ring shards, the backward pass)
regenerates exactly the same mask from the same key and absolute positions,
with no state and no stored mask. The hash is 32-bit integer arithmetic only
(xor, shifts, multiplies), which every backend supports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _fmix32(x):
    # murmur3's finaliser: a bijection on uint32 with full avalanche.
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def key_to_seed(rng) -> jax.Array:
    """Two uint32 words from a PRNG key (typed or raw ``uint32`` key data)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    words = jnp.ravel(rng).astype(jnp.uint32)
    if words.shape[0] == 1:
        words = jnp.concatenate([words, jnp.zeros((1,), jnp.uint32)])
    return words[:2]


def mix(x, v):
    """One round of the hash: the state ``x`` absorbs ``v`` (uint32 arrays, broadcast together)."""
    return _fmix32(x ^ (jnp.asarray(v).astype(jnp.uint32) * _GOLDEN + np.uint32(0x7F4A7C15)))


def head_state(seed, b, h) -> jax.Array:
    """The hash state after ``seed``, ``b`` and ``h``: what a kernel can compute once per head."""
    x = _fmix32(seed[0] ^ _GOLDEN)
    for v in (seed[1], b, h):
        x = mix(x, v)
    return x


def position_bits(state, q_idx, kv_idx) -> jax.Array:
    """The uint32 bits of positions ``(q_idx, kv_idx)`` from a :func:`head_state`."""
    return mix(mix(state, q_idx), kv_idx)


def random_bits(seed, b, h, q_idx, kv_idx) -> jax.Array:
    """uint32 bits for each (b, h, q_idx, kv_idx), broadcast together."""
    return position_bits(head_state(seed, b, h), q_idx, kv_idx)


def threshold(rate: float) -> np.uint32:
    """Bits at or above this are kept: a weight is dropped with probability ``rate``."""
    return np.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))


def keep_mask(seed, rate: float, b, h, q_idx, kv_idx) -> jax.Array:
    """True where a weight is kept; each weight is dropped with probability ``rate``."""
    return random_bits(seed, b, h, q_idx, kv_idx) >= threshold(rate)
