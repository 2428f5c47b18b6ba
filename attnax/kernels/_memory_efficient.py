"""Chunked online-softmax attention in XLA, with a recomputing backward.

Peak memory is ``O(B H (T + S) D + B H block_q block_kv)``: the forward keeps
only the running max, sum and output per query chunk, and the backward
(a ``custom_vjp``) recomputes each score tile from ``q``, ``k`` and the saved
log-sum-exp instead of storing the ``[T, S]`` probabilities.

``forward`` and ``backward`` are reused by ring attention for its blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from attnax import _dropout
from attnax._validation import check_attention_args, check_kernel_options
from attnax.kernels._tiles import (
    TileExtras,
    TileStatic,
    cotangent_tree,
    diff_leaves,
    has_any_mask,
    match_vma,
    tile_dropout_scale,
    tile_positions,
    tile_transform,
    tile_visible,
)
from attnax.score_mods._base import _as_mask_mod, _as_score_mod

__all__ = ["MemoryEfficientConfig", "memory_efficient_attention"]


@dataclasses.dataclass(frozen=True)
class MemoryEfficientConfig:
    """Chunk sizes of :func:`memory_efficient_attention`.

    Attributes:
        block_q: queries per chunk (clipped to the query length).
        block_kv: keys per chunk (clipped to the key length).
    """

    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"`MemoryEfficientConfig.{name}` must be a positive int; got {v!r}.")


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _pad_to(x, axis, n):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _blocks(x, axis, block):
    """``[..., n*block, ...]`` -> ``[n, ..., block, ...]`` (padding the axis)."""
    n = -(-x.shape[axis] // block)
    x = _pad_to(x, axis, n * block)
    shape = x.shape[:axis] + (n, block) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _scores(qi, kj, static, acc):
    """Grouped ``q k^T * scale``: qi ``[B,Hk,G,bq,D]``, kj ``[B,Hk,bkv,D]`` -> ``[B,H,bq,bkv]``."""
    B, Hk, G, bq, _ = qi.shape
    s = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=acc)
    return (s * static.scale).reshape(B, Hk * G, bq, kj.shape[2])


def _grouped(x, Hk):
    B, H = x.shape[:2]
    return x.reshape(B, Hk, H // Hk, *x.shape[2:])


def forward(q, k, v, extras: TileExtras, static: TileStatic):
    """Online-softmax forward. Returns ``out [B,H,T,Dv]`` (query dtype) and ``lse [B,H,T]``."""
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    acc = _acc_dtype(q.dtype)
    bq, bkv = static.block_q, static.block_kv
    qb = _blocks(_grouped(q, Hk), 3, bq)  # [nq, B, Hk, G, bq, D]
    kb = _blocks(k, 2, bkv)  # [nk, B, Hk, bkv, D]
    vb = _blocks(v, 2, bkv)
    nq, nk = qb.shape[0], kb.shape[0]
    maskable = has_any_mask(extras) or nk * bkv != static.S

    def q_chunk(args):
        i, qi = args

        def kv_step(carry, xs):
            j, kj, vj = xs
            pos = tile_positions(extras, B, H, i * bq, j * bkv, bq, bkv)

            vis = tile_visible(extras, static, pos)

            def update(carry):
                m, l, o = carry
                s = tile_transform(extras.score_mod, _scores(qi, kj, static, acc), pos)
                m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, -jnp.inf), axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - m_safe[..., None]), 0.0)
                alpha = jnp.exp(m - m_safe)
                l = alpha * l + jnp.sum(p, axis=-1)
                drop = tile_dropout_scale(extras, static, pos)
                if drop is not None:
                    p = p * drop
                pv = jnp.einsum(
                    "bkgts,bksd->bkgtd", _grouped(p.astype(vj.dtype), Hk), vj, preferred_element_type=acc
                )
                o = alpha[..., None] * o + pv.reshape(o.shape)
                return m_new, l, o

            if not maskable:
                return update(carry), None
            return jax.lax.cond(jnp.any(vis), update, lambda c: c, carry), None

        init = (
            jnp.full((B, H, bq), -jnp.inf, acc),
            jnp.zeros((B, H, bq), acc),
            jnp.zeros((B, H, bq, v.shape[-1]), acc),
        )
        init = match_vma(init, q, k, v, extras)  # inside shard_map: carries vary like the inputs
        (m, l, o), _ = jax.lax.scan(kv_step, init, (jnp.arange(nk), kb, vb))
        out = o / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, jnp.log(jnp.where(l > 0, l, 1.0)) + jnp.where(jnp.isfinite(m), m, 0.0), -jnp.inf)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(q_chunk, (jnp.arange(nq), qb))  # [nq, B, H, bq, ...]
    out = jnp.moveaxis(out, 0, 2).reshape(B, H, nq * bq, -1)[:, :, :T]
    lse = jnp.moveaxis(lse, 0, 2).reshape(B, H, nq * bq)[:, :, :T]
    return out, lse


def backward(q, k, v, extras: TileExtras, static: TileStatic, out, lse, dout, dlse=None):
    """Recomputing backward. Returns ``(dq, dk, dv, dscore_mod_leaves)``.

    ``dscore_mod_leaves`` are the cotangents of the inexact leaves of
    ``extras.score_mod`` (see :func:`attnax.kernels._tiles.diff_leaves`).
    ``lse`` may come from a larger computation (ring attention): the tile
    probabilities are ``exp(s - lse)``.
    """
    B, H, T, _ = q.shape
    Hk = k.shape[1]
    acc = _acc_dtype(q.dtype)
    bq, bkv = static.block_q, static.block_kv
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1)
    if dlse is not None:
        delta = delta - dlse.astype(acc)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf).astype(acc)  # all-hidden rows: p = 0
    qb = _blocks(_grouped(q, Hk), 3, bq)
    dob = _blocks(_grouped(dout, Hk), 3, bq)
    lseb = _blocks(lse_safe, 2, bq)  # [nq, B, H, bq]
    deltab = _blocks(delta, 2, bq)
    kb = _blocks(k, 2, bkv)
    vb = _blocks(v, 2, bkv)
    nq, nk = qb.shape[0], kb.shape[0]
    maskable = has_any_mask(extras) or nk * bkv != static.S or nq * bq != static.T
    mod_leaves, rebuild = diff_leaves(extras.score_mod)

    # dq is accumulated in place across kv chunks (a carry), not stacked per
    # kv chunk: stacking would cost O(T * S / block_kv * D) memory.
    def kv_chunk(carry, xs):
        dmod, dq_acc = carry
        j, kj, vj = xs

        def q_step(inner, ys):
            i, qi, doi, lsei, deltai = ys
            pos = tile_positions(extras, B, H, i * bq, j * bkv, bq, bkv)
            vis = tile_visible(extras, static, pos)

            def update(inner):
                dk, dv, dmod, dq_acc = inner
                s_raw = _scores(qi, kj, static, acc)
                s, transform_vjp = jax.vjp(lambda s, leaves: tile_transform(rebuild(leaves), s, pos), s_raw, mod_leaves)
                p = jnp.where(vis, jnp.exp(jnp.where(vis, s, 0.0) - lsei[..., None]), 0.0)
                drop = tile_dropout_scale(extras, static, pos)
                pd = p if drop is None else p * drop
                dv_j = jnp.einsum(
                    "bkgts,bkgtd->bksd", _grouped(pd.astype(doi.dtype), Hk), doi, preferred_element_type=acc
                )
                dp = jnp.einsum("bkgtd,bksd->bkgts", doi, vj, preferred_element_type=acc).reshape(p.shape)
                if drop is not None:
                    dp = dp * drop
                ds = p * (dp - deltai[..., None])
                ds_raw, dleaves = transform_vjp(ds)
                ds_raw = (ds_raw * static.scale).astype(q.dtype)
                dq_i = jnp.einsum("bkgts,bksd->bkgtd", _grouped(ds_raw, Hk), kj, preferred_element_type=acc)
                dk_j = jnp.einsum("bkgts,bkgtd->bksd", _grouped(ds_raw, Hk), qi, preferred_element_type=acc)
                dmod = [a + g for a, g in zip(dmod, dleaves)]
                dq_acc = jax.lax.dynamic_update_index_in_dim(
                    dq_acc, jax.lax.dynamic_index_in_dim(dq_acc, i, 0, keepdims=False) + dq_i, i, 0
                )
                return dk + dk_j, dv + dv_j, dmod, dq_acc

            if not maskable:
                return update(inner), None
            return jax.lax.cond(jnp.any(vis), update, lambda c: c, inner), None

        init = (jnp.zeros(kj.shape, acc), jnp.zeros(vj.shape, acc), dmod, dq_acc)
        init = match_vma(init, q, k, v, dout, extras)
        (dk, dv, dmod, dq_acc), _ = jax.lax.scan(q_step, init, (jnp.arange(nq), qb, dob, lseb, deltab))
        return (dmod, dq_acc), (dk, dv)

    # jnp.shape: a scalar leaf may come back from jit as a typed Python scalar (no .shape).
    dmod0 = [jnp.zeros(jnp.shape(x), x.dtype) for x in mod_leaves]
    dq0 = jnp.zeros(qb.shape, acc)  # [nq, B, Hk, G, bq, D]
    dmod0, dq0 = match_vma((dmod0, dq0), q, k, v, dout, extras)
    (dmod, dq), (dk, dv) = jax.lax.scan(kv_chunk, (dmod0, dq0), (jnp.arange(nk), kb, vb))
    dq = jnp.moveaxis(dq, 0, 3).reshape(B, H, nq * bq, -1)[:, :, :T]
    dk = jnp.moveaxis(dk, 0, 2).reshape(B, Hk, -1, k.shape[-1])[:, :, : static.S]
    dv = jnp.moveaxis(dv, 0, 2).reshape(B, Hk, -1, v.shape[-1])[:, :, : static.S]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dmod


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, extras, static):
    return forward(q, k, v, extras, static)


def _attention_fwd(q, k, v, extras, static):
    out, lse = forward(q, k, v, extras, static)
    return (out, lse), (q, k, v, extras, out, lse)


def _attention_bwd(static, res, cts):
    q, k, v, extras, out, lse = res
    dout, dlse = cts
    dq, dk, dv, dmod = backward(q, k, v, extras, static, out, lse, dout, dlse)
    d_extras = TileExtras(
        score_mod=cotangent_tree(extras.score_mod, dmod),
        mask_mod=None, block_mask=None, mask=None, q_offset=None, kv_offset=None, seed=None,
    )  # fmt: skip
    return dq, dk, dv, d_extras


_attention.defvjp(_attention_fwd, _attention_bwd)


def _as_arrays(tree):
    # Python scalars in mods (a softcap of 50.0) become arrays: custom_vjp
    # needs JAX types, and their cotangents need a dtype.
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x) if isinstance(x, (int, float)) else x, tree)


def memory_efficient_attention(
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
    r"""Attention by chunks with an online softmax, in ``O(T + S)`` memory.

    Computes exactly what :func:`attnax.reference.attention_reference`
    defines, query chunk by query chunk, streaming key chunks through a
    running max and sum. The backward pass recomputes score tiles instead of
    storing probabilities. Tiles that every mask hides are skipped (a
    ``lax.cond``). Gradients reach the array leaves of ``score_mod``
    (learnable biases, ALiBi slopes).

    Args:
        query: ``[B, H, T, D]``.
        key: ``[B, Hk, S, D]``.
        value: ``[B, Hk, S, Dv]``.
        score_mod, mask_mod, mask, block_mask, scale, q_offset, dropout_rate, dropout_rng, deterministic, return_lse:
            see :class:`attnax.typing.AttentionFn`.
        **kernel_options: ``config`` (a :class:`MemoryEfficientConfig`) and
            ``kv_offset`` (absolute position of key 0, default 0: for a key
            shard or cache window).

    Returns:
        ``out [B, H, T, Dv]``, or ``(out, lse)`` with ``lse [B, H, T]`` float32.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import memory_efficient_attention, causal_mod
        >>> from attnax.reference import attention_reference
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 4, 100, 32))
        >>> out = memory_efficient_attention(q, k, v, score_mod=causal_mod())
        >>> bool(jnp.allclose(out, attention_reference(q, k, v, score_mod=causal_mod()), atol=1e-5))
        True
    """
    check_kernel_options("memory_efficient_attention", kernel_options, ("config", "kv_offset"))
    args = check_attention_args(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask,
        scale=scale, q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic,
    )  # fmt: skip
    config = kernel_options.get("config") or MemoryEfficientConfig()
    if not isinstance(config, MemoryEfficientConfig):
        raise TypeError(f"`config` must be a MemoryEfficientConfig; got {type(config).__name__}.")
    d = args.dims
    static = TileStatic(
        scale=args.scale, dropout_rate=args.dropout_rate, T=d.T, S=d.S,
        block_q=min(config.block_q, d.T), block_kv=min(config.block_kv, d.S),
    )  # fmt: skip
    # Plain callables (lambdas) are not JAX types: custom_vjp needs them wrapped
    # as pytrees with the function as static metadata.
    extras = TileExtras(
        score_mod=None if score_mod is None else _as_arrays(_as_score_mod(score_mod)),
        mask_mod=None if mask_mod is None else _as_mask_mod(mask_mod),
        block_mask=block_mask,
        mask=args.mask,
        q_offset=jnp.asarray(args.q_offset, jnp.int32),
        kv_offset=jnp.asarray(kernel_options.get("kv_offset", 0), jnp.int32),
        seed=_dropout.key_to_seed(args.dropout_rng) if args.dropout_active else None,
    )
    out, lse = _attention(query, key, value, extras, static)
    return (out, lse) if return_lse else out
