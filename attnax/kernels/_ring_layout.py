"""Where ring attention's sequence chunks live, and which chunk pairs it computes.

Ring attention over ``N`` devices splits the (padded) sequence into ``2N``
chunks and gives every device two of them:

* ``"zigzag"``: device ``i`` holds chunks ``i`` and ``2N-1-i``: with a causal
  mask each device then computes the same number of chunk pairs;
* ``"contiguous"``: device ``i`` holds chunks ``2i`` and ``2i+1`` (the natural
  split of ``x`` along the sequence): simple, but under a causal mask the
  last device computes ``4N-1`` pairs and the first 3.

A *block* is one (query chunk, key chunk) pair. Whether a block can contain a
visible score is decided per block from the mod's structure
(:func:`block_may_be_visible`) so that empty blocks are skipped by a
``lax.cond``; what this module cannot decide is computed, and the inner
kernel then skips its own empty tiles.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from attnax.score_mods._base import (
    AttentionMod,
    ComposedMod,
    MaskScoreMod,
    _AndMask,
    _as_score_mod,
    _MaskOf,
    _OrMask,
    mod_dataclass,
)
from attnax.score_mods._prebuilt import CausalMod, DocumentMaskMod, PrefixLMMod, SlidingWindowMod

__all__ = ["ring_block_counts", "zigzag_permutation", "zigzag_shard", "zigzag_unshard"]

LAYOUTS = ("zigzag", "contiguous")


def chunk_of(layout: str, device, slot: int, num_devices: int):
    """Global chunk index held by ``device`` in ``slot`` (0 or 1); ``device`` may be traced."""
    if layout == "zigzag":
        return device if slot == 0 else 2 * num_devices - 1 - device
    return 2 * device + slot


def _holder_of(layout: str, chunk: int, num_devices: int) -> tuple[int, int]:
    """``(device, slot)`` holding global ``chunk`` (static)."""
    if layout == "zigzag":
        return (chunk, 0) if chunk < num_devices else (2 * num_devices - 1 - chunk, 1)
    return chunk // 2, chunk % 2


def zigzag_permutation(seq_len: int, num_devices: int) -> np.ndarray:
    """Indices that put a natural-order sequence into zig-zag order.

    ``x[..., perm, :]`` is the sequence reordered so that splitting it
    evenly over ``num_devices`` gives device ``i`` the chunks ``i`` and
    ``2N-1-i`` of ``2N`` equal chunks: the layout
    :func:`attnax.kernels.ring_attention` expects inside ``shard_map`` with
    ``layout="zigzag"``. Reorder tokens once in the input pipeline;
    ``np.argsort(perm)`` undoes it.

    Args:
        seq_len: sequence length, a multiple of ``2 * num_devices``.
        num_devices: size of the ring (the sequence mesh axis).

    Returns:
        int ``[seq_len]`` numpy array.

    Raises:
        ValueError: ``seq_len`` is not a multiple of ``2 * num_devices``.

    Example:
        >>> from attnax.kernels import zigzag_permutation
        >>> zigzag_permutation(8, 2).tolist()  # chunks 0, 3 | 1, 2 of size 2
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    from attnax._validation import check_ring_seq_len

    check_ring_seq_len("seq_len", seq_len, num_devices)
    c = seq_len // (2 * num_devices)
    order = [chunk_of("zigzag", d, s, num_devices) for d in range(num_devices) for s in (0, 1)]
    return np.concatenate([np.arange(ch * c, (ch + 1) * c) for ch in order])


def _relayout(x, axis_name, axis: int, src: str, dst: str):
    """Moves the two chunks of every shard from layout ``src`` to ``dst`` (inside ``shard_map``).

    Each chunk travels once, by one of four partial ``ppermute``s (one per
    (source slot, destination slot)), so the traffic is one shard per device:
    an all-to-all, never an all-gather.
    """
    if src == dst:
        return x
    n = jax.lax.axis_size(axis_name)
    L = x.shape[axis]
    if L % 2:
        raise ValueError(f"a {src}/{dst} relayout needs an even local sequence length; got {L}.")
    c = L // 2
    parts = [jax.lax.slice_in_dim(x, s * c, (s + 1) * c, axis=axis) for s in (0, 1)]
    me = jax.lax.axis_index(axis_name)
    out = []
    for d_slot in (0, 1):
        received = []
        from_slot = np.zeros(n, np.int32)  # which source slot delivers to each device's d_slot
        for s_slot in (0, 1):
            perm = []
            for dev in range(n):
                to_dev, to_slot = _holder_of(dst, chunk_of(src, dev, s_slot, n), n)
                if to_slot == d_slot:
                    perm.append((dev, to_dev))
                    from_slot[to_dev] = s_slot
            received.append(jax.lax.ppermute(parts[s_slot], axis_name, perm) if perm else None)
        if received[0] is None or received[1] is None:
            out.append(received[0] if received[1] is None else received[1])
        else:
            out.append(jnp.where(jnp.asarray(from_slot)[me] == 0, received[0], received[1]))
    return jnp.concatenate(out, axis=axis)


def zigzag_shard(x, axis_name, *, axis: int = 2):
    """Inside ``shard_map``: turns contiguous sequence shards into zig-zag shards.

    Device ``i`` of ``N`` holds positions ``[i L, (i+1) L)`` on entry and
    chunks ``i`` and ``2N-1-i`` (of length ``L/2``) on exit. Every chunk moves
    once (``ppermute``; no all-gather).

    Args:
        x: the local shard; its length along ``axis`` must be even.
        axis_name: the sequence mesh axis.
        axis: the sequence dimension of ``x`` (2 for BHSD, also for a
            ``[B, H, T]`` LSE).

    Returns:
        The zig-zag local shard, same shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import PartitionSpec as P
        >>> from attnax.kernels import zigzag_shard
        >>> mesh = jax.make_mesh((1,), ("sp",))
        >>> x = jax.device_put(jnp.arange(4), jax.NamedSharding(mesh, P("sp")))
        >>> f = jax.shard_map(lambda x: zigzag_shard(x, "sp", axis=0), mesh=mesh, in_specs=P("sp"), out_specs=P("sp"))
        >>> f(x).tolist()  # one device: chunks 0 and 1 stay; on N devices, f(x) == x[zigzag_permutation(4, N)]
        [0, 1, 2, 3]
    """
    return _relayout(x, axis_name, axis, "contiguous", "zigzag")


def zigzag_unshard(x, axis_name, *, axis: int = 2):
    """Inside ``shard_map``: the inverse of :func:`zigzag_shard`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import PartitionSpec as P
        >>> from attnax.kernels import zigzag_shard, zigzag_unshard
        >>> mesh = jax.make_mesh((1,), ("sp",))
        >>> roundtrip = lambda x: zigzag_unshard(zigzag_shard(x, "sp", axis=0), "sp", axis=0)
        >>> x = jax.device_put(jnp.arange(4), jax.NamedSharding(mesh, P("sp")))
        >>> jax.shard_map(roundtrip, mesh=mesh, in_specs=P("sp"), out_specs=P("sp"))(x).tolist()
        [0, 1, 2, 3]
    """
    return _relayout(x, axis_name, axis, "zigzag", "contiguous")


def local_chunks(layout: str, local_len: int, num_devices: int):
    """The chunks of one shard: ``[(local_start, size, global_start_fn)]``.

    ``global_start_fn(device)`` gives the absolute position of the chunk's
    first element on that (possibly traced) device. A contiguous shard of odd
    length is one chunk.
    """
    if layout == "contiguous" and local_len % 2:
        return [(0, local_len, lambda d: d * local_len)]
    c = local_len // 2
    return [(s * c, c, lambda d, s=s: chunk_of(layout, d, s, num_devices) * c) for s in (0, 1)]


# --- which blocks can be visible -------------------------------------------------


@mod_dataclass(static=("length",))
class KeyBound:
    """Mask mod hiding keys at positions ``>= length`` (padding of uneven sequences)."""

    length: int

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx < self.length


@mod_dataclass
class OffsetMod(AttentionMod):
    """A score mod seen through a batch/head offset: ``mod(s, b + b0, h + h0, q, k)``.

    Ring attention on a mesh whose other axes shard batch or heads hands its
    mods global ``b``/``h`` this way (ALiBi slopes, per-batch document ids).
    """

    mod: Any
    b_offset: Any
    h_offset: Any

    @property
    def has_transform(self):  # type: ignore[override]
        return self.mod.has_transform

    @property
    def has_mask(self):  # type: ignore[override]
        return self.mod.has_mask

    def transform(self, score, b, h, q_idx, kv_idx):
        return self.mod.transform(score, b + self.b_offset, h + self.h_offset, q_idx, kv_idx)

    def mask(self, b, h, q_idx, kv_idx):
        return self.mod.mask(b + self.b_offset, h + self.h_offset, q_idx, kv_idx)


@mod_dataclass
class OffsetMask:
    """A mask mod seen through a batch/head offset."""

    fn: Any
    b_offset: Any
    h_offset: Any
    has_mask: ClassVar[bool] = True

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b + self.b_offset, h + self.h_offset, q_idx, kv_idx)


class Ranges:
    """Inclusive absolute position ranges of one block, plus the chunk sizes (static)."""

    def __init__(self, q_lo, q_hi, k_lo, k_hi, q_size: int, k_size: int, exact_q: bool):
        self.q_lo, self.q_hi, self.k_lo, self.k_hi = q_lo, q_hi, k_lo, k_hi
        self.q_size, self.k_size = q_size, k_size
        self.exact_q = exact_q  # q range spans exactly q_size positions (one q_offset for the batch)


def _and(*preds):
    known = [p for p in preds if p is not None]
    if not known:
        return None
    out = known[0]
    for p in known[1:]:
        out = jnp.logical_and(out, p)
    return out


def _or(*preds):
    if any(p is None for p in preds):
        return None
    out = preds[0]
    for p in preds[1:]:
        out = jnp.logical_or(out, p)
    return out


def _id_range(ids, lo, size: int):
    """Min and max (per batch row, or scalar) of ``ids`` over positions ``[lo, lo + size)``."""
    ids = jnp.asarray(ids)
    n = ids.shape[-1]
    size = min(size, n)
    # dynamic_slice clamps the start: a window past the end covers the last
    # ``size`` ids, a superset of the in-range ones, so the test stays safe.
    window = jax.lax.dynamic_slice_in_dim(ids, jnp.asarray(lo, jnp.int32), size, axis=ids.ndim - 1)
    return jnp.min(window, axis=-1), jnp.max(window, axis=-1)


def _may_see(m, r: Ranges):
    """Traced bool: may block ``r`` hold a visible pair under mask-like ``m``? None = cannot tell."""
    if isinstance(m, CausalMod):
        return r.k_lo <= r.q_hi
    if isinstance(m, SlidingWindowMod):
        return _and(
            r.k_hi >= r.q_lo - m.left if m.left >= 0 else None,
            r.k_lo <= r.q_hi + m.right if m.right >= 0 else None,
        )
    if isinstance(m, PrefixLMMod):
        return jnp.logical_or(r.k_lo <= r.q_hi, r.k_lo < jnp.max(m.prefix_length))
    if isinstance(m, DocumentMaskMod):
        if not r.exact_q:
            return None
        kv_ids = m.segment_ids if m.kv_segment_ids is None else m.kv_segment_ids
        q_min, q_max = _id_range(m.segment_ids, r.q_lo, r.q_size)
        k_min, k_max = _id_range(kv_ids, r.k_lo, r.k_size)
        return jnp.any(jnp.logical_and(q_min <= k_max, k_min <= q_max))
    if isinstance(m, KeyBound):
        return r.k_lo < m.length
    if isinstance(m, (OffsetMod, OffsetMask)):
        return _may_see(m.mod if isinstance(m, OffsetMod) else m.fn, r)
    if isinstance(m, ComposedMod):
        return _and(*(_may_see(x, r) for x in m.mods if x.has_mask))
    if isinstance(m, MaskScoreMod):
        return _may_see(m.mask_fn, r)
    if isinstance(m, _MaskOf):
        return _may_see(m.mod, r)
    if isinstance(m, _AndMask):
        return _and(*(_may_see(x, r) for x in m.mods))
    if isinstance(m, _OrMask):
        return _or(*(_may_see(x, r) for x in m.mods))
    return None


def block_may_be_visible(score_mod, mask_mod, r: Ranges):
    """False only when no pair of block ``r`` can be visible; None when every block is computed."""
    preds = []
    if score_mod is not None:
        mod = _as_score_mod(score_mod)
        if mod.has_mask:
            preds.append(_may_see(mod, r))
    if mask_mod is not None:
        preds.append(_may_see(mask_mod, r))
    return _and(*preds)


def ring_block_counts(
    seq_len: int,
    num_devices: int,
    *,
    layout: str = "zigzag",
    score_mod=None,
    mask_mod=None,
    kv_seq_len: int | None = None,
    q_offset: int = 0,
) -> np.ndarray:
    """Blocks each device computes in :func:`~attnax.kernels.ring_attention` on a mesh.

    A block is one (query chunk, key chunk) pair of ``ceil(seq_len / 2N)`` by
    ``ceil(kv_seq_len / 2N)`` positions; ring attention skips blocks the mask
    leaves empty, with the same test as this function. A device's work is
    proportional to its count, so equal counts mean a balanced ring. Causal
    attention over ``N`` devices computes ``2N + 1`` blocks everywhere with
    ``layout="zigzag"``, and ``4i + 3`` on device ``i`` with
    ``"contiguous"``.

    Args:
        seq_len: query length ``T`` (global).
        num_devices: ``N``, the size of the sequence mesh axis.
        layout: ``"zigzag"`` or ``"contiguous"``.
        score_mod: the score mod of the call (its mask decides).
        mask_mod: the mask mod of the call.
        kv_seq_len: key length ``S``; default ``seq_len``.
        q_offset: absolute position of query 0 (an int).

    Returns:
        int numpy array ``[num_devices]``.

    Example:
        >>> from attnax.kernels import causal_mod, ring_block_counts
        >>> ring_block_counts(64, 4, score_mod=causal_mod()).tolist()
        [9, 9, 9, 9]
        >>> ring_block_counts(64, 4, score_mod=causal_mod(), layout="contiguous").tolist()
        [3, 7, 11, 15]
    """
    from attnax._validation import check_ring_layout

    check_ring_layout(layout)
    S = seq_len if kv_seq_len is None else kv_seq_len
    n2 = 2 * num_devices
    Tp, Sp = -(-seq_len // n2) * n2, -(-S // n2) * n2
    if Sp != S:
        mask_mod = KeyBound(S) if mask_mod is None else _AndMask((mask_mod, KeyBound(S)))
    qc, kc = local_chunks(layout, Tp // num_devices, num_devices), local_chunks(layout, Sp // num_devices, num_devices)
    counts = np.zeros(num_devices, np.int64)
    for dev in range(num_devices):
        for src in range(num_devices):
            for _, qn, qg in qc:
                for _, kn, kg in kc:
                    q_lo, k_lo = qg(dev) + q_offset, kg(src)
                    r = Ranges(q_lo, q_lo + qn - 1, k_lo, k_lo + kn - 1, qn, kn, True)
                    pred = block_may_be_visible(score_mod, mask_mod, r)
                    counts[dev] += 1 if pred is None else int(bool(pred))
    return counts
