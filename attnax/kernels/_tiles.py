"""What every tiled XLA kernel does to one ``[B, H, bq, bkv]`` score tile.

The memory-efficient kernel, ring attention's inner blocks and the paged XLA
path share these helpers, so that mods, masks, padding and dropout mean the
same thing everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax import _dropout
from attnax.score_mods._base import split_score_mod


@dataclasses.dataclass(frozen=True)
class TileStatic:
    """Static settings of a tiled kernel call (hashable: a ``nondiff_argnum``)."""

    scale: float
    dropout_rate: float
    T: int  # true (unpadded) query length
    S: int  # true (unpadded) key length
    block_q: int
    block_kv: int


@dataclasses.dataclass(frozen=True)
class TileExtras:
    """The traced, non-differentiable-or-mod inputs of a tiled kernel call."""

    score_mod: Any
    mask_mod: Any
    block_mask: Any
    mask: Any  # rank-4 bool, locally indexed, size-1 dims broadcast; or None
    q_offset: Any  # int32 scalar or [B]
    kv_offset: Any  # int32 scalar: absolute position of key 0
    seed: Any  # uint32[2] or None


jax.tree_util.register_dataclass(
    TileExtras,
    data_fields=["score_mod", "mask_mod", "block_mask", "mask", "q_offset", "kv_offset", "seed"],
    meta_fields=[],
)


def tile_positions(extras: TileExtras, B: int, H: int, q_start, kv_start, bq: int, bkv: int):
    """Broadcastable ``(b, h, q_idx, kv_idx, q_local, kv_local)`` for one tile."""
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(H, dtype=jnp.int32)[None, :, None, None]
    q_local = q_start + jnp.arange(bq, dtype=jnp.int32)[None, None, :, None]
    kv_local = kv_start + jnp.arange(bkv, dtype=jnp.int32)[None, None, None, :]
    q_off = jnp.asarray(extras.q_offset, jnp.int32)
    q_idx = q_local + (q_off.reshape(-1, 1, 1, 1) if q_off.ndim else q_off)
    kv_idx = kv_local + jnp.asarray(extras.kv_offset, jnp.int32)
    return b, h, q_idx, kv_idx, q_local, kv_local


def _gather_dense(mask, b, h, q_local, kv_local):
    idx = tuple(0 if n == 1 else i for n, i in zip(mask.shape, (b, h, q_local, kv_local)))
    return mask[idx]


def tile_visible(extras: TileExtras, static: TileStatic, pos) -> jax.Array:
    """Boolean visibility of a tile: bounds, mods, dense mask and block mask."""
    b, h, q_idx, kv_idx, q_local, kv_local = pos
    vis = (q_local < static.T) & (kv_local < static.S)
    _, mask_fn = split_score_mod(extras.score_mod, extras.mask_mod)
    if mask_fn is not None:
        vis = vis & mask_fn(b, h, q_idx, kv_idx)
    if extras.mask is not None:
        vis = vis & _gather_dense(extras.mask, b, h, q_local, kv_local)
    if extras.block_mask is not None:
        vis = vis & extras.block_mask.mask(b, h, q_idx, kv_idx)
    return vis


def tile_transform(score_mod, s, pos):
    """Applies the score rewrite of ``score_mod`` (not its mask) to a tile."""
    transform, _ = split_score_mod(score_mod, None)
    if transform is None:
        return s
    b, h, q_idx, kv_idx, _, _ = pos
    return transform(s, b, h, q_idx, kv_idx).astype(s.dtype)


def tile_dropout_scale(extras: TileExtras, static: TileStatic, pos):
    """``keep / (1 - rate)`` for the tile, or None when dropout is off."""
    if static.dropout_rate == 0.0:
        return None
    b, h, q_idx, kv_idx, _, _ = pos
    keep = _dropout.keep_mask(extras.seed, static.dropout_rate, b, h, q_idx, kv_idx)
    return jnp.where(keep, 1.0 / (1.0 - static.dropout_rate), 0.0)


def has_any_mask(extras: TileExtras) -> bool:
    """Whether tiles can be hidden by something other than sequence bounds."""
    _, mask_fn = split_score_mod(extras.score_mod, extras.mask_mod)
    return mask_fn is not None or extras.mask is not None or extras.block_mask is not None


def diff_leaves(tree):
    """Splits a pytree into its inexact (differentiable) leaves and a rebuild function."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_diff = [hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def rebuild(new):
        it = iter(new)
        return jax.tree_util.tree_unflatten(treedef, [next(it) if d else x for x, d in zip(leaves, is_diff)])

    return [x for x, d in zip(leaves, is_diff) if d], rebuild


def cotangent_tree(tree, diff_grads):
    """A cotangent pytree for ``tree``: ``diff_grads`` on inexact leaves, None elsewhere."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    it = iter(diff_grads)
    out = [next(it) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact) else None for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def varying_axes(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside it)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # jax < 0.10 kept it on the aval
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(vma or ())


def match_vma(tree, *refs):
    """Marks the leaves of ``tree`` as varying over every mesh axis a leaf of ``refs`` varies over.

    Inside ``shard_map`` (``check_vma=True``) a loop carry initialised with
    ``jnp.zeros`` is device-invariant while the values computed from sharded
    inputs vary, and ``scan``/``cond`` demand equal types. Outside
    ``shard_map`` this is the identity.
    """
    axes = frozenset().union(*(varying_axes(r) for r in jax.tree_util.tree_leaves(refs)))
    if not axes:
        return tree

    def cast(x):
        missing = tuple(a for a in sorted(axes, key=str) if a not in varying_axes(x))
        if not missing:
            return x
        pcast = getattr(jax.lax, "pcast", None)
        return pcast(x, missing, to="varying") if pcast is not None else jax.lax.pvary(x, missing)

    return jax.tree_util.tree_map(cast, tree)
