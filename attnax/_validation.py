"""Every argument check of the public entry points, in one place.

Checks run at trace time on static shapes, before any compute, and raise
``ValueError`` (shapes, values) or ``TypeError`` (dtypes, kinds of object) with
a message that names the argument, the value given, what is expected and how
to fix it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class AttentionDims:
    """Static sizes of one attention call (BHSD)."""

    B: int
    H: int
    Hk: int
    T: int
    S: int
    D: int
    Dv: int

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.H // self.Hk


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """The checked and resolved arguments every kernel receives."""

    dims: AttentionDims
    scale: float
    q_offset: Any  # int, or int32 array [B]
    dropout_rate: float  # 0.0 when dropout is off (deterministic or rate 0)
    dropout_rng: Any
    mask: Any  # bool array broadcastable to [B, H, T, S], or None

    @property
    def dropout_active(self) -> bool:
        return self.dropout_rate > 0.0


def _shape_of(name, x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"`{name}` must be an array; got {type(x).__name__}.")
    return tuple(x.shape)


def check_qkv(query, key, value, *, layout: str = "BHSD") -> AttentionDims:
    """Checks ranks, dtypes and dimension agreement of query/key/value.

    ``layout`` is ``"BHSD"`` (``[batch, heads, seq, dim]``) or ``"BSHD"``.
    """
    shapes = {n: _shape_of(n, x) for n, x in (("query", query), ("key", key), ("value", value))}
    letters = "[batch, num_heads, seq, head_dim]" if layout == "BHSD" else "[batch, seq, num_heads, head_dim]"
    for n, s in shapes.items():
        if len(s) != 4:
            raise ValueError(f"`{n}` must have rank 4 {letters} ({layout}); got shape {s}.")
    dtypes = {n: jnp.dtype(x.dtype) for n, x in (("query", query), ("key", key), ("value", value))}
    for n, d in dtypes.items():
        if d not in [jnp.dtype(t) for t in _FLOAT_DTYPES]:
            raise TypeError(f"`{n}` must be bfloat16, float16, float32 or float64; got {d}.")
    if not dtypes["query"] == dtypes["key"] == dtypes["value"]:
        raise TypeError(
            f"`query`, `key` and `value` must share one dtype; got {dtypes['query']}, {dtypes['key']}, "
            f"{dtypes['value']}. Cast them, e.g. key.astype(query.dtype)."
        )
    q, k, v = shapes["query"], shapes["key"], shapes["value"]
    if layout == "BHSD":
        (B, H, T, D), (Bk, Hk, S, Dk), (Bv, Hv, Sv, Dv) = q, k, v
    else:
        (B, T, H, D), (Bk, S, Hk, Dk), (Bv, Sv, Hv, Dv) = q, k, v
    if not B == Bk == Bv:
        raise ValueError(f"`query`, `key` and `value` must share the batch size; got {B}, {Bk}, {Bv}.")
    if D != Dk:
        raise ValueError(f"`query` and `key` must share head_dim; got {D} and {Dk}.")
    if Hk != Hv or S != Sv:
        raise ValueError(
            f"`key` and `value` must share num_kv_heads and kv length; got key {k} and value {v} ({layout})."
        )
    if min(B, H, T, D, Hk, S, Dv) < 1:
        raise ValueError(f"attention needs non-empty inputs; got query {q}, key {k}, value {v}.")
    if H % Hk:
        raise ValueError(
            f"`num_heads` ({H}) must be a multiple of `num_kv_heads` ({Hk}) for grouped-query attention: "
            f"query head h reads kv head h // (num_heads // num_kv_heads)."
        )
    return AttentionDims(B=B, H=H, Hk=Hk, T=T, S=S, D=D, Dv=Dv)


def check_scale(scale, head_dim: int) -> float:
    """Resolves ``scale`` (default ``1/sqrt(head_dim)``); must be a float > 0."""
    if scale is None:
        return float(1.0 / np.sqrt(head_dim))
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"`scale` must be a Python float > 0 (static); got {type(scale).__name__} {scale!r}.")
    if not scale > 0:
        raise ValueError(f"`scale` must be > 0; got {scale!r}. Leave it None for 1/sqrt(head_dim).")
    return float(scale)


def check_q_offset(q_offset, batch: int):
    """``q_offset``: an int >= 0, or an int array of shape ``[batch]``."""
    if isinstance(q_offset, bool):
        raise TypeError(f"`q_offset` must be an int or an int array [B]; got bool {q_offset!r}.")
    if isinstance(q_offset, (int, np.integer)):
        if q_offset < 0:
            raise ValueError(f"`q_offset` must be >= 0 (the position of the first query); got {q_offset}.")
        return int(q_offset)
    if not hasattr(q_offset, "dtype"):
        raise TypeError(f"`q_offset` must be an int or an int array [B]; got {type(q_offset).__name__}.")
    if not jnp.issubdtype(q_offset.dtype, jnp.integer):
        raise TypeError(f"`q_offset` must have an integer dtype; got {q_offset.dtype}.")
    shape = tuple(q_offset.shape)
    if shape == ():
        return jnp.asarray(q_offset, jnp.int32)
    if shape not in ((batch,), (1,)):
        raise ValueError(f"`q_offset` must be a scalar or have shape [{batch}] (one per batch row); got {shape}.")
    return jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))


def check_dropout(dropout_rate, dropout_rng, deterministic) -> tuple[float, Any]:
    """Returns the effective ``(rate, rng)``: rate 0.0 when dropout is off."""
    if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real):
        raise TypeError(f"`dropout_rate` must be a Python float in [0, 1); got {type(dropout_rate).__name__}.")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"`dropout_rate` must satisfy 0 <= dropout_rate < 1; got {dropout_rate!r}.")
    if deterministic or dropout_rate == 0.0:
        return 0.0, None
    if dropout_rng is None:
        raise ValueError(
            f"dropout is on (dropout_rate={dropout_rate}, deterministic=False) but `dropout_rng` is None: "
            "pass a key, e.g. dropout_rng=jax.random.key(0), or set deterministic=True."
        )
    if not hasattr(dropout_rng, "dtype"):
        raise TypeError(f"`dropout_rng` must be a JAX PRNG key; got {type(dropout_rng).__name__}.")
    if not (jnp.issubdtype(dropout_rng.dtype, jax.dtypes.prng_key) or dropout_rng.dtype == jnp.uint32):
        raise TypeError(f"`dropout_rng` must be a PRNG key (jax.random.key) or uint32 key data; got {dropout_rng.dtype}.")
    return float(dropout_rate), dropout_rng


def check_mask(mask, dims: AttentionDims):
    """A dense boolean mask broadcastable to ``[B, H, T, S]``, returned as rank 4."""
    if mask is None:
        return None
    shape = _shape_of("mask", mask)
    if jnp.dtype(mask.dtype) != jnp.dtype(bool):
        raise TypeError(f"`mask` must be boolean (True = attend); got dtype {mask.dtype}. Use mask.astype(bool).")
    target = (dims.B, dims.H, dims.T, dims.S)
    if len(shape) > 4:
        raise ValueError(f"`mask` must be broadcastable to [B, H, T, S] = {list(target)}; got rank {len(shape)}.")
    full = (1,) * (4 - len(shape)) + shape
    for n, (m, t) in enumerate(zip(full, target)):
        if m not in (1, t):
            raise ValueError(
                f"`mask` shape {shape} is not broadcastable to [B, H, T, S] = {list(target)} "
                f"(dimension {'BHTS'[n]}: {m} vs {t})."
            )
    return jnp.reshape(mask, full)


def check_window_size(window_size) -> tuple[int, int]:
    """``W`` (int >= 1) -> ``(W - 1, 0)``; ``(left, right)`` ints >= -1 pass through."""

    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if is_int(window_size):
        if window_size < 1:
            raise ValueError(f"`window_size` must be >= 1 (keys seen, own position included); got {window_size}.")
        return int(window_size) - 1, 0
    if isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(map(is_int, window_size)):
        left, right = (int(x) for x in window_size)
        if left < -1 or right < -1:
            raise ValueError(f"`window_size` (left, right) entries must be >= -1 (-1 = unbounded); got {tuple(window_size)}.")
        return left, right
    raise ValueError(f"`window_size` must be an int W or a (left, right) pair of ints; got {window_size!r}.")


def check_callable(name: str, fn, signature: str):
    if fn is not None and not callable(fn):
        raise TypeError(f"`{name}` must be callable as {signature}; got {type(fn).__name__}.")


def check_attention_args(
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
    layout: str = "BHSD",
) -> AttentionArgs:
    """All checks of the :class:`attnax.typing.AttentionFn` keyword set."""
    dims = check_qkv(query, key, value, layout=layout)
    check_callable("score_mod", score_mod, "fn(score, b, h, q_idx, kv_idx)")
    check_callable("mask_mod", mask_mod, "fn(b, h, q_idx, kv_idx) -> bool")
    if block_mask is not None:
        from attnax.block_mask import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"`block_mask` must be an attnax BlockMask (create_block_mask); got {type(block_mask).__name__}.")
        block_mask.check_compatible(dims)
    return AttentionArgs(
        dims=dims,
        scale=check_scale(scale, dims.D),
        q_offset=check_q_offset(q_offset, dims.B),
        dropout_rate=check_dropout(dropout_rate, dropout_rng, deterministic)[0],
        dropout_rng=check_dropout(dropout_rate, dropout_rng, deterministic)[1],
        mask=check_mask(mask, dims),
    )


def check_kernel_options(name: str, options: dict, allowed: tuple[str, ...]):
    """Rejects unknown ``**kernel_options`` by name."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"`{name}` got unexpected keyword argument(s) {unknown}; its options are {sorted(allowed) or 'none'}."
        )
