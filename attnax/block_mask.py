"""Block-sparse masks: which ``(q block, kv block)`` tiles a kernel must visit.

A :class:`BlockMask` classifies every tile of the ``[T, S]`` score matrix as
*empty* (nothing visible: never loaded), *partial* (the mask mod is evaluated
on the tile) or *full* (everything in range visible: the mask mod is
skipped). Per query block it lists the partial and full kv blocks (the
forward pass and dQ iterate over these), and per kv block the partial and full
query blocks (the transposed view, for dK/dV).

:func:`create_block_mask` is jittable: building a mask from traced document
ids inside ``jax.jit`` costs no recompilation when the ids change.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax.score_mods._base import TileRanges, _as_mask_mod, grid_indices, mask_block_classes

__all__ = ["BlockMask", "create_block_mask"]

EMPTY, PARTIAL, FULL = 0, 1, 2


def partition_order(rank, num_ranks: int):
    """Stable partition of the last axis by ``rank`` (small ints), without a sort.

    Returns ``(order, counts)``: ``order[..., i]`` is the index of the element
    placed i-th (rank 0 first, ties in index order) and ``counts[..., r]`` the
    number of elements of rank r. Cumulative sums and one scatter: XLA's sort
    is far slower for these short rows on GPUs.
    """
    n = rank.shape[-1]
    hits = [rank == r for r in range(num_ranks)]
    counts = jnp.stack([jnp.sum(h, axis=-1, dtype=jnp.int32) for h in hits], axis=-1)
    starts = jnp.cumsum(counts, axis=-1) - counts
    pos = jnp.zeros(rank.shape, jnp.int32)
    for r, h in enumerate(hits):
        pos = jnp.where(h, starts[..., r : r + 1] + jnp.cumsum(h, axis=-1, dtype=jnp.int32) - 1, pos)
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), rank.shape)
    order = jnp.put_along_axis(jnp.zeros(rank.shape, jnp.int32), pos, iota, axis=-1, inplace=False)
    return order, counts


def _sorted_indices(selected):
    """Indices of True entries along the last axis, ascending, first; plus counts."""
    order, counts = partition_order(jnp.where(selected, 0, 1), 2)
    count = counts[..., 0]
    n = selected.shape[-1]
    # Past the count, repeat the last valid index so a pipelined kernel that
    # prefetches one step ahead re-reads a block it already holds.
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    pos = jnp.arange(n, dtype=jnp.int32).reshape((1,) * count.ndim + (n,))
    return count, jnp.where(pos < count[..., None], order, last)


@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Tile classification of a mask, and the mask mod for partial tiles.

    Shapes use ``nq = ceil(T / block_q)`` and ``nk = ceil(S / block_kv)``;
    ``B``/``H`` are 1 where the mask does not depend on them (they broadcast).

    Attributes:
        kv_num_blocks: int32 ``[B, H, nq]``: partial kv blocks per query block.
        kv_indices: int32 ``[B, H, nq, nk]``: their indices first, ascending.
        full_kv_num_blocks: int32 ``[B, H, nq]``: full kv blocks per query block.
        full_kv_indices: int32 ``[B, H, nq, nk]``.
        q_num_blocks, q_indices, full_q_num_blocks, full_q_indices: the
            transposed view, per kv block (``[B, H, nk]``, ``[B, H, nk, nq]``).
        mask_mod: the mask mod evaluated on partial tiles (None: none).
        q_offset: absolute position of query 0 the mask was built for.
        block_size: ``(block_q, block_kv)`` (static).
        seq_lengths: ``(T, S)`` (static).
    """

    kv_num_blocks: Any
    kv_indices: Any
    full_kv_num_blocks: Any
    full_kv_indices: Any
    q_num_blocks: Any
    q_indices: Any
    full_q_num_blocks: Any
    full_q_indices: Any
    block_classes: Any
    mask_mod: Any
    q_offset: Any
    block_size: tuple[int, int]
    seq_lengths: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, T, S)`` with broadcast dimensions as 1."""
        B, H = self.block_classes.shape[:2]
        return (B, H, *self.seq_lengths)

    def check_compatible(self, dims) -> None:
        """Raises ``ValueError`` unless this mask fits ``[B, H, T, S]`` of a call."""
        B, H, T, S = self.shape
        if (T, S) != (dims.T, dims.S) or B not in (1, dims.B) or H not in (1, dims.H):
            raise ValueError(
                f"`block_mask` was built for [B, H, T, S] = {[B, H, T, S]} but the call has "
                f"{[dims.B, dims.H, dims.T, dims.S]}; build it with create_block_mask(mask_mod, B, H, T, S)."
            )

    def mask(self, b, h, q_idx, kv_idx) -> jax.Array:
        """Elementwise meaning as a mask mod (absolute positions): full tiles
        visible, empty tiles hidden, partial tiles per ``mask_mod``."""
        bq, bkv = self.block_size
        q_offset = jnp.asarray(self.q_offset)
        if q_offset.ndim:
            q_offset = q_offset[b]
        q_blk = (q_idx - q_offset) // bq
        kv_blk = kv_idx // bkv
        cls = self.block_classes
        bb = b if cls.shape[0] > 1 else 0
        hh = h if cls.shape[1] > 1 else 0
        c = cls[bb, hh, q_blk, kv_blk]
        out = c == FULL
        if self.mask_mod is not None:
            out = jnp.logical_or(out, jnp.logical_and(c == PARTIAL, self.mask_mod(b, h, q_idx, kv_idx)))
        else:
            out = jnp.logical_or(out, c == PARTIAL)
        return out

    def to_dense(self) -> jax.Array:
        """The elementwise mask, boolean ``[B, H, T, S]`` (B/H of size 1 when broadcast)."""
        B, H, T, S = self.shape
        return self.mask(*grid_indices(B, H, T, S, self.q_offset))

    @property
    def sparsity(self) -> jax.Array:
        """Fraction of tiles that are empty (never visited)."""
        return jnp.mean(self.block_classes == EMPTY)


jax.tree_util.register_dataclass(
    BlockMask,
    data_fields=[
        "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
        "q_indices", "full_q_num_blocks", "full_q_indices", "block_classes", "mask_mod", "q_offset",
    ],
    meta_fields=["block_size", "seq_lengths"],
)  # fmt: skip


def _block_size_pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in block_size)
    ):
        raise ValueError(f"`block_size` must be a positive int or a (block_q, block_kv) pair; got {block_size!r}.")
    return tuple(block_size)


def create_block_mask(mask_mod, B, H, T: int, S: int, *, block_size=128, q_offset=0) -> BlockMask:
    """Classifies the tiles of ``mask_mod`` over ``[B, H, T, S]``.

    The mod is evaluated one query block at a time (memory ``O(B H block_q S)``).
    Positions past ``T`` or ``S`` count as hidden; a tile is *full* when every
    in-range position is visible. Works under ``jax.jit`` with traced mod
    arrays (document ids, lengths).

    Args:
        mask_mod: a mask mod ``(b, h, q_idx, kv_idx) -> bool`` (absolute
            positions), e.g. ``causal_mod().mask_mod``.
        B: batch size, or None when the mask does not depend on the batch.
        H: query heads, or None when it does not depend on the head.
        T: query length.
        S: key length.
        block_size: ``128`` or ``(block_q, block_kv)``.
        q_offset: absolute position of query 0 (int or ``[B]``).

    Returns:
        A :class:`BlockMask` (a pytree).

    Example:
        >>> from attnax.block_mask import create_block_mask
        >>> bm = create_block_mask(lambda b, h, q, k: k <= q, None, None, 256, 256, block_size=128)
        >>> bm.block_classes[0, 0]  # 0 empty, 1 partial, 2 full
        Array([[1, 0],
               [2, 1]], dtype=int8)
        >>> bm.kv_num_blocks[0, 0], bm.full_kv_num_blocks[0, 0]
        (Array([1, 1], dtype=int32), Array([0, 1], dtype=int32))
    """
    from attnax._validation import check_q_offset

    mask_mod = _as_mask_mod(mask_mod)
    for name, v in (("T", T), ("S", S)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"`{name}` must be a positive int (a static length); got {v!r}.")
    for name, v in (("B", B), ("H", H)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"`{name}` must be a positive int or None (broadcast); got {v!r}.")
    bq, bkv = _block_size_pair(block_size)
    Bn, Hn = B or 1, H or 1
    q_offset = check_q_offset(q_offset, Bn)
    classes = classify_tiles(mask_mod, Bn, Hn, T, S, bq, bkv, q_offset)
    kv_n, kv_i = _sorted_indices(classes == PARTIAL)
    fkv_n, fkv_i = _sorted_indices(classes == FULL)
    t = jnp.swapaxes(classes, 2, 3)
    q_n, q_i = _sorted_indices(t == PARTIAL)
    fq_n, fq_i = _sorted_indices(t == FULL)
    return BlockMask(
        kv_num_blocks=kv_n, kv_indices=kv_i, full_kv_num_blocks=fkv_n, full_kv_indices=fkv_i,
        q_num_blocks=q_n, q_indices=q_i, full_q_num_blocks=fq_n, full_q_indices=fq_i,
        block_classes=classes, mask_mod=mask_mod, q_offset=q_offset,
        block_size=(bq, bkv), seq_lengths=(T, S),
    )  # fmt: skip


def classify_tiles(mask_mod, B: int, H: int, T: int, S: int, bq: int, bkv: int, q_offset=0, kv_offset=0):
    """int8 classes ``[B, H, nq, nk]`` of the ``(bq, bkv)`` tiles of a mask mod.

    What :func:`create_block_mask` computes, without the index lists; kernels
    call it directly. ``kv_offset`` (a scalar, possibly traced) is the
    absolute position of key 0; positions past ``T``/``S`` count as hidden.
    Mods with ``block_classes`` (causal, windows, prefix-LM, documents) are
    classified from tile ranges, others element by element, one query block
    at a time (memory ``O(B H bq S)``).
    """
    nq, nk = -(-T // bq), -(-S // bkv)
    kv_off = jnp.asarray(kv_offset, jnp.int32)
    kv_local = jnp.arange(nk * bkv, dtype=jnp.int32)
    b, h, _, _ = grid_indices(B, H, 1, 1)
    q_off = jnp.asarray(q_offset, jnp.int32)
    q_off = q_off.reshape(-1, 1, 1, 1) if q_off.ndim else q_off

    def classify(i):
        q_local = i * bq + jnp.arange(bq, dtype=jnp.int32)
        q_idx = q_local[None, None, :, None] + q_off
        in_range = (q_local[:, None] < T) & (kv_local[None, :] < S)
        vis = mask_mod(b, h, q_idx, (kv_local + kv_off)[None, None, None, :])
        vis = jnp.broadcast_to(vis, (B, H, bq, nk * bkv)) & in_range[None, None]
        vis = vis.reshape(B, H, bq, nk, bkv)
        rng = in_range.reshape(bq, nk, bkv)
        any_ = jnp.any(vis, axis=(2, 4))
        all_ = jnp.all(jnp.logical_or(vis, ~rng[None, None]), axis=(2, 4))
        return jnp.where(any_, jnp.where(all_, FULL, PARTIAL), EMPTY).astype(jnp.int8)

    q_lo = (jnp.arange(nq, dtype=jnp.int32) * bq).reshape(1, 1, nq, 1)
    kv_lo = jnp.arange(nk, dtype=jnp.int32) * bkv
    tiles = TileRanges(
        q_lo=q_lo + q_off,
        q_hi=jnp.minimum(q_lo + bq, T) - 1 + q_off,
        kv_lo=kv_lo.reshape(1, 1, 1, nk) + kv_off,
        kv_hi=(jnp.minimum(kv_lo + bkv, S) - 1).reshape(1, 1, 1, nk) + kv_off,
        block_q=bq,
        block_kv=bkv,
    )
    classes = mask_block_classes(mask_mod, b, h, tiles)
    if classes is not None:
        return jnp.broadcast_to(classes, (B, H, nq, nk)).astype(jnp.int8)
    classes = jax.lax.map(classify, jnp.arange(nq))  # [nq, B, H, nk]
    return jnp.moveaxis(classes, 0, 2)  # [B, H, nq, nk]
