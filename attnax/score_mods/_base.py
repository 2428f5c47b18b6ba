"""The mod base class, wrappers for plain callables, and composition.

Every prebuilt mod is an :class:`AttentionMod`: a frozen dataclass registered
as a pytree whose arrays are leaves (new values never retrace a jitted
function) and whose structural settings (window sizes) are static. An
``AttentionMod`` splits into two parts that kernels use separately:

* ``transform(score, b, h, q_idx, kv_idx)``: the score rewrite (identity for
  pure masks);
* ``mask(b, h, q_idx, kv_idx)``: a boolean visibility, or ``None``.

Calling the mod applies both (``-inf`` where hidden), so a mod is also an
ordinary :class:`attnax.typing.ScoreMod`. Kernels call :func:`split_score_mod`
to apply the mask with their own NaN-free masking and to skip hidden blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

__all__ = [
    "AttentionMod",
    "and_masks",
    "compose_score_mods",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "or_masks",
    "split_score_mod",
]


def mod_dataclass(cls=None, *, static: tuple[str, ...] = ()):
    """Freezes ``cls`` as a dataclass and registers it as a pytree.

    Fields named in ``static`` are pytree metadata (hashable, part of the
    treedef); every other field is a child.
    """

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        data = [n for n in names if n not in static]
        return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(static))

    return wrap if cls is None else wrap(cls)


class AttentionMod:
    """Base of attnax's mods: a score rewrite plus an optional mask.

    Subclasses override :meth:`transform` and/or :meth:`mask` and set
    ``has_transform``/``has_mask`` so kernels know which parts to evaluate.
    """

    has_transform: ClassVar[bool] = False
    has_mask: ClassVar[bool] = False

    def transform(self, score, b, h, q_idx, kv_idx):
        """Rewrites scores (without masking). Identity by default."""
        del b, h, q_idx, kv_idx
        return score

    def mask(self, b, h, q_idx, kv_idx):
        """Boolean visibility (True = attend), or None when the mod hides nothing."""
        del b, h, q_idx, kv_idx
        return None

    def scaled_transform(self, raw, scale, b, h, q_idx, kv_idx, positions=None):
        """:meth:`transform` of ``raw * scale`` in a form a kernel can fuse: ``(t, factor)``.

        ``t * factor`` equals ``transform(raw * scale, b, h, q_idx, kv_idx)`` up to
        float32 rounding, and ``factor`` (a Python float or a scalar, > 0) is the
        same for every score: the Pallas kernels fold it into the softmax's
        exponent (the forward always, the backward for mods whose score
        derivative is 1), so a mod written this way saves the per-score
        products around its rewrite. ``positions``, when a kernel passes one, has a method
        ``relative()`` giving ``kv_idx - q_idx`` as a float32 tile built from one
        vector per axis (no int-to-float conversion per score; exact for
        positions below 2**24). Optional: the default is
        ``(transform(raw * scale, ...), 1.0)``; prebuilt mods that override it
        (:func:`~attnax.score_mods.softcap_mod`, :func:`~attnax.score_mods.alibi_mod`)
        are tested against their :meth:`transform`.
        """
        del positions
        return self.transform(raw * scale, b, h, q_idx, kv_idx), 1.0

    def block_classes(self, b, h, tiles):
        """Classifies tiles exactly from their position ranges, or returns None.

        Args:
            b, h: broadcastable batch and head indices.
            tiles: a :class:`TileRanges`.

        Returns:
            int8 classes (0 empty, 1 partial, 2 full) broadcastable to
            ``[B, H, nq, nk]``, or None when this mod cannot tell without
            evaluating its mask element by element. "Partial" may be
            conservative; "empty" and "full" must be exact.
        """
        del b, h, tiles
        return None

    def __call__(self, score, b, h, q_idx, kv_idx):
        out = self.transform(score, b, h, q_idx, kv_idx) if self.has_transform else score
        if self.has_mask:
            out = jnp.where(self.mask(b, h, q_idx, kv_idx), out, -jnp.inf)
        return out

    @property
    def mask_mod(self) -> Callable | None:
        """This mod's mask as a :class:`attnax.typing.MaskMod` (None if it has none)."""
        return _MaskOf(self) if self.has_mask else None


@dataclasses.dataclass(frozen=True)
class TileRanges:
    """Position ranges of the tiles of a ``[T, S]`` score matrix (absolute, inclusive).

    ``q_lo``/``q_hi`` broadcast as ``[B or 1, 1, nq, 1]``, ``kv_lo``/``kv_hi``
    as ``[1, 1, 1, nk]``; ``block_q``/``block_kv`` bound each range's width.
    """

    q_lo: Any
    q_hi: Any
    kv_lo: Any
    kv_hi: Any
    block_q: int
    block_kv: int


def classify(full, empty):
    """int8 tile classes from boolean 'all visible' and 'none visible' arrays."""
    return jnp.where(empty, 0, jnp.where(full, 2, 1)).astype(jnp.int8)


def combine_classes(classes, how):
    """AND (``min``) or OR (``max``) of tile classes; None if any is unknown."""
    if not classes or any(c is None for c in classes):
        return None
    out = classes[0]
    for c in classes[1:]:
        out = jnp.minimum(out, c) if how == "and" else jnp.maximum(out, c)
    return out


def mask_block_classes(mask_mod, b, h, tiles):
    """``mask_mod.block_classes(...)`` when the mod offers it, else None."""
    fn = getattr(mask_mod, "block_classes", None)
    return None if fn is None else fn(b, h, tiles)


@mod_dataclass
class _MaskOf:
    """The mask part of an :class:`AttentionMod`, as a mask mod (a pytree)."""

    mod: Any

    def __call__(self, b, h, q_idx, kv_idx):
        return self.mod.mask(b, h, q_idx, kv_idx)

    def block_classes(self, b, h, tiles):
        return self.mod.block_classes(b, h, tiles)


def _is_plain_callable(fn) -> bool:
    # A callable that is a pytree leaf (a function, a partial, a lambda) cannot
    # be a child of a registered dataclass passed through jit: keep it static.
    leaves = jax.tree_util.tree_leaves(fn)
    return len(leaves) == 1 and leaves[0] is fn


@mod_dataclass(static=("fn",))
class _StaticScoreFn(AttentionMod):
    fn: Callable
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx)


@mod_dataclass
class _PytreeScoreFn(AttentionMod):
    fn: Any
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx)


@mod_dataclass(static=("fn",))
class _StaticMaskFn:
    fn: Callable

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)

    def block_classes(self, b, h, tiles):
        return mask_block_classes(self.fn, b, h, tiles)


def _as_score_mod(fn) -> AttentionMod:
    if isinstance(fn, AttentionMod):
        return fn
    if not callable(fn):
        raise TypeError(f"`score_mod` must be callable as fn(score, b, h, q_idx, kv_idx); got {type(fn).__name__}.")
    return _StaticScoreFn(fn) if _is_plain_callable(fn) else _PytreeScoreFn(fn)


def _as_mask_mod(fn):
    if not callable(fn):
        raise TypeError(f"`mask_mod` must be callable as fn(b, h, q_idx, kv_idx) -> bool; got {type(fn).__name__}.")
    return _StaticMaskFn(fn) if _is_plain_callable(fn) else fn


@mod_dataclass
class MaskScoreMod(AttentionMod):
    """A mask mod wrapped as a score mod: identity scores, the mask kept."""

    mask_fn: Any
    has_mask: ClassVar[bool] = True

    def mask(self, b, h, q_idx, kv_idx):
        return self.mask_fn(b, h, q_idx, kv_idx)

    def block_classes(self, b, h, tiles):
        return mask_block_classes(self.mask_fn, b, h, tiles)


@mod_dataclass
class ComposedMod(AttentionMod):
    """Several mods in sequence: scores chained left to right, masks ANDed."""

    mods: tuple

    @property
    def has_transform(self):  # type: ignore[override]
        return any(m.has_transform for m in self.mods)

    @property
    def has_mask(self):  # type: ignore[override]
        return any(m.has_mask for m in self.mods)

    def transform(self, score, b, h, q_idx, kv_idx):
        for m in self.mods:
            if m.has_transform:
                score = m.transform(score, b, h, q_idx, kv_idx)
        return score

    def scaled_transform(self, raw, scale, b, h, q_idx, kv_idx, positions=None):
        rewrites = [m for m in self.mods if m.has_transform]
        if len(rewrites) == 1:  # masks leave scores alone: the one rewrite's own form
            return rewrites[0].scaled_transform(raw, scale, b, h, q_idx, kv_idx, positions)
        return super().scaled_transform(raw, scale, b, h, q_idx, kv_idx, positions)

    def mask(self, b, h, q_idx, kv_idx):
        out = None
        for m in self.mods:
            if m.has_mask:
                mm = m.mask(b, h, q_idx, kv_idx)
                out = mm if out is None else jnp.logical_and(out, mm)
        return out

    def block_classes(self, b, h, tiles):
        return combine_classes([m.block_classes(b, h, tiles) for m in self.mods if m.has_mask], "and")


@mod_dataclass
class _AndMask:
    mods: tuple

    def __call__(self, b, h, q_idx, kv_idx):
        out = self.mods[0](b, h, q_idx, kv_idx)
        for m in self.mods[1:]:
            out = jnp.logical_and(out, m(b, h, q_idx, kv_idx))
        return out

    def block_classes(self, b, h, tiles):
        return combine_classes([mask_block_classes(m, b, h, tiles) for m in self.mods], "and")


@mod_dataclass
class _OrMask:
    mods: tuple

    def __call__(self, b, h, q_idx, kv_idx):
        out = self.mods[0](b, h, q_idx, kv_idx)
        for m in self.mods[1:]:
            out = jnp.logical_or(out, m(b, h, q_idx, kv_idx))
        return out

    def block_classes(self, b, h, tiles):
        return combine_classes([mask_block_classes(m, b, h, tiles) for m in self.mods], "or")


def compose_score_mods(*mods) -> AttentionMod:
    """Composes score mods: scores chained left to right, masks ANDed.

    The masks of mask-type mods are collected and applied once, after every
    score rewrite, so a later rewrite never "unmasks" a hidden key (softcap of
    ``-inf`` would otherwise give ``-cap``). ``None`` entries are ignored.

    Args:
        *mods: score mods (attnax mods or plain callables).

    Returns:
        One :class:`AttentionMod`.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import causal_mod, softcap_mod, compose_score_mods
        >>> mod = compose_score_mods(causal_mod(), softcap_mod(2.0))
        >>> q = jnp.arange(2)[:, None]; k = jnp.arange(2)[None, :]
        >>> mod(jnp.full((2, 2), 10.0), 0, 0, q, k)
        Array([[1.9998183,      -inf],
               [1.9998183, 1.9998183]], dtype=float32)
    """
    flat = []
    for m in mods:
        if m is None:
            continue
        m = _as_score_mod(m)
        flat.extend(m.mods if isinstance(m, ComposedMod) else (m,))
    if len(flat) == 1:
        return flat[0]
    return ComposedMod(tuple(flat))


def mask_mod_to_score_mod(mask_mod) -> AttentionMod:
    """Wraps a mask mod as a score mod that still carries its mask.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import mask_mod_to_score_mod
        >>> mod = mask_mod_to_score_mod(lambda b, h, q, k: k <= q)
        >>> mod(jnp.ones((2, 2)), 0, 0, jnp.arange(2)[:, None], jnp.arange(2)[None, :])
        Array([[  1., -inf],
               [  1.,   1.]], dtype=float32)
    """
    return MaskScoreMod(_as_mask_mod(mask_mod))


def and_masks(*mask_mods):
    """A mask mod that attends where every given mask mod attends.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import and_masks
        >>> m = and_masks(lambda b, h, q, k: k <= q, lambda b, h, q, k: q - k < 2)
        >>> m(0, 0, jnp.arange(3)[:, None], jnp.arange(3)[None, :]).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [0, 1, 1]], dtype=int32)
    """
    if not mask_mods:
        raise ValueError("`and_masks` needs at least one mask mod; got none.")
    return _AndMask(tuple(_as_mask_mod(m) for m in mask_mods))


def or_masks(*mask_mods):
    """A mask mod that attends where any given mask mod attends.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.score_mods import or_masks
        >>> m = or_masks(lambda b, h, q, k: k <= q, lambda b, h, q, k: k == 2)
        >>> m(0, 0, jnp.arange(3)[:, None], jnp.arange(3)[None, :]).astype(int)
        Array([[1, 0, 1],
               [1, 1, 1],
               [1, 1, 1]], dtype=int32)
    """
    if not mask_mods:
        raise ValueError("`or_masks` needs at least one mask mod; got none.")
    return _OrMask(tuple(_as_mask_mod(m) for m in mask_mods))


def grid_indices(B: int, H: int, T: int, S: int, q_offset=0):
    """Broadcastable ``(b, h, q_idx, kv_idx)`` over a ``[B, H, T, S]`` grid.

    ``q_idx`` is absolute: ``q_offset + arange(T)``; a per-batch ``q_offset``
    (shape ``[B]``) gives ``q_idx`` the shape ``[B, 1, T, 1]``.
    """
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    h = jnp.arange(H, dtype=jnp.int32)[None, :, None, None]
    q_offset = jnp.asarray(q_offset, dtype=jnp.int32)
    q_local = jnp.arange(T, dtype=jnp.int32)[None, None, :, None]
    q_idx = q_local + (q_offset.reshape(-1, 1, 1, 1) if q_offset.ndim else q_offset)
    kv_idx = jnp.arange(S, dtype=jnp.int32)[None, None, None, :]
    return b, h, q_idx, kv_idx


def mask_mod_to_boolean_mask(mask_mod, B, H, T: int, S: int, q_offset=0) -> jax.Array:
    """Evaluates a mask mod on the whole grid: a ``[B, H, T, S]`` boolean array.

    ``B`` and ``H`` may be None: the result then has size 1 there (it
    broadcasts), and the mod sees index 0.

    Example:
        >>> from attnax.score_mods import mask_mod_to_boolean_mask
        >>> mask_mod_to_boolean_mask(lambda b, h, q, k: k <= q, None, None, 2, 3, q_offset=1)[0, 0]
        Array([[ True,  True, False],
               [ True,  True,  True]], dtype=bool)
    """
    mask_mod = _as_mask_mod(mask_mod)
    B = 1 if B is None else B
    H = 1 if H is None else H
    b, h, q_idx, kv_idx = grid_indices(B, H, T, S, q_offset)
    out = mask_mod(b, h, q_idx, kv_idx)
    return jnp.broadcast_to(jnp.asarray(out, dtype=bool), (B, H, T, S))


def split_score_mod(score_mod=None, mask_mod=None):
    """Splits the user's mods into ``(transform, mask)`` callables for kernels.

    Returns:
        ``transform(score, b, h, q_idx, kv_idx)`` or None when scores are not
        rewritten, and ``mask(b, h, q_idx, kv_idx)`` or None when nothing is
        masked. The mask ANDs ``mask_mod`` with the mask a mask-type score mod
        carries.
    """
    transform = mask = None
    if score_mod is not None:
        mod = _as_score_mod(score_mod)
        if mod.has_transform:
            transform = mod.transform
        if mod.has_mask:
            mask = mod.mask
    if mask_mod is not None:
        extra = _as_mask_mod(mask_mod)
        if mask is None:
            mask = extra
        else:
            inner = mask
            mask = lambda b, h, q, k: jnp.logical_and(inner(b, h, q, k), extra(b, h, q, k))  # noqa: E731
    return transform, mask
