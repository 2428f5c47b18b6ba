"""Shared pieces of the cache and paged attention tests: random paged caches and the oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnax.reference import attention_reference
from attnax.score_mods import causal_mod, compose_score_mods


def rand(seed, shape, dtype=jnp.float64):
    """Standard normal values (NumPy's generator: no per-shape compilation of jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_paged(seed, *, B, Hk, D, Dv=None, capacity, page_size, dtype=jnp.float64, spare_pages=3):
    """Random contiguous K/V ``[B, P*ps, Hk, D]`` and the same tokens in shuffled pages.

    Returns ``(k, v, k_pages, v_pages, tables)``; every row owns ``P`` pages, in
    a random order of a pool with spare (random, never read) pages.
    """
    Dv = D if Dv is None else Dv
    ps = page_size
    P = -(-capacity // ps)
    N = B * P + spare_pages
    k = rand(seed, (B, P * ps, Hk, D), dtype)
    v = rand(seed + 1, (B, P * ps, Hk, Dv), dtype)
    perm = np.random.default_rng(seed).permutation(N)
    tables = perm[: B * P].reshape(B, P)
    k_pages = np.array(rand(seed + 2, (N, ps, Hk, D), dtype))
    v_pages = np.array(rand(seed + 3, (N, ps, Hk, Dv), dtype))
    k_pages[tables] = np.asarray(k).reshape(B, P, ps, Hk, D)
    v_pages[tables] = np.asarray(v).reshape(B, P, ps, Hk, Dv)
    return k, v, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables, jnp.int32)


def unused_pages_to_minus_one(tables, lengths, page_size):
    """Block table entries past each row's pages set to -1 (they must never be read)."""
    t = np.asarray(tables).copy()
    used = -(-np.asarray(lengths) // page_size)
    t[np.arange(t.shape[1])[None, :] >= used[:, None]] = -1
    return jnp.asarray(t, jnp.int32)


def paged_oracle(q, k, v, lengths, *, score_mod=None, mask_mod=None, scale=None):
    """float64 dense attention of ``q [B, H, T, D]`` over contiguous ``k, v [B, S, Hk, D]``.

    Queries at ``lengths - T + i``, causal (the paged attention contract).
    """
    T = q.shape[2]
    f64 = lambda x: jnp.asarray(x, jnp.float64)  # noqa: E731

    @jax.jit  # one compilation instead of op-by-op dispatch: faster on a busy CPU
    def run(q, k, v, lengths):
        return attention_reference(
            q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
            score_mod=compose_score_mods(causal_mod(), score_mod), mask_mod=mask_mod, scale=scale,
            q_offset=lengths - T, return_lse=True,
        )  # fmt: skip

    return run(f64(q), f64(k), f64(v), jnp.asarray(lengths, jnp.int32))


def jit_paged(**kwargs):
    """``paged_attention`` with these keywords, jitted (arrays as arguments)."""
    from attnax.kernels import paged_attention

    return jax.jit(lambda q, kp, vp, t, n: paged_attention(q, kp, vp, t, n, return_lse=True, **kwargs))


def assert_close(got, want, atol, lse_atol=None):
    out, lse = got
    r_out, r_lse = want
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(r_out), atol=atol, rtol=0)
    if lse_atol is not None:
        lse, r_lse = np.asarray(lse, np.float64), np.asarray(r_lse)
        np.testing.assert_array_equal(np.isinf(lse), np.isinf(r_lse))
        fin = np.isfinite(r_lse)
        np.testing.assert_allclose(lse[fin], r_lse[fin], atol=lse_atol, rtol=0)
