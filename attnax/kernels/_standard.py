"""Dense attention in XLA: one einsum for the scores, a softmax, one einsum out."""

from __future__ import annotations

import jax.numpy as jnp

from attnax import _dropout
from attnax._validation import check_attention_args, check_kernel_options
from attnax.reference import softmax_stats
from attnax.score_mods._base import grid_indices, split_score_mod

__all__ = ["standard_attention"]


def standard_attention(
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
    **kernel_options,
):
    """Dense attention: materialises the ``[B, H, T, S]`` scores (``O(T S)`` memory).

    Fast for short sequences and the simplest path for XLA to fuse. GQA reads
    each kv head once (grouped einsum, no repeat). Matmuls run in the input
    dtype with float32 accumulation; the softmax runs in float32.

    Args:
        query: ``[B, H, T, D]``.
        key: ``[B, Hk, S, D]``.
        value: ``[B, Hk, S, Dv]``.
        score_mod, mask_mod, mask, block_mask, scale, q_offset, dropout_rate, dropout_rng, deterministic, return_lse:
            see :class:`attnax.typing.AttentionFn`.
        **kernel_options: none are accepted.

    Returns:
        ``out [B, H, T, Dv]``, or ``(out, lse)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import standard_attention, sliding_window_mod
        >>> q = jax.random.normal(jax.random.key(0), (1, 4, 16, 8))
        >>> kv = jax.random.normal(jax.random.key(1), (1, 2, 16, 8))  # GQA: 4 query heads, 2 kv heads
        >>> standard_attention(q, kv, kv, score_mod=sliding_window_mod(4)).shape
        (1, 4, 16, 8)
    """
    check_kernel_options("standard_attention", kernel_options, ())
    args = check_attention_args(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask,
        scale=scale, q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic,
    )  # fmt: skip
    d = args.dims
    acc = jnp.float64 if query.dtype == jnp.float64 else jnp.float32
    qg = query.reshape(d.B, d.Hk, d.group, d.T, d.D)
    s = jnp.einsum("bkgtd,bksd->bkgts", qg, key, preferred_element_type=acc)
    s = s.reshape(d.B, d.H, d.T, d.S) * args.scale
    b, h, q_idx, kv_idx = grid_indices(d.B, d.H, d.T, d.S, args.q_offset)
    transform, mask_fn = split_score_mod(score_mod, mask_mod)
    if transform is not None:
        s = transform(s, b, h, q_idx, kv_idx).astype(acc)
    visible = jnp.ones(s.shape, bool)
    if mask_fn is not None:
        visible = visible & mask_fn(b, h, q_idx, kv_idx)
    if args.mask is not None:
        visible = visible & args.mask
    if block_mask is not None:
        visible = visible & block_mask.mask(b, h, q_idx, kv_idx)
    p, lse = softmax_stats(s, visible)
    if args.dropout_active:
        keep = _dropout.keep_mask(_dropout.key_to_seed(args.dropout_rng), args.dropout_rate, b, h, q_idx, kv_idx)
        p = jnp.where(keep, p / (1.0 - args.dropout_rate), 0.0)
    pg = p.astype(value.dtype).reshape(d.B, d.Hk, d.group, d.T, d.S)
    out = jnp.einsum("bkgts,bksd->bkgtd", pg, value, preferred_element_type=acc)
    out = out.reshape(d.B, d.H, d.T, d.Dv).astype(query.dtype)
    return (out, lse.astype(acc)) if return_lse else out
