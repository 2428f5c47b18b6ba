"""``pallas_flash_attention``: the Pallas flash kernel, with mods fused.

This module holds the public function, its config and the preparation every
backend shares (padding, tile lists from masks, mod operands). The kernels
live in per-backend, per-generation modules (``_pallas_mgpu_sm90.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from attnax import _dropout
from attnax._validation import AttentionDims, check_attention_args
from attnax.block_mask import EMPTY, FULL, PARTIAL, classify_tiles
from attnax.kernels import _pallas_mgpu_common as common
from attnax.kernels import _pallas_mgpu_leaf_grads as leaf_grads
from attnax.kernels import _pallas_mgpu_sm90 as sm90
from attnax.kernels import _pallas_mgpu_sm90_bwd as sm90_bwd
from attnax.score_mods._base import (
    AttentionMod,
    ComposedMod,
    _AndMask,
    _as_mask_mod,
    _as_score_mod,
    and_masks,
    mod_dataclass,
)
from attnax.score_mods._prebuilt import CausalMod, SlidingWindowMod, leaf_at

__all__ = ["PallasFlashConfig", "pallas_flash_attention"]

_BACKENDS = ("mosaic_gpu",)
_LAYOUTS = ("BHSD", "BSHD")


@dataclasses.dataclass(frozen=True)
class PallasFlashConfig:
    """Tiling of the Pallas flash kernel.

    Attributes:
        block_q: query rows per compute warpgroup; a CTA covers ``2 * block_q``
            rows (Mosaic GPU: a multiple of 64).
        block_kv: keys per tile (a multiple of 64).
        num_stages: depth of the shared-memory ring K/V stream through (>= 2).
    """

    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 64 or v % 64:
                raise ValueError(f"`PallasFlashConfig.{name}` must be a positive multiple of 64; got {v!r}.")
        if not isinstance(self.num_stages, int) or self.num_stages < 2:
            raise ValueError(f"`PallasFlashConfig.num_stages` must be an int >= 2; got {self.num_stages!r}.")


def default_config(
    head_dim: int, *, kv_len: int | None = None, masked: bool = True, causal_only: bool = False
) -> PallasFlashConfig:
    """Heuristic tiling per head dim (shared memory of an H100: 227 KiB).

    Unmasked attention with ``head_dim <= 64`` over at least 2048 keys takes
    256-key tiles: the score tile then has room in the registers, and the
    longer tiles halve the per-tile softmax and barrier overhead (measured on
    H100, D=64 forward: 10-14% faster at 8k-16k keys). So does a plain causal
    mask (``causal_only``: the only mask is :func:`causal_mod`, no score
    transform, no dropout) over at least 4096 keys: its one partial tile per
    row wastes little next to the full ones (measured on H100, D=64 causal
    forward against 128-key tiles: 5-7% faster at 4k-16k, 1% slower at 2k).
    Other masks keep 128-key tiles, which waste less work on the diagonal and
    edges of sparse masks (windows, documents).
    """
    if head_dim <= 64 and kv_len is not None and (
        (not masked and kv_len >= 2048) or (causal_only and kv_len >= 4096)
    ):
        return PallasFlashConfig(block_q=64, block_kv=256, num_stages=2)
    if head_dim <= 128:
        return PallasFlashConfig(block_q=64, block_kv=128, num_stages=2)
    return PallasFlashConfig(block_q=64, block_kv=64, num_stages=2)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x, axis: int, n: int):
    if x.shape[axis] == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths)


def _mask_parts(score_mod, mask_mod, block_mask):
    """The pytrees whose masks AND together: a score mod's mask, a mask mod, a block mask's mod."""
    return (
        score_mod if score_mod is not None and score_mod.has_mask else None,
        mask_mod,
        block_mask.mask_mod if block_mask is not None else None,
    )


def _combine_masks(parts):
    """One mask function (or None) from :func:`_mask_parts` (possibly rebuilt in a kernel)."""
    smod, mmod, bmod = parts
    fns = [f for f in (smod.mask if smod is not None else None, mmod, bmod) if f is not None]
    if not fns:
        return None

    def mask_fn(b, h, q_idx, kv_idx):
        out = fns[0](b, h, q_idx, kv_idx)
        for f in fns[1:]:
            out = jnp.logical_and(out, f(b, h, q_idx, kv_idx))
        return out

    return mask_fn


def _depends_on(mask_fn, B, H):
    """Whether a mask's value depends on the batch and head indices (by shapes)."""
    b = jax.ShapeDtypeStruct((B, 1, 1, 1), jnp.int32)
    h = jax.ShapeDtypeStruct((1, H, 1, 1), jnp.int32)
    q = jax.ShapeDtypeStruct((1, 1, 2, 1), jnp.int32)
    kv = jax.ShapeDtypeStruct((1, 1, 1, 2), jnp.int32)
    shape = jax.eval_shape(mask_fn, b, h, q, kv).shape
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return shape[0] != 1, shape[1] != 1


def _classified_masks(parts, block_mask_fits: bool):
    """The masks to classify element-wise or analytically, as one mask mod.

    An ``and_masks`` of pytrees keeps ``block_classes``, so prebuilt masks
    (causal, windows, prefix-LM, documents) are classified from tile ranges
    instead of element by element. A block mask whose tiles fit the kernel's
    contributes its known classes instead of its mask mod.
    """
    smod, mmod, bmod = parts
    masks = [smod.mask_mod if smod is not None else None, mmod, None if block_mask_fits else bmod]
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else and_masks(*masks)


def _block_mask_fits(block_mask, block_q: int, block_kv: int) -> bool:
    if block_mask is None:
        return False
    ubq, ubkv = block_mask.block_size
    return ubkv % block_kv == 0 and ubq % block_q == 0


def tile_classes(parts, block_mask, dims, q_offset, block_q: int, block_kv: int, kv_offset=0):
    """int8 classes ``[Bm, Hm, nq, nk]`` of the ``(block_q, block_kv)`` tiles.

    ``parts`` come from :func:`_mask_parts`. A user ``block_mask`` (from
    :func:`~attnax.block_mask.create_block_mask`, so that its mask mod agrees
    with its classes) with tiles of ``(k * block_q, m * block_kv)`` lends its
    classes (each finer tile inherits its parent's, exact for empty and full
    tiles); with other tiles its mask mod is classified at the kernel's tiles.
    """
    fits = _block_mask_fits(block_mask, block_q, block_kv)
    if block_mask is not None and not fits and block_mask.mask_mod is None:
        raise ValueError(
            f"`block_mask` has block_size {block_mask.block_size} and no mask_mod; this kernel's tiles are "
            f"({block_q}, {block_kv}): build it with create_block_mask(..., block_size=(128, {block_kv}))."
        )
    classes = None
    mask_fn = _classified_masks(parts, fits)
    if mask_fn is not None:
        dep_b, dep_h = _depends_on(mask_fn, dims.B, dims.H)
        if jnp.ndim(q_offset):
            dep_b = True
        classes = classify_tiles(
            _as_mask_mod(mask_fn), dims.B if dep_b else 1, dims.H if dep_h else 1, dims.T, dims.S, block_q, block_kv,
            q_offset, kv_offset,
        )  # fmt: skip
    if fits:
        ubq, ubkv = block_mask.block_size
        other = jnp.repeat(block_mask.block_classes, ubq // block_q, axis=2)[:, :, : -(-dims.T // block_q)]
        other = jnp.repeat(other, ubkv // block_kv, axis=3)[..., : -(-dims.S // block_kv)]
        classes = other if classes is None else jnp.minimum(classes, other)
    return classes


def kernel_tiles(classes, ragged_last: bool):
    """What the kernels read: int32 tile classes and each row's non-empty range.

    Returns ``(classes, bounds)``: classes ``[..., n]`` (0 empty, 1 partial,
    2 full) and ``bounds [..., 6]``: the ``[lo, hi)`` range of non-empty tiles
    (kernels loop over it and skip empty tiles inside), how many there are,
    how many of them are full, and the first full and first partial tile (``n``
    when there is none; walks that take full tiles first start there). With ``ragged_last``
    the last column holds the ragged end of the sequence and always counts as
    partial, so the kernel applies the bound there. Only elementwise ops and
    reductions: no sort, scan or scatter on the hot path.
    """
    classes = classes.astype(jnp.int32)
    if ragged_last:
        last = classes[..., -1:]
        classes = jnp.concatenate([classes[..., :-1], jnp.where(last == FULL, PARTIAL, last)], axis=-1)
    n = classes.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32).reshape((1,) * (classes.ndim - 1) + (n,))
    nonempty = classes != EMPTY
    full = classes == FULL
    first_full = jnp.min(jnp.where(full, idx, n), axis=-1)
    first_partial = jnp.min(jnp.where(classes == PARTIAL, idx, n), axis=-1)
    lo = jnp.minimum(first_full, first_partial)
    hi = jnp.max(jnp.where(nonempty, idx + 1, 0), axis=-1)
    count = jnp.sum(nonempty, axis=-1, dtype=jnp.int32)
    n_full = jnp.sum(full, axis=-1, dtype=jnp.int32)
    return classes, jnp.stack([lo, jnp.maximum(hi, lo), count, n_full, first_full, first_partial], axis=-1)


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    config: PallasFlashConfig
    interpret: bool
    dims: object
    q_offset: int | None  # the static q_offset when it is a Python int (cheaper tile classes)
    dropout_rate: float = 0.0
    bshd: bool = False  # q, k, v (and out, gradients) are [B, S, H, D]


def _class_offset(q_offset, st: _Static):
    return q_offset if st.q_offset is None else st.q_offset


@mod_dataclass(static=("rate", "heads"))
class _Dropout:
    """Dropout in the kernels: the keep mask of :mod:`attnax._dropout`, hashed per tile.

    ``state`` holds the hash state after the seed, ``b`` and ``h`` for every
    ``(b, h)`` (computed once, outside the kernel); the kernels finish the hash
    with each score's query and key positions.
    """

    state: Any  # uint32 [B * H]
    rate: float
    heads: int

    def keep(self, b, h, q_positions, kv_idx, expand):
        """``q_positions``: a vector along the tile's query axis; ``expand`` makes it a tile."""
        state = _dropout.mix(self.state[b * self.heads + h], q_positions)  # once per query row
        return _dropout.mix(expand(state), kv_idx) >= _dropout.threshold(self.rate)


def _dropout_mod(seed, st: _Static) -> _Dropout | None:
    if not st.dropout_rate:
        return None
    d = st.dims
    b, h = jnp.arange(d.B, dtype=jnp.int32)[:, None], jnp.arange(d.H, dtype=jnp.int32)[None, :]
    return _Dropout(_dropout.head_state(seed, b, h).reshape(-1), st.dropout_rate, d.H)


@dataclasses.dataclass
class _Prepared:
    """Everything the forward and backward kernels share for one call."""

    parts: tuple
    mask_fn: object
    has_transform: bool
    sparse: bool
    Tp: int
    Sp: int
    offsets: object  # int32 [2B]: the query offset of each batch row, then the key offset (repeated)
    operands: list
    build_mods: object
    pad: object  # pads (x, seq_len, head_dim) along the sequence and head-dim axes


def _prepare(q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st: _Static) -> _Prepared:
    d, cfg = st.dims, st.config
    bq_cta = 2 * cfg.block_q
    parts = _mask_parts(score_mod, mask_mod, block_mask)
    mask_fn = _combine_masks(parts)
    has_transform = score_mod is not None and score_mod.has_transform
    mods = (score_mod if has_transform else None, parts, _dropout_mod(seed, st))
    operands, build = common.flatten_mods(
        mods, pad=max(bq_cta, cfg.block_kv), probe=common.exercise_mods(_combine_masks)
    )

    def build_mods(refs, ctx_getter, batch=None, prefixes=None, scalar_hook=None):
        """``(transform, mask_fn, keep_fn)`` in a kernel; each None when absent."""
        smod, kparts, drop = build(refs, ctx_getter, batch, prefixes, scalar_hook)
        return (
            common.KernelTransform(smod) if smod is not None else None,
            _combine_masks(kparts),
            drop.keep if drop is not None else None,
        )

    def pad(x, n, dim):
        return _pad_axis(_pad_axis(x, 1 if st.bshd else 2, n), 3, _round_up(dim, 64))

    return _Prepared(
        parts=parts, mask_fn=mask_fn, has_transform=has_transform,
        sparse=mask_fn is not None or block_mask is not None,
        Tp=_round_up(d.T, bq_cta), Sp=_round_up(d.S, cfg.block_kv),
        offsets=jnp.concatenate([
            jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (d.B,)),
            jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (d.B,)),
        ]),
        operands=operands, build_mods=build_mods, pad=pad,
    )  # fmt: skip


#: Forward walks of at most this many key tiles run on a persistent grid (see
#: ``forward_kernel_call``: measured faster for walks of 8-16 tiles, no gain
#: from 32 tiles on).
_PERSISTENT_MAX_WALK = 16


def _key_span(mod) -> int | None:
    """How many consecutive keys a query can see at most, when a mask states it statically
    (a sliding window bounded on both sides, alone or ANDed with other masks); else None."""
    if isinstance(mod, SlidingWindowMod):
        return mod.left + mod.right + 1 if mod.left >= 0 and mod.right >= 0 else None
    if isinstance(mod, (ComposedMod, _AndMask)):
        spans = [s for s in (_key_span(m) for m in mod.mods) if s is not None]
        return min(spans) if spans else None
    return None


def _forward_walk_bound(parts, d, cfg: PallasFlashConfig) -> int:
    """An upper bound on the key tiles one forward CTA (``2 * block_q`` query rows) visits."""
    n_tiles = -(-d.S // cfg.block_kv)
    spans = [s for s in (_key_span(p) for p in parts if p is not None) if s is not None]
    if not spans:
        return n_tiles
    # The CTA's rows see a run of min(spans) + 2 * block_q - 1 keys, which may
    # straddle one more tile boundary than its length needs.
    return min(n_tiles, -(-(min(spans) + 2 * cfg.block_q - 1) // cfg.block_kv) + 1)


def _forward(q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st: _Static):
    d, cfg = st.dims, st.config
    pr = _prepare(q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st)
    lists = None
    if pr.sparse:
        classes = tile_classes(
            pr.parts, block_mask, d, _class_offset(q_offset, st), 2 * cfg.block_q, cfg.block_kv, kv_offset
        )
        lists = kernel_tiles(classes, d.S % cfg.block_kv != 0)
    fst = sm90.FwdStatic(
        block_q=cfg.block_q, block_kv=cfg.block_kv, num_stages=cfg.num_stages, scale=st.scale, T=d.T, S=d.S,
        group=d.group, has_transform=pr.has_transform, has_mask=pr.mask_fn is not None, sparse=pr.sparse,
        mask_tail=d.S % cfg.block_kv != 0, dropout=st.dropout_rate, interpret=st.interpret, bshd=st.bshd,
        mod_batch=d.B, workers=common.persistent_workers(st.interpret),
        short_walks=_forward_walk_bound(pr.parts, d, cfg) <= _PERSISTENT_MAX_WALK,
    )  # fmt: skip
    interpret = common.interpret_params() if st.interpret else None
    out, lse = common.vmappable_call(
        lambda arrays, offsets, lists, ops, build: sm90.forward_kernel_call(
            *arrays, offsets, lists, ops, build, fst, interpret
        ),
        (pr.pad(q, pr.Tp, d.D), pr.pad(k, pr.Sp, d.D), pr.pad(v, pr.Sp, d.Dv)), pr.offsets, lists, pr.operands,
        pr.build_mods,
    )  # fmt: skip
    return _unpad(out, d.T, d.Dv, st), lse[:, :, : d.T]


def _unpad(x, n, dim, st: _Static):
    """The first ``n`` rows and ``dim`` features of a padded q/k/v-like array."""
    return x[:, :n, :, :dim] if st.bshd else x[:, :, :n, :dim]


# Backward tiles: dQ streams kv tiles of _BWD_DQ_BLOCK_KV keys past 2 x 64 query
# rows (64 keys when a score mod transforms scores: its temporaries and the
# 64 x 128 score and dP tiles would not fit the registers together; measured on
# H100: ALiBi's dQ kernel 5.1 -> 3.0 ms, causal alone 2.1 -> 2.2 ms); dK/dV
# streams query tiles of _BWD_BLOCK_Q rows past 2 x _BWD_BLOCK_KV key rows (keys
# padded to a multiple of 128).
_BWD_BLOCK_Q, _BWD_BLOCK_KV, _BWD_STAGES = 64, 64, 2
_BWD_DQ_BLOCK_KV = {False: 128, True: 64}  # by whether a score transform runs


def _bwd_tiles(D: int, Dv: int, has_transform: bool):
    """``(dQ key tile, ring stages, dK/dV parts)`` for the head dims.

    Up to 128, one dK/dV kernel keeps both accumulators and the rings have
    two stages. Wider heads (to 256) would need 2 x 128 registers per thread
    for the two accumulators: dK and dV then run as two launches of the same
    kernel, one accumulator each. Their tiles stay 64 rows (wgmma contracts
    over multiples of 64), so the streamed ring has one stage: K, V (or the
    dV staging buffer) and Q/dO then take 192 KiB of the 227 KiB of shared
    memory, and the dQ kernel's 2 x 64 rows of Q and dO plus K and V as much.
    """
    if max(D, Dv) <= 128:
        return _BWD_DQ_BLOCK_KV[has_transform], _BWD_STAGES, ("both",)
    return 64, 1, ("dk", "dv")


def _backward(
    q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, out, lse, dout, dlse, st: _Static, leaf_ids=()
):
    """``(dq, dk, dv, {leaf id: gradient})``: gradients to the score mod's leaves ``leaf_ids`` (inexact ones)."""
    d, cfg = st.dims, st.config
    pr = _prepare(q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st)
    sites = records = None
    if leaf_ids and pr.has_transform:
        sites, records = leaf_grads.probe_sites(score_mod, tuple(leaf_ids), d.B, d.H)
    log2e = 1.4426950408889634
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    if st.bshd:
        delta = jnp.swapaxes(delta, 1, 2)  # [B, H, T], like the LSE
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    # exp2(s - inf) = 0: rows with nothing visible (and padding rows) get p = 0.
    lse2 = jnp.where(jnp.isfinite(lse), lse * log2e, jnp.inf)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, pr.Tp - d.T)), constant_values=jnp.inf)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, pr.Tp - d.T)))
    qp, dop = pr.pad(q, pr.Tp, d.D), pr.pad(dout.astype(q.dtype), pr.Tp, d.Dv)
    # Whole dK/dV CTAs, from the true key length: the forward's key tile may be
    # longer (256), and a dK/dV CTA past the last 128 keys has no tile list.
    Sk = _round_up(d.S, 2 * _BWD_BLOCK_KV)
    kp, vp = pr.pad(k, Sk, d.D), pr.pad(v, Sk, d.Dv)
    dq_lists = dkv_lists = None
    dq_bkv, stages, parts = _bwd_tiles(d.D, d.Dv, pr.has_transform)
    if pr.sparse:
        q_cls = _class_offset(q_offset, st)
        classes = tile_classes(pr.parts, block_mask, d, q_cls, 2 * cfg.block_q, dq_bkv, kv_offset)
        dq_lists = kernel_tiles(classes, d.S % dq_bkv != 0)
        classes_t = tile_classes(pr.parts, block_mask, d, q_cls, _BWD_BLOCK_Q, 2 * _BWD_BLOCK_KV, kv_offset)
        dkv_lists = kernel_tiles(jnp.swapaxes(classes_t, 2, 3), False)
    common_static = dict(
        scale=st.scale, T=d.T, S=d.S, group=d.group, has_transform=pr.has_transform,
        unit_derivative=pr.has_transform and common.unit_score_derivative(score_mod),
        has_mask=pr.mask_fn is not None, sparse=pr.sparse, dropout=st.dropout_rate, interpret=st.interpret,
        num_stages=stages, bshd=st.bshd, mod_batch=d.B, leaf_sites=sites,
    )  # fmt: skip
    arrays = (qp, kp, vp, dop, lse2, delta)

    def launch(kernel_call, lists, operands, **tiles):
        bst = sm90_bwd.BwdStatic(**tiles, **common_static)
        return common.vmappable_call(
            lambda arrays, offsets, lists, ops, build: kernel_call(*arrays, offsets, lists, ops, build, bst),
            arrays, pr.offsets, lists, operands, pr.build_mods,
        )  # fmt: skip

    dq, *dq_leaf = launch(sm90_bwd.dq_kernel_call, dq_lists, pr.operands, block_q=cfg.block_q, block_kv=dq_bkv)
    outs = {}
    for part in parts:  # dK and dV together, or (wide heads) one launch each
        if st.interpret:
            # GPU interpret mode simulates one kernel at a time: launches that XLA
            # could run concurrently may deadlock, so each waits for the one before.
            arrays, _ = jax.lax.optimization_barrier((arrays, (dq, outs)))
        outs[part] = launch(
            sm90_bwd.dkv_kernel_call, dkv_lists, pr.operands + common.transposed_twins(pr.operands),
            block_q=_BWD_BLOCK_Q, block_kv=_BWD_BLOCK_KV, part=part,
        )  # fmt: skip
    if "both" in outs:
        dk, dv, *dkv_leaf = outs["both"]
    else:
        (dk, *dkv_leaf), (dv,) = outs["dk"], outs["dv"]
    grads = {}
    if sites is not None:
        visited = _visited(classes, (2 * cfg.block_q, dq_bkv), (pr.Tp, Sk), d) if pr.sparse else None
        grads = _leaf_gradients(score_mod, sites, records, dq_leaf, dkv_leaf, visited, pr, d)
    dq, dk, dv = _unpad(dq, d.T, d.D, st), _unpad(dk, d.S, d.D, st), _unpad(dv, d.S, d.Dv, st)
    return dq, dk, dv, grads


def _visited(classes, block, shape, d):
    """``[B, H, *shape]``: whether the dQ kernel visits each score (its tiles are ``block``)."""
    visited = jnp.broadcast_to(classes != EMPTY, (d.B, d.H, *classes.shape[2:]))
    visited = jnp.repeat(jnp.repeat(visited, block[0], axis=2), block[1], axis=3)[..., : shape[0], : shape[1]]
    return jnp.pad(visited, ((0, 0), (0, 0), (0, shape[0] - visited.shape[2]), (0, shape[1] - visited.shape[3])))


def _leaf_gradients(score_mod, sites, records, dq_outs, dkv_outs, visited, pr: _Prepared, d):
    """The leaf gradients from the backward kernels' site outputs (see :mod:`._pallas_mgpu_leaf_grads`)."""
    dq_outs, dkv_outs = iter(dq_outs), iter(dkv_outs)
    rows, tiles = sites.where(leaf_grads.DQ_ROWS), sites.where(leaf_grads.DQ_TILES)
    values = []
    for m, kind in enumerate(sites.kinds):
        if m in rows:
            v = next(dq_outs)
            values.append(jnp.sum(v, axis=-1) if kind == "scalar" else v)
        elif m not in tiles:
            values.append(next(dkv_outs))
        else:
            values.append(None)
    for m in tiles:  # tiles the dQ kernel did not visit hold garbage
        v = next(dq_outs)
        values[m] = v if visited is None else jnp.where(visited, v, 0.0)
    # Padding rows and keys (beyond T and S) are no positions of this call.
    crop = {"scalar": (), "q": (d.T,), "kv": (d.S,), "tile": (d.T, d.S)}
    values = [v[(..., *(slice(0, n) for n in crop[kind]))] for v, kind in zip(values, sites.kinds)]
    return leaf_grads.assemble(score_mod, sites, records, values, pr.offsets[: d.B], pr.offsets[d.B :])


def _value(x):
    return x.value if isinstance(x, jax.custom_derivatives.CustomVJPPrimal) else x


def _is_primal(x) -> bool:
    return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


def _inexact(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _LeafRequest:
    """The score mod's leaves whose gradients the backward computes (a static residual)."""

    ids: tuple[int, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _attention(q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st):
    return _forward(q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st)


def _attention_fwd(q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st):
    # Only the perturbed inexact leaves of the score mod get gradients (computed
    # in the backward kernels); mask leaves select scores, their gradient is zero.
    leaves = jax.tree_util.tree_leaves(score_mod, is_leaf=_is_primal)
    request = _LeafRequest(tuple(i for i, x in enumerate(leaves) if x.perturbed and _inexact(x.value)))
    q, k, v, q_offset, kv_offset, seed = map(_value, (q, k, v, q_offset, kv_offset, seed))
    score_mod, mask_mod, block_mask = jax.tree_util.tree_map(
        _value, (score_mod, mask_mod, block_mask), is_leaf=_is_primal
    )
    out, lse = _forward(q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, st)
    return (out, lse), (q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, out, lse, request)


def _attention_bwd(st, res, cts):
    q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, out, lse, request = res
    dout, dlse = cts
    if isinstance(dout, jax.custom_derivatives.SymbolicZero):
        dout = jnp.zeros(out.shape, out.dtype)
    if isinstance(dlse, jax.custom_derivatives.SymbolicZero):
        dlse = None
    dq, dk, dv, grads = _backward(
        q, k, v, q_offset, kv_offset, score_mod, mask_mod, block_mask, seed, out, lse, dout, dlse, st, request.ids
    )
    leaves, treedef = jax.tree_util.tree_flatten(score_mod)
    dmod = jax.tree_util.tree_unflatten(
        treedef, [grads.get(i, jnp.zeros_like(x)) if i in request.ids else None for i, x in enumerate(leaves)]
    )
    return dq, dk, dv, None, None, dmod, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


# -- the block interface of ring attention ----------------------------------------
# ``forward``/``backward`` take the memory-efficient kernel's signatures (see
# :mod:`attnax.kernels._ring`): one block of a longer sequence, with absolute
# ``q_offset``/``kv_offset``, and a backward that takes the global LSE.

#: Mosaic GPU kernels keep the varying-axis types of their operands on their
#: refs (jax 0.10), so loop carries inside them mismatch under ``check_vma``:
#: ring attention runs its ``shard_map`` with ``check_vma=False`` for them.
traces_with_vma = False


def _block_static(q, k, v, extras, static, interpret: bool) -> _Static:
    why = pallas_unsupported_reason(q, k, v, mask=extras.mask, interpret=interpret)
    if why is None and extras.block_mask is not None:
        why = "ring blocks take their masks from mods, not a block_mask"
    if why is None and extras.mask is not None:
        why = "ring blocks take their masks from mods, not a dense mask"
    if why is not None:
        raise NotImplementedError(f"ring attention with inner='pallas' cannot serve these arguments: {why}")
    B, H, T, D = q.shape
    _, Hk, S, Dv = v.shape
    dims = AttentionDims(B=B, H=H, Hk=Hk, T=T, S=S, D=D, Dv=Dv)
    rate = static.dropout_rate if extras.seed is not None else 0.0
    return _Static(
        scale=static.scale, config=default_config(D), interpret=interpret, dims=dims, q_offset=None, dropout_rate=rate
    )


def _block_mods(q, extras):
    smod = None if extras.score_mod is None else _as_score_mod(extras.score_mod)
    mmod = None if extras.mask_mod is None else _as_mask_mod(extras.mask_mod)
    return smod, mmod, jnp.broadcast_to(jnp.asarray(extras.q_offset, jnp.int32), (q.shape[0],))


def forward(q, k, v, extras, static, *, interpret: bool = False):
    """One ring block: ``(out, lse)`` of ``q`` against ``k, v`` at absolute offsets."""
    st = _block_static(q, k, v, extras, static, interpret)
    smod, mmod, q_off = _block_mods(q, extras)
    return _forward(q, k, v, q_off, extras.kv_offset, smod, mmod, None, extras.seed, st)


def backward(q, k, v, extras, static, out, lse, dout, dlse=None, *, interpret: bool = False):
    """The block's ``(dq, dk, dv, dmod)``; ``lse``/``out`` are the global ones.

    ``dmod`` holds the gradients of the score mod's inexact leaves (the
    order of ``diff_leaves``), computed in the backward kernels.
    """
    st = _block_static(q, k, v, extras, static, interpret)
    smod, mmod, q_off = _block_mods(q, extras)
    leaves = [] if smod is None else jax.tree_util.tree_leaves(smod)
    ids = tuple(i for i, x in enumerate(leaves) if _inexact(x))  # as diff_leaves picks them
    dq, dk, dv, grads = _backward(
        q, k, v, q_off, extras.kv_offset, smod, mmod, None, extras.seed, out, lse, dout, dlse, st, ids
    )
    return dq, dk, dv, [grads.get(i, jnp.zeros(jnp.shape(leaves[i]), leaves[i].dtype)) for i in ids]


def _on_gpu() -> bool:
    try:
        return jax.default_backend() == "gpu"
    except RuntimeError:
        return False


def pallas_unsupported_reason(query, key, value, *, mask=None, q_offset=0, interpret=False, **_) -> str | None:
    """Why :func:`pallas_flash_attention` cannot serve these arguments, or None."""
    if not interpret and not _on_gpu():
        return "the Mosaic GPU kernel needs an NVIDIA GPU (or interpret=True on CPU)"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"the Mosaic GPU kernel computes in bfloat16/float16; got {query.dtype}"
    if mask is not None and jnp.ndim(mask) >= 2 and jnp.shape(mask)[-2] > 1 and not isinstance(q_offset, int):
        return (
            "a dense `mask=` with a row per query needs a static Python int `q_offset` in the Pallas kernel "
            "(express the mask as a mask_mod, or use implementation='memory_efficient')"
        )
    if max(query.shape[-1], value.shape[-1]) > 256:
        return f"head dims above 256 are not supported; got D={query.shape[-1]}, Dv={value.shape[-1]}"
    return None


@mod_dataclass
class _DenseMaskMod(AttentionMod):
    """A dense ``mask=`` array as a mask mod.

    ``visible`` is ``[Bm, Hm, Tm, S]`` (each of ``Bm``, ``Hm``, ``Tm`` full or
    1); with ``Tm > 1`` its rows sit at absolute query positions (padded in
    front by the static ``q_offset``), so the kernels index it by ``q_idx``.
    """

    visible: Any
    has_mask: ClassVar[bool] = True

    def mask(self, b, h, q_idx, kv_idx):
        return leaf_at(self.visible, b, h, q_idx, kv_idx) != 0


def _dense_mask_mod(mask, q_offset) -> _DenseMaskMod:
    """``mask``: rank 4, broadcastable to ``[B, H, T, S]`` (from ``check_attention_args``)."""
    if mask.shape[2] > 1 and q_offset:
        mask = jnp.pad(mask, ((0, 0), (0, 0), (q_offset, 0), (0, 0)))
    return _DenseMaskMod(mask)


def _checked_call(
    query, key, value, *, score_mod, mask_mod, mask, block_mask, scale, q_offset, dropout_rate, dropout_rng,
    deterministic, backend, interpret, layout="BHSD", **_,
):  # fmt: skip
    """Checks a call (before its tiling is chosen).

    Returns ``(args, score mod, mask mod incl. a dense mask, tiling)``;
    ``tiling`` holds :func:`default_config`'s ``masked`` and ``causal_only``
    keywords for the call.
    """
    if layout not in _LAYOUTS:
        raise ValueError(
            f"`layout` must be 'BHSD' ([batch, heads, seq, dim]) or 'BSHD' ([batch, seq, heads, dim]); got {layout!r}."
        )
    args = check_attention_args(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask,
        scale=scale, q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic, layout=layout,
    )  # fmt: skip
    if backend is None:
        backend = "mosaic_gpu"
    if backend not in _BACKENDS:
        raise NotImplementedError(
            f"`backend={backend!r}` is not available; pallas_flash_attention implements {list(_BACKENDS)}."
        )
    why = pallas_unsupported_reason(query, key, value, mask=mask, q_offset=args.q_offset, interpret=interpret)
    if why is not None:
        raise NotImplementedError(f"pallas_flash_attention cannot serve these arguments: {why}")
    smod = None if score_mod is None else _as_score_mod(score_mod)
    mmod = None if mask_mod is None else _as_mask_mod(mask_mod)
    if args.mask is not None:
        dense = _dense_mask_mod(args.mask, args.q_offset).mask_mod
        mmod = dense if mmod is None else and_masks(mmod, dense)
    masked = any(part is not None for part in _mask_parts(smod, mmod, block_mask))
    tiling = {"masked": masked, "causal_only": _causal_only(smod, mmod, block_mask, args.dropout_active)}
    return args, smod, mmod, tiling


def _causal_only(smod, mmod, block_mask, dropout: bool) -> bool:
    """Whether the only mask is :func:`causal_mod` (no transform, no other mask, no dropout)."""
    if mmod is not None or block_mask is not None or dropout or smod is None:
        return False
    parts = smod.mods if isinstance(smod, ComposedMod) else (smod,)
    return all(isinstance(p, CausalMod) for p in parts)


def pallas_flash_attention(
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
    block_sizes=None,
    backend=None,
    interpret=False,
    layout="BHSD",
):
    r"""Flash attention as a Pallas kernel, with score and mask mods fused.

    The kernel streams K/V tiles through shared memory and keeps the online
    softmax in registers. Mask-type mods (and ``mask_mod``/``block_mask``)
    decide which tiles are visited: empty tiles are never loaded, full tiles
    skip the mask. Score mods run on each register tile; their array leaves
    are read from global memory per tile (see
    :mod:`attnax.kernels._pallas_mgpu_common`). GQA reads each kv head in place.
    Under ``jax.vmap`` (nested, or of gradients) the mapped axis folds into
    the kernels' batch axis: one launch per kernel, mapped mod leaves read per
    example, and mods still see ``0 <= b < B``.

    Args:
        query: ``[B, H, T, D]`` bfloat16 or float16.
        key: ``[B, Hk, S, D]``.
        value: ``[B, Hk, S, Dv]``.
        score_mod, mask_mod, block_mask, scale, q_offset, return_lse: see
            :class:`attnax.typing.AttentionFn`. A ``block_mask`` lends its
            classes when its blocks are multiples of the kernel's tiles
            (``(128, 128)`` by default); other blocks are reclassified from
            its ``mask_mod``.
        mask: a dense boolean mask broadcastable to ``[B, H, T, S]``. It
            becomes a mask mod whose array leaf the kernel reads tile by tile
            (as int32: four bytes per score, where a ``mask_mod`` computing the
            same mask reads nothing); tiles are classified from it, so empty
            tiles are still skipped. With a row per query (``T`` axis > 1) it
            needs a static Python int ``q_offset``.
        dropout_rate, dropout_rng, deterministic: see
            :class:`attnax.typing.AttentionFn`. The kernels regenerate the
            keep mask of every visited tile from the counter-based hash of
            ``(dropout_rng, b, h, q_idx, kv_idx)`` (forward and backward
            alike; nothing is stored), the same mask as every attnax kernel.
        block_sizes: a :class:`PallasFlashConfig`; None (the default) for a
            heuristic tiling by head dim, key length and masking; or
            ``'autotune'`` for the config that :func:`autotune_pallas_config`
            cached for this call's signature. With nothing cached, concrete
            arguments are tuned on the spot; traced ones (inside ``jax.jit``)
            raise a ``ValueError``: tune before jitting.
        backend: ``'mosaic_gpu'`` or None (by platform).
        interpret: run the kernel in the backend's interpret mode on CPU.
        layout: ``'BHSD'`` (the default: ``[batch, heads, seq, dim]``) or
            ``'BSHD'`` (``[batch, seq, heads, dim]``, as Flax and
            FlashAttention lay them out) for ``query``, ``key``, ``value``,
            the output and the gradients. The kernels read and write either
            layout in place (strided TMA copies), so no transpose is made;
            ``lse`` stays ``[B, H, T]``.

    Returns:
        ``out [B, H, T, Dv]`` (``[B, T, H, Dv]`` in BSHD), or ``(out, lse)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import pallas_flash_attention, causal_mod
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 128, 64), jnp.bfloat16)
        >>> out = pallas_flash_attention(q, k, v, score_mod=causal_mod(), interpret=True)  # CPU: GPU interpret mode
        >>> out.shape, out.dtype
        ((1, 1, 128, 64), dtype(bfloat16))
    """
    args, smod, mmod, tiling = _checked_call(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask, scale=scale,
        q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic,
        backend=backend, interpret=interpret, layout=layout,
    )  # fmt: skip
    d = args.dims
    if isinstance(block_sizes, str):
        if block_sizes != "autotune":
            raise ValueError(f"`block_sizes` must be a PallasFlashConfig, 'autotune' or None; got {block_sizes!r}.")
        from attnax.kernels._pallas_autotune import tuned_config  # that module imports this one

        config = tuned_config(query, key, value, dict(
            score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask, scale=scale, q_offset=q_offset,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic, return_lse=return_lse,
            backend=backend, interpret=interpret, layout=layout,
        ))  # fmt: skip
    elif block_sizes is None:
        config = default_config(d.D, kv_len=d.S, **tiling)
    elif isinstance(block_sizes, PallasFlashConfig):
        config = block_sizes
    else:
        raise TypeError(
            f"`block_sizes` must be a PallasFlashConfig, 'autotune' or None; got {block_sizes!r} "
            f"({type(block_sizes).__name__})."
        )
    st = _Static(
        scale=args.scale, config=config, interpret=bool(interpret), dims=d,
        q_offset=args.q_offset if isinstance(args.q_offset, int) else None,
        dropout_rate=args.dropout_rate if args.dropout_active else 0.0, bshd=layout == "BSHD",
    )  # fmt: skip
    q_offset = jnp.broadcast_to(jnp.asarray(args.q_offset, jnp.int32), (d.B,))
    seed = _dropout.key_to_seed(args.dropout_rng) if args.dropout_active else None
    out, lse = _attention(query, key, value, q_offset, jnp.int32(0), smod, mmod, block_mask, seed, st)
    return (out, lse) if return_lse else out
