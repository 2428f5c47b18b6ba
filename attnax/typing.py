"""Protocols and array aliases shared by every attnax kernel.

The protocol is deliberately small. A *score mod* rewrites the scaled score of
one (query, key) pair; a *mask mod* says whether the pair may attend. Both are
plain ``jnp`` functions of broadcastable integer index arrays, so the same mod
runs on the whole ``[B, H, T, S]`` grid (the reference) and on one
``[block_q, block_kv]`` tile (a Pallas kernel).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "AttentionFn",
    "BoolMask",
    "KeyArray",
    "LSEArray",
    "MaskMod",
    "QueryArray",
    "ScoreMod",
    "ValueArray",
]

#: Queries in BHSD layout: ``[batch, num_heads, q_len, head_dim]``.
QueryArray = Float[Array, "B H T D"]
#: Keys in BHSD layout: ``[batch, num_kv_heads, kv_len, head_dim]``.
KeyArray = Float[Array, "B Hk S D"]
#: Values in BHSD layout: ``[batch, num_kv_heads, kv_len, value_dim]``.
ValueArray = Float[Array, "B Hk S Dv"]
#: Log-sum-exp of the modified scores, natural log, float32: ``[B, H, T]``.
LSEArray = Float[Array, "B H T"]
#: A dense boolean mask broadcastable to ``[B, H, T, S]``; True = attend.
BoolMask = Bool[Array, "..."]
#: Integer index arrays handed to mods (broadcastable to the score tile).
IndexArray = Int[Array, "..."]


@runtime_checkable
class ScoreMod(Protocol):
    """Rewrites scaled attention scores, element by element.

    ``score`` is already ``q . k * scale``. ``b`` is the batch index, ``h`` the
    *query* head, ``q_idx`` and ``kv_idx`` the absolute positions of the query
    and the key. All index arguments are integer arrays broadcastable against
    ``score``; a mod must not assume a particular rank or tile shape, only
    broadcasting.

    Returning ``-inf`` hides the key, but prefer a mask-type mod (for example
    :func:`attnax.score_mods.mask_mod_to_score_mod`): kernels can then skip
    whole blocks that the mask hides.

    Example:
        >>> import jax.numpy as jnp
        >>> def shift(score, b, h, q_idx, kv_idx):
        ...     return score + 0.5 * (h + 1)
        >>> float(shift(jnp.float32(1.0), 0, 1, 3, 2))
        2.0
    """

    def __call__(
        self, score: jax.Array, b: jax.Array, h: jax.Array, q_idx: jax.Array, kv_idx: jax.Array
    ) -> jax.Array: ...


@runtime_checkable
class MaskMod(Protocol):
    """Decides which (query, key) pairs attend: True = attend.

    Takes the same broadcastable integer index arrays as :class:`ScoreMod`
    (batch, query head, absolute query position, absolute key position) and
    returns a boolean array of their broadcast shape.

    Example:
        >>> import jax.numpy as jnp
        >>> def causal(b, h, q_idx, kv_idx):
        ...     return kv_idx <= q_idx
        >>> causal(0, 0, jnp.arange(3)[:, None], jnp.arange(3)[None, :]).astype(int)
        Array([[1, 0, 0],
               [1, 1, 0],
               [1, 1, 1]], dtype=int32)
    """

    def __call__(self, b: jax.Array, h: jax.Array, q_idx: jax.Array, kv_idx: jax.Array) -> jax.Array: ...


class AttentionFn(Protocol):
    """The keyword contract every attnax kernel implements.

    Args:
        query: ``[B, H, T, D]``.
        key: ``[B, Hk, S, D]`` with ``H % Hk == 0`` (GQA/MQA when ``Hk < H``).
        value: ``[B, Hk, S, Dv]``.
        score_mod: a :class:`ScoreMod`, applied to the scaled scores.
        mask_mod: a :class:`MaskMod`.
        mask: dense boolean array broadcastable to ``[B, H, T, S]``.
        block_mask: a :class:`attnax.block_mask.BlockMask`.
        scale: score scale, default ``1/sqrt(D)``.
        q_offset: absolute position of the first query (int or ``[B]``).
        dropout_rate: probability of dropping a normalised attention weight.
        dropout_rng: PRNG key, required when dropout is active.
        deterministic: when True, dropout is off.
        return_lse: also return the float32 log-sum-exp ``[B, H, T]``.
        **kernel_options: implementation-specific options (block sizes, ...).

    Returns:
        ``out`` of shape ``[B, H, T, Dv]`` in the query dtype, or
        ``(out, lse)`` when ``return_lse`` is True.
    """

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        score_mod: ScoreMod | None = None,
        mask_mod: MaskMod | None = None,
        mask: jax.Array | None = None,
        block_mask: Any = None,
        scale: float | None = None,
        q_offset: int | jax.Array = 0,
        dropout_rate: float = 0.0,
        dropout_rng: jax.Array | None = None,
        deterministic: bool = True,
        return_lse: bool = False,
        **kernel_options: Any,
    ) -> jax.Array | tuple[jax.Array, jax.Array]: ...
