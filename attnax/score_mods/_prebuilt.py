"""Prebuilt score mods: causal, windows, ALiBi, prefix-LM, documents, bias, softcap.

Positions are absolute (``q_idx = q_offset + local query index``). Mods that
index arrays by position (document ids, a bias) therefore index them by
absolute position: see each mod's docstring.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from attnax.score_mods._base import AttentionMod, classify, combine_classes, mod_dataclass

__all__ = [
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "causal_mod",
    "document_mask_mod",
    "prefix_lm_mod",
    "sliding_window_mod",
    "softcap_mod",
]


@mod_dataclass
class CausalMod(AttentionMod):
    """Key ``j`` visible to query ``i`` iff ``j <= i`` (absolute positions)."""

    has_mask: ClassVar[bool] = True

    def mask(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def block_classes(self, b, h, t):
        return classify(full=t.kv_hi <= t.q_lo, empty=t.kv_lo > t.q_hi)


@mod_dataclass(static=("left", "right"))
class SlidingWindowMod(AttentionMod):
    """Visible iff ``q_idx - left <= kv_idx <= q_idx + right``; -1 = unbounded."""

    left: int
    right: int
    has_mask: ClassVar[bool] = True

    def mask(self, b, h, q_idx, kv_idx):
        out = None
        if self.left >= 0:
            out = kv_idx >= q_idx - self.left
        if self.right >= 0:
            r = kv_idx <= q_idx + self.right
            out = r if out is None else jnp.logical_and(out, r)
        if out is None:
            out = jnp.ones(jnp.broadcast_shapes(jnp.shape(q_idx), jnp.shape(kv_idx)), dtype=bool)
        return out

    def block_classes(self, b, h, t):
        parts = [classify(full=jnp.ones((), bool), empty=jnp.zeros((), bool))]
        if self.left >= 0:
            parts.append(classify(full=t.kv_lo >= t.q_hi - self.left, empty=t.kv_hi < t.q_lo - self.left))
        if self.right >= 0:
            parts.append(classify(full=t.kv_hi <= t.q_lo + self.right, empty=t.kv_lo > t.q_hi + self.right))
        return combine_classes(parts, "and")


@mod_dataclass
class AlibiMod(AttentionMod):
    """Adds ``-slopes[h] * |q_idx - kv_idx|``."""

    slopes: Any
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        dist = jnp.abs(q_idx - kv_idx).astype(score.dtype)
        return score - self.slopes[h].astype(score.dtype) * dist

    def scaled_transform(self, raw, scale, b, h, q_idx, kv_idx, positions=None):
        # (raw - slope / scale * dist) * scale: one multiply-add per score, the
        # scale folded into the kernel's exponent.
        slope = self.slopes[h].astype(raw.dtype) * (1.0 / scale)
        if positions is None:
            dist = jnp.abs(q_idx - kv_idx).astype(raw.dtype)
        else:
            dist = jnp.abs(positions.relative())
        return raw - slope * dist, scale


@mod_dataclass
class PrefixLMMod(AttentionMod):
    """Visible iff ``kv_idx < prefix_length[b]`` or ``kv_idx <= q_idx``."""

    prefix_length: Any
    has_mask: ClassVar[bool] = True

    def mask(self, b, h, q_idx, kv_idx):
        p = self.prefix_length
        if p.ndim:
            p = p[b]
        return jnp.logical_or(kv_idx < p, kv_idx <= q_idx)

    def block_classes(self, b, h, t):
        p = self.prefix_length
        if p.ndim:
            p = p[b]
        full = jnp.logical_or(t.kv_hi < p, t.kv_hi <= t.q_lo)
        empty = jnp.logical_and(t.kv_lo >= p, t.kv_lo > t.q_hi)
        return classify(full=full, empty=empty)


def _ids_at(ids, b, pos):
    # Index the leaf directly (no jnp.asarray): inside Pallas kernels leaves are
    # tile operands that understand indexing by b and by the position arrays.
    return ids[pos] if ids.ndim == 1 else ids[b, pos]


def _range_min_max(ids, b, lo, hi, width):
    """Min and max of ``ids`` over each inclusive position range ``[lo, hi]``."""
    offsets = jnp.arange(width, dtype=lo.dtype).reshape((1,) * lo.ndim + (width,))
    pos = jnp.minimum(jnp.expand_dims(lo, -1) + offsets, jnp.expand_dims(hi, -1))
    b = jnp.asarray(b)
    vals = ids[pos] if ids.ndim == 1 else ids[b.reshape(b.shape + (1,) * (pos.ndim - b.ndim)), pos]
    return jnp.min(vals, axis=-1), jnp.max(vals, axis=-1)


@mod_dataclass
class DocumentMaskMod(AttentionMod):
    """Visible iff the query's and the key's segment ids are equal."""

    segment_ids: Any
    kv_segment_ids: Any
    has_mask: ClassVar[bool] = True

    def mask(self, b, h, q_idx, kv_idx):
        kv_ids = self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids
        return _ids_at(self.segment_ids, b, q_idx) == _ids_at(kv_ids, b, kv_idx)

    def block_classes(self, b, h, t):
        # Disjoint [min, max] id ranges of rows and columns prove a tile empty;
        # one id shared by every row and column proves it full; anything else
        # is (conservatively) partial. Exact for packed, sorted ids.
        kv_ids = self.segment_ids if self.kv_segment_ids is None else self.kv_segment_ids
        q_min, q_max = _range_min_max(self.segment_ids, b, t.q_lo, t.q_hi, t.block_q)
        k_min, k_max = _range_min_max(kv_ids, b, t.kv_lo, t.kv_hi, t.block_kv)
        empty = jnp.logical_or(q_max < k_min, k_max < q_min)
        full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return classify(full=full, empty=empty)


def leaf_at(x, b, h, q_idx, kv_idx):
    """``x[b, h, q_idx, kv_idx]`` of a ``[B, H, T, S]``-broadcastable leaf: size-1 axes read index 0."""
    return x[tuple(0 if n == 1 else i for n, i in zip(x.shape, (b, h, q_idx, kv_idx)))]


@mod_dataclass
class AdditiveBiasMod(AttentionMod):
    """Adds ``bias[b, h, q_idx, kv_idx]`` (size-1 dimensions broadcast)."""

    bias: Any
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        return score + leaf_at(self.bias, b, h, q_idx, kv_idx).astype(score.dtype)


@mod_dataclass
class SoftcapMod(AttentionMod):
    """``cap * tanh(score / cap)``."""

    cap: Any
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        cap = jnp.asarray(self.cap, dtype=score.dtype)
        # One reciprocal per call, then a product per score: a division per
        # score costs several instructions inside a kernel's tile loop.
        return cap * jnp.tanh(score * (1 / cap))

    def scaled_transform(self, raw, scale, b, h, q_idx, kv_idx, positions=None):
        # cap * tanh(s / cap) is even in cap: |cap| keeps the factor positive.
        cap = jnp.abs(jnp.asarray(self.cap, dtype=raw.dtype))
        return jnp.tanh(raw * (scale / cap)), cap


def causal_mod() -> CausalMod:
    """Causal masking: key ``kv_idx`` is visible to query ``q_idx`` iff ``kv_idx <= q_idx``.

    Positions are absolute, so alignment follows the kernel's ``q_offset``:
    ``q_offset=0`` is top-left, ``q_offset=S-T`` bottom-right (decoding).

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import causal_mod
        >>> causal_mod().mask(0, 0, jnp.arange(2)[:, None], jnp.arange(2)[None, :])
        Array([[ True, False],
               [ True,  True]], dtype=bool)
    """
    return CausalMod()


def sliding_window_mod(window_size) -> SlidingWindowMod:
    """A local attention window.

    Args:
        window_size: an int ``W`` for the causal window of ``W`` keys (the
            query's own position and the ``W-1`` before it), or a
            ``(left, right)`` pair: visible iff
            ``q_idx - left <= kv_idx <= q_idx + right``, inclusive, with -1
            meaning unbounded on that side.

    Raises:
        ValueError: a window size that is not a positive int or a pair of
            ints >= -1.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import sliding_window_mod
        >>> m = sliding_window_mod(2)
        >>> m.mask(0, 0, jnp.arange(3)[:, None], jnp.arange(3)[None, :]).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 1, 1]], dtype=int32)
    """
    from attnax._validation import check_window_size

    left, right = check_window_size(window_size)
    return SlidingWindowMod(left, right)


def alibi_slopes(num_heads: int) -> jax.Array:
    """The standard ALiBi head slopes (Press et al., 2022), float32 ``[num_heads]``.

    For a power of two ``n`` the slopes are ``2**(-8 i / n)``, ``i = 1..n``.
    Otherwise the slopes of the nearest lower power of two are followed by
    every other slope of the next power of two, as in the reference
    implementation.

    Example:
        >>> from attnax.score_mods import alibi_slopes
        >>> alibi_slopes(4).tolist()
        [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if not isinstance(num_heads, (int, np.integer)) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"`num_heads` must be a positive int; got {num_heads!r}.")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = pow2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]
    return jnp.asarray(slopes, dtype=jnp.float32)


def alibi_mod(num_heads: int | None = None, *, slopes=None) -> AlibiMod:
    """ALiBi: adds ``-slopes[h] * |q_idx - kv_idx|`` to the scores.

    Where keys are causally visible this equals the usual causal form
    ``slopes[h] * (kv_idx - q_idx)``. Compose with :func:`causal_mod` for causal
    ALiBi. ``slopes`` is a pytree leaf: new values do not retrace, and
    gradients reach it (learnable slopes).

    Args:
        num_heads: number of query heads; the standard slopes are used.
        slopes: explicit ``[num_heads]`` slopes (instead of ``num_heads``).

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import alibi_mod
        >>> mod = alibi_mod(2)  # slopes 1/16 and 1/256
        >>> mod(jnp.zeros(3), 0, 0, 2, jnp.arange(3))
        Array([-0.125 , -0.0625,  0.    ], dtype=float32)
    """
    if (num_heads is None) == (slopes is None):
        raise ValueError("`alibi_mod` takes exactly one of `num_heads` or `slopes=`; got "
                         f"num_heads={num_heads!r}, slopes={'None' if slopes is None else 'array'}.")
    if slopes is None:
        slopes = alibi_slopes(num_heads)
    else:
        slopes = jnp.asarray(slopes)
        if slopes.ndim != 1:
            raise ValueError(f"`slopes` must have shape [num_heads]; got shape {slopes.shape}.")
    return AlibiMod(slopes)


def prefix_lm_mod(prefix_length) -> PrefixLMMod:
    """Prefix-LM masking: bidirectional over the prefix, causal after it.

    Visible iff ``kv_idx < prefix_length`` or ``kv_idx <= q_idx``.

    Args:
        prefix_length: an int, or an int array ``[B]`` (one prefix per batch
            row).

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import prefix_lm_mod
        >>> prefix_lm_mod(2).mask(0, 0, jnp.arange(3)[:, None], jnp.arange(3)[None, :]).astype(int)
        Array([[1, 1, 0],
               [1, 1, 0],
               [1, 1, 1]], dtype=int32)
    """
    p = jnp.asarray(prefix_length)
    if not jnp.issubdtype(p.dtype, jnp.integer) or p.ndim > 1:
        raise ValueError(f"`prefix_length` must be an int or an int array [B]; got dtype {p.dtype}, shape {p.shape}.")
    return PrefixLMMod(p.astype(jnp.int32))


def document_mask_mod(segment_ids, kv_segment_ids=None) -> DocumentMaskMod:
    """Masks attention across documents (packed sequences).

    Visible iff ``segment_ids[b, q_idx] == kv_segment_ids[b, kv_idx]``.
    The ids are indexed by *absolute* position: with a ``q_offset``, the query
    ids must cover positions ``[0, q_offset + T)``. With one argument queries
    and keys share the ids (self-attention over one packed sequence).

    Args:
        segment_ids: int ``[B, T]`` or ``[T]`` (shared by the batch).
        kv_segment_ids: int ``[B, S]`` or ``[S]``; default ``segment_ids``.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import document_mask_mod
        >>> m = document_mask_mod(jnp.array([0, 0, 1]))
        >>> m.mask(0, 0, jnp.arange(3)[:, None], jnp.arange(3)[None, :]).astype(int)
        Array([[1, 1, 0],
               [1, 1, 0],
               [0, 0, 1]], dtype=int32)
    """

    def check(name, ids):
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2):
            raise ValueError(f"`{name}` must be an int array [B, T] or [T]; got dtype {ids.dtype}, shape {ids.shape}.")
        return ids

    segment_ids = check("segment_ids", segment_ids)
    if kv_segment_ids is not None:
        kv_segment_ids = check("kv_segment_ids", kv_segment_ids)
    return DocumentMaskMod(segment_ids, kv_segment_ids)


def additive_bias_mod(bias) -> AdditiveBiasMod:
    """Adds a bias to the scores: ``score + bias[b, h, q_idx, kv_idx]``.

    The bias is a pytree leaf: gradients reach it (a learnable relative bias).
    It is indexed by absolute position; size-1 dimensions broadcast. With a
    ``q_offset``, give it a query dimension covering ``[0, q_offset + T)`` or
    of size 1.

    Args:
        bias: float array of rank 4, broadcastable to ``[B, H, T, S]``.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import additive_bias_mod
        >>> m = additive_bias_mod(jnp.arange(3.0).reshape(1, 1, 1, 3))
        >>> m(jnp.zeros((1, 1, 2, 3)), 0, 0, jnp.arange(2)[:, None], jnp.arange(3)[None, :])
        Array([[[[0., 1., 2.],
                 [0., 1., 2.]]]], dtype=float32)
    """
    bias = jnp.asarray(bias)
    if bias.ndim != 4 or not jnp.issubdtype(bias.dtype, jnp.floating):
        raise ValueError(
            f"`bias` must be a float array of rank 4 broadcastable to [B, H, T, S]; got dtype {bias.dtype}, "
            f"shape {bias.shape}. Add size-1 axes, e.g. bias[None, None] for a [T, S] bias."
        )
    return AdditiveBiasMod(bias)


def softcap_mod(cap) -> SoftcapMod:
    """Soft-capping of scores: ``cap * tanh(score / cap)`` (Gemma 2, Grok).

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import softcap_mod
        >>> softcap_mod(5.0)(jnp.array([0.0, 100.0]), 0, 0, 0, 0)
        Array([0., 5.], dtype=float32)
    """
    if isinstance(cap, (int, float)) and not cap > 0:
        raise ValueError(f"`cap` must be > 0; got {cap!r}.")
    return SoftcapMod(cap)
