"""The decode-mode KV cache of :class:`attnax.MultiHeadAttention`.

A cache is any object with the :class:`DecodeCache` interface, stored in the
module's ``cache`` attribute: ``append`` writes the new keys and values and
returns a :class:`CacheView`, everything the attention call needs. The module
never looks inside the cache, so a different cache (paged, per-row lengths)
plugs in by assigning ``attn.cache = other``.

The default, :class:`ContiguousKVCache`, is a fixed ``[B, S_max, Hk, D]``
buffer pair and one write index shared by the batch. Attention always runs
over all ``S_max`` slots, with a mask mod that hides unwritten ones, so every
step has the same shapes: one compilation for the prefill length and one for
single tokens, none per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from attnax._validation import check_cache_append, check_cache_capacity
from attnax.score_mods._base import mod_dataclass

__all__ = ["CacheView", "ContiguousKVCache", "DecodeCache", "DecodeMask"]


class CacheView(NamedTuple):
    """What one decode step attends over.

    Attributes:
        key: ``[B, S, Hk, D]`` (BTNH), the whole cache.
        value: ``[B, S, Hk, Dv]``.
        q_offset: absolute position of the first new query (int32 scalar or
            ``[B]``).
        mask_mod: hides slots that are not (yet) visible.
        valid: bool scalar, False when the append overflowed the cache (under
            ``jit``, where it cannot raise); the module then returns NaN.
        attention: None, or ``attention(query, **kwargs)`` on a BHSD query:
            the cache attends itself (a paged cache) and the module calls this
            instead of its ``attention_fn`` (``key``, ``value``, ``q_offset``
            and ``mask_mod`` are then unused).
    """

    key: Any
    value: Any
    q_offset: Any
    mask_mod: Any
    valid: Any
    attention: Any = None


class DecodeCache(Protocol):
    """The interface :class:`attnax.MultiHeadAttention` expects of a KV cache."""

    @property
    def position(self) -> jax.Array:
        """Absolute position of the next token to be appended (a scalar, or ``[B]`` per row)."""
        ...

    def append(self, key: jax.Array, value: jax.Array) -> CacheView:
        """Writes ``key`` ``[B, T, Hk, D]`` and ``value`` ``[B, T, Hk, Dv]`` at the current position."""
        ...


@mod_dataclass
class DecodeMask:
    """Causal over absolute positions, and only the first ``length`` slots: ``kv_idx < length``."""

    length: Any  # int32 scalar or [B]: a pytree leaf, so a new length never retraces

    def __call__(self, b, h, q_idx, kv_idx):
        length = jnp.asarray(self.length)
        if length.ndim:
            length = length[b]
        return jnp.logical_and(kv_idx < length, kv_idx <= q_idx)


class ContiguousKVCache(nnx.Module):
    """A fixed-capacity KV cache: ``[B, max_length, Hk, D]`` buffers and a write index.

    Args:
        batch_size: ``B``.
        max_length: capacity in tokens.
        num_kv_heads: ``Hk``.
        head_dim: ``D`` (keys and values).
        dtype: storage dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from attnax.nn import ContiguousKVCache
        >>> cache = ContiguousKVCache(1, 8, 2, 4, jnp.float32)
        >>> view = cache.append(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4)))
        >>> view.key.shape, int(view.q_offset), int(cache.position)
        ((1, 8, 2, 4), 0, 3)
    """

    def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype):
        shape = (batch_size, max_length, num_kv_heads, head_dim)
        self.max_length = max_length
        self.key = nnx.Cache(jnp.zeros(shape, dtype))
        self.value = nnx.Cache(jnp.zeros(shape, dtype))
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))

    @property
    def position(self) -> jax.Array:
        """Number of tokens written so far (the absolute position of the next one)."""
        return self.index[...]

    def append(self, key, value) -> CacheView:
        """Writes ``T`` new tokens at :attr:`position` and advances it.

        Raises:
            ValueError: the tokens do not fit (checked eagerly; under ``jit``
                the returned view has ``valid=False`` instead).
        """
        check_cache_append(key, value, self.key.shape)
        index = self.index[...]
        length = key.shape[1]
        check_cache_capacity(index, length, self.max_length)
        zero = jnp.zeros((), index.dtype)  # all start indices of one dtype (Python ints are int64 under x64)
        start = (zero, index, zero, zero)
        buf_k, buf_v = self.key[...], self.value[...]
        self.key[...] = jax.lax.dynamic_update_slice(buf_k, key.astype(buf_k.dtype), start)
        self.value[...] = jax.lax.dynamic_update_slice(buf_v, value.astype(buf_v.dtype), start)
        self.index[...] = index + length
        return CacheView(
            key=self.key[...],
            value=self.value[...],
            q_offset=index,
            mask_mod=DecodeMask(index + length),
            valid=index + length <= self.max_length,
        )
