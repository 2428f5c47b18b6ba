"""The oracle itself: ``attention_reference`` against a naive numpy softmax, row by row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnax import _dropout
from attnax.block_mask import create_block_mask
from attnax.reference import attention_reference
from attnax.score_mods import alibi_mod, causal_mod, compose_score_mods, document_mask_mod, softcap_mod

try:
    from conformance import random_qkv
except ImportError:  # tests/ imported as a package
    from tests.conformance import random_qkv


def naive(q, k, v, *, scale=None, q_offset=0, visible=None, score_fn=None):
    """Attention with explicit loops over (batch, head, query): no broadcasting tricks.

    ``visible(b, h, i, j) -> bool`` and ``score_fn(s, b, h, i, j) -> float``
    take absolute positions ``i = q_offset + row``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, T, v.shape[-1]))
    lse = np.full((B, H, T), -np.inf)
    for b in range(B):
        off = int(np.broadcast_to(q_offset, (B,))[b])
        for h in range(H):
            g = h // (H // Hk)
            for t in range(T):
                i = off + t
                scores, keep = [], []
                for j in range(S):
                    s = float(q[b, h, t] @ k[b, g, j]) * scale
                    if score_fn is not None:
                        s = score_fn(s, b, h, i, j)
                    if visible is None or visible(b, h, i, j):
                        scores.append(s)
                        keep.append(j)
                if not keep:
                    continue
                scores = np.array(scores)
                m = scores.max()
                w = np.exp(scores - m)
                lse[b, h, t] = m + np.log(w.sum())
                out[b, h, t] = (w / w.sum()) @ v[b, g, keep]
    return out, lse


def f64(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def test_plain_and_gqa():
    q, k, v = f64(2, 4, 5, 8, seed=1), f64(2, 2, 7, 8, seed=2), f64(2, 2, 7, 3, seed=3)
    out, lse = attention_reference(q, k, v, return_lse=True)
    n_out, n_lse = naive(q, k, v)
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-12)
    assert out.shape == (2, 4, 5, 3) and lse.shape == (2, 4, 5)


@pytest.mark.parametrize("q_offset", [0, 3, np.array([0, 4])])
def test_mods_and_offsets(q_offset):
    q, k, v = f64(2, 2, 5, 4, seed=4), f64(2, 1, 9, 4, seed=5), f64(2, 1, 9, 4, seed=6)
    slopes = np.asarray([0.5, 0.125])
    mod = compose_score_mods(causal_mod(), alibi_mod(slopes=jnp.asarray(slopes)), softcap_mod(2.0))
    qo = jnp.asarray(q_offset) if isinstance(q_offset, np.ndarray) else q_offset
    out, lse = attention_reference(q, k, v, score_mod=mod, q_offset=qo, scale=0.7, return_lse=True)
    n_out, n_lse = naive(
        q, k, v, scale=0.7, q_offset=q_offset,
        visible=lambda b, h, i, j: j <= i,
        score_fn=lambda s, b, h, i, j: 2.0 * np.tanh((s - slopes[h] * abs(i - j)) / 2.0),
    )  # fmt: skip
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-12)


def test_dense_mask_and_mask_mod_and_block_mask():
    q, k, v = f64(1, 2, 6, 4, seed=7), f64(1, 2, 10, 4, seed=8), f64(1, 2, 10, 4, seed=9)
    dense = np.random.default_rng(10).random((1, 2, 6, 10)) < 0.7
    out = attention_reference(q, k, v, mask=jnp.asarray(dense), mask_mod=lambda b, h, i, j: (i + j) % 5 != 0)
    n_out, _ = naive(q, k, v, visible=lambda b, h, i, j: dense[b, h, i, j] and (i + j) % 5 != 0)
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-13)
    ids = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    bm = jax.jit(lambda ids: create_block_mask(document_mask_mod(ids).mask_mod, None, None, 6, 10, block_size=(4, 3)))(
        jnp.asarray(ids)
    )
    out = attention_reference(q, k, v, block_mask=bm)
    n_out, _ = naive(q, k, v, visible=lambda b, h, i, j: ids[i] == ids[j])
    np.testing.assert_allclose(out, n_out, rtol=1e-12, atol=1e-13)


def test_fully_masked_rows():
    q, k, v = f64(1, 2, 6, 4, seed=11), f64(1, 2, 8, 4, seed=12), f64(1, 2, 8, 4, seed=13)
    mm = lambda b, h, i, j: (j <= i) & (i % 2 == 1)  # noqa: E731  even rows see nothing

    def loss(q, k, v):
        out, lse = attention_reference(q, k, v, mask_mod=mm, return_lse=True)
        return jnp.sum(out**2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.all(out[:, :, ::2] == 0) and np.all(lse[:, :, ::2] == -np.inf)
    assert np.all(np.isfinite(lse[:, :, 1::2]))
    dq = np.asarray(grads[0])
    assert np.all(dq[:, :, ::2] == 0) and np.any(dq[:, :, 1::2] != 0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    n_out, n_lse = naive(q, k, v, visible=lambda b, h, i, j: j <= i and i % 2 == 1)
    np.testing.assert_allclose(out, n_out, atol=1e-13)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-12)


def test_everything_masked_gives_zero_output_and_gradients():
    q, k, v = f64(1, 1, 3, 4, seed=14), f64(1, 1, 5, 4, seed=15), f64(1, 1, 5, 4, seed=16)
    grads = jax.grad(
        lambda q, k, v: jnp.sum(attention_reference(q, k, v, mask_mod=lambda b, h, i, j: j < 0)), (0, 1, 2)
    )(q, k, v)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_gradients_match_finite_differences():
    q, k, v = f64(1, 2, 4, 3, seed=17), f64(1, 1, 5, 3, seed=18), f64(1, 1, 5, 3, seed=19)

    def f(q, k, v):
        return attention_reference(q, k, v, score_mod=compose_score_mods(causal_mod(), softcap_mod(1.5)), q_offset=1)

    check_grads(f, (q, k, v), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_float64_accumulation():
    # Large scores with small differences: float32 accumulation loses them, float64 keeps them.
    rng = np.random.default_rng(20)
    q = jnp.asarray(300.0 + rng.standard_normal((1, 1, 4, 16)))
    k = jnp.asarray(300.0 + rng.standard_normal((1, 1, 32, 16)))
    v = jnp.asarray(rng.standard_normal((1, 1, 32, 8)))
    out, lse = attention_reference(q, k, v, return_lse=True)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
    n_out, n_lse = naive(q, k, v)
    np.testing.assert_allclose(out, n_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, n_lse, rtol=1e-14)
    out32 = attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    assert np.max(np.abs(np.asarray(out32, np.float64) - n_out)) > 1e-8  # the test can tell the difference


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    q, k, v = random_qkv(21, 1, 2, 1, 6, 9, 8, dtype=dtype)
    out, lse = attention_reference(q, k, v, score_mod=causal_mod(), return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    n_out, n_lse = naive(q.astype(jnp.float64), k.astype(jnp.float64), v.astype(jnp.float64),
                         visible=lambda b, h, i, j: j <= i)  # fmt: skip
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), n_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(lse, n_lse, atol=1e-5, rtol=1e-5)  # accumulation in float32


def test_dropout_on_normalised_weights():
    q, k, v = f64(2, 2, 5, 4, seed=22), f64(2, 2, 7, 4, seed=23), f64(2, 2, 7, 4, seed=24)
    key, rate = jax.random.key(0), 0.4
    out = attention_reference(q, k, v, dropout_rate=rate, dropout_rng=key, deterministic=False, q_offset=2)
    b, h = np.arange(2)[:, None, None, None], np.arange(2)[None, :, None, None]
    i, j = 2 + np.arange(5)[None, None, :, None], np.arange(7)[None, None, None, :]
    keep = np.asarray(_dropout.keep_mask(_dropout.key_to_seed(key), rate, b, h, i, j))
    assert 0 < keep.mean() < 1
    s = np.einsum("bhtd,bhsd->bhts", np.asarray(q), np.asarray(k)) / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.einsum("bhts,bhsd->bhtd", np.where(keep, p / (1 - rate), 0.0), np.asarray(v))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-13)
    # deterministic=True (the default) ignores the rate.
    np.testing.assert_allclose(
        attention_reference(q, k, v, dropout_rate=rate, dropout_rng=key), attention_reference(q, k, v), rtol=0
    )
