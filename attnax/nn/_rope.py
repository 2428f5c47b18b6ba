"""Rotary position embeddings (RoPE), applied with absolute positions."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from attnax._validation import check_rope_base

__all__ = ["RoPE", "apply_rope"]


def apply_rope(x, positions, *, base: float = 10000.0):
    r"""Rotates feature pairs of ``x`` by angles proportional to ``positions``.

    The "rotate-half" form (GPT-NeoX, LLaMA): feature ``i < D/2`` is paired
    with feature ``i + D/2`` and the pair is rotated by
    ``positions * base ** (-2 i / D)``:

    .. math::

        x'_i = x_i \cos\theta_i - x_{i + D/2} \sin\theta_i, \quad
        x'_{i + D/2} = x_{i + D/2} \cos\theta_i + x_i \sin\theta_i.

    Because rotations compose, ``rope(q, m) . rope(k, n)`` depends only on
    ``m - n``: shifting every position by the same amount leaves attention
    scores unchanged, which is why decoding with absolute positions
    (``q_offset + arange(T)``) matches the full forward.

    Args:
        x: ``[..., T, N, D]`` (BTNH), ``D`` even.
        positions: integer positions broadcastable to ``x.shape[:-2]``
            (``[T]`` or ``[B, T]``).
        base: the wavelength base.

    Returns:
        The rotated array, same shape and dtype as ``x`` (angles computed in
        float32, or float64 for float64 inputs).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.nn import apply_rope
        >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
        >>> s1 = jnp.sum(apply_rope(q, jnp.array([5])) * apply_rope(k, jnp.array([3])))
        >>> s2 = jnp.sum(apply_rope(q, jnp.array([12])) * apply_rope(k, jnp.array([10])))
        >>> bool(jnp.allclose(s1, s2, atol=1e-5))  # only the distance matters
        True
    """
    half = x.shape[-1] // 2
    acc = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = base ** (-jnp.arange(half, dtype=acc) / half)
    pos = jnp.asarray(positions).astype(acc)
    pos = pos.reshape((1,) * (x.ndim - 2 - pos.ndim) + pos.shape)  # explicit ranks: no silent promotion
    angles = pos[..., None, None] * inv_freq.reshape((1,) * pos.ndim + (1, half))  # [..., T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(acc), x[..., half:].astype(acc)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary embedding settings for :class:`attnax.MultiHeadAttention` (``rope=``).

    Attributes:
        base: the wavelength base (10000 in RoFormer and LLaMA; larger bases
            suit longer contexts).

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.nn import RoPE
        >>> RoPE(base=500000.0)(jnp.ones((1, 3, 2, 4)), jnp.arange(3)).shape
        (1, 3, 2, 4)
    """

    base: float = 10000.0

    def __post_init__(self):
        object.__setattr__(self, "base", check_rope_base(self.base))

    def __call__(self, x, positions):
        """:func:`apply_rope` with this base."""
        return apply_rope(x, positions, base=self.base)
