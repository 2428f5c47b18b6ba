"""The one dense oracle: every kernel is tested against ``attention_reference``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnax import _dropout
from attnax._validation import check_attention_args
from attnax.score_mods._base import grid_indices, split_score_mod

__all__ = ["attention_reference", "softmax_stats"]


def softmax_stats(scores, visible):
    """NaN-free masked softmax of ``scores`` along the last axis.

    Returns ``(p, lse)``: probabilities (0 where hidden; an all-hidden row is
    all 0) and the natural log-sum-exp (``-inf`` for an all-hidden row). The
    row maximum is a stop-gradient shift, so gradients are exact and zero on
    all-hidden rows.
    """
    s = jnp.where(visible, scores, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(visible, jnp.exp(jnp.where(visible, scores, m) - m), 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + m, -jnp.inf)
    return p, lse[..., 0]


def attention_reference(
    query,
    key,
    value,
    *,
    score_mod=None,
    mask_mod=None,
    mask=None,
    block_mask=None,
    scale=None,
    q_offset=0,
    dropout_rate=0.0,
    dropout_rng=None,
    deterministic=True,
    return_lse=False,
):
    r"""Dense attention on the whole ``[B, H, T, S]`` grid: the oracle.

    .. math::

        s_{bhij} = \mathrm{score\_mod}(q_{bhi} \cdot k_{b,g(h),j} \cdot \mathrm{scale}, b, h, i + o, j),
        \quad p = \mathrm{softmax}_j(s \text{ where visible else } -\infty),
        \quad \mathrm{out}_{bhi} = \sum_j p_{bhij} v_{b,g(h),j}

    with ``g(h) = h // (H // Hk)`` and ``o = q_offset``. Scores accumulate in
    float32 (float64 for float64 inputs). A fully hidden row gives output 0,
    LSE ``-inf`` and zero gradients, never NaN.

    Args:
        query: ``[B, H, T, D]``.
        key: ``[B, Hk, S, D]``.
        value: ``[B, Hk, S, Dv]``.
        score_mod: score mod (mask-type mods hide keys).
        mask_mod: mask mod, True = attend.
        mask: boolean array broadcastable to ``[B, H, T, S]``.
        block_mask: a :class:`attnax.block_mask.BlockMask`; its elementwise
            meaning (:meth:`~attnax.block_mask.BlockMask.to_dense`) is applied.
        scale: default ``1/sqrt(D)``.
        q_offset: absolute position of query 0 (int or ``[B]``).
        dropout_rate: dropout on the normalised weights (kept ones scaled by
            ``1/(1-rate)``), active when ``deterministic`` is False.
        dropout_rng: PRNG key for dropout.
        deterministic: disables dropout when True.
        return_lse: also return the LSE ``[B, H, T]`` (float32, or float64 for
            float64 inputs).

    Returns:
        ``out [B, H, T, Dv]`` in the query dtype, or ``(out, lse)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.reference import attention_reference
        >>> from attnax.score_mods import causal_mod
        >>> q = k = v = jax.random.normal(jax.random.key(0), (1, 2, 4, 8))
        >>> out, lse = attention_reference(q, k, v, score_mod=causal_mod(), return_lse=True)
        >>> out.shape, lse.shape
        ((1, 2, 4, 8), (1, 2, 4))
        >>> bool(jnp.allclose(out[:, :, 0], v[:, :, 0]))  # the first query sees only key 0
        True
    """
    args = check_attention_args(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask,
        scale=scale, q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic,
    )  # fmt: skip
    d = args.dims
    acc = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    k = jnp.repeat(key, d.group, axis=1).astype(acc)
    v = jnp.repeat(value, d.group, axis=1).astype(acc)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bhtd,bhsd->bhts", query.astype(acc), k, precision=hi) * args.scale
    b, h, q_idx, kv_idx = grid_indices(d.B, d.H, d.T, d.S, args.q_offset)
    transform, mask_fn = split_score_mod(score_mod, mask_mod)
    if transform is not None:
        s = transform(s, b, h, q_idx, kv_idx).astype(acc)
    visible = jnp.ones(s.shape, bool)
    if mask_fn is not None:
        visible &= mask_fn(b, h, q_idx, kv_idx)
    if args.mask is not None:
        visible &= args.mask
    if block_mask is not None:
        visible &= block_mask.mask(b, h, q_idx, kv_idx)
    p, lse = softmax_stats(s, visible)
    if args.dropout_active:
        keep = _dropout.keep_mask(_dropout.key_to_seed(args.dropout_rng), args.dropout_rate, b, h, q_idx, kv_idx)
        p = jnp.where(keep, p / (1.0 - args.dropout_rate), 0.0)
    out = jnp.einsum("bhts,bhsd->bhtd", p, v, precision=hi).astype(query.dtype)
    return (out, lse) if return_lse else out
