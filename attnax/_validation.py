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
        raise TypeError(
            f"`dropout_rng` must be a PRNG key (jax.random.key) or uint32 key data; got {dropout_rng.dtype}."
        )
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
            raise ValueError(
                f"`window_size` (left, right) entries must be >= -1 (-1 = unbounded); got {tuple(window_size)}."
            )
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
            raise TypeError(
                f"`block_mask` must be an attnax BlockMask (create_block_mask); got {type(block_mask).__name__}."
            )
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


# --- attnax.nn: MultiHeadAttention, RoPE, decode cache, the Flax adapter ----------------------------------------


def _is_pos_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1


def check_mha_config(
    *, num_heads, num_kv_heads, in_features, in_kv_features, qkv_features, out_features, dropout_rate,
    broadcast_dropout,
) -> None:
    """Constructor arguments of :class:`attnax.MultiHeadAttention` (resolved defaults)."""  # fmt: skip
    for name, v in (
        ("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("in_features", in_features),
        ("in_kv_features", in_kv_features), ("qkv_features", qkv_features), ("out_features", out_features),
    ):  # fmt: skip
        if not _is_pos_int(v):
            raise ValueError(f"`{name}` must be a positive int; got {v!r}.")
    if qkv_features % num_heads:
        raise ValueError(
            f"`qkv_features` ({qkv_features}) must be divisible by `num_heads` ({num_heads}): each head gets "
            f"qkv_features // num_heads features. Pick qkv_features = num_heads * head_dim."
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"`num_heads` ({num_heads}) must be a multiple of `num_kv_heads` ({num_kv_heads}) for grouped-query "
            f"attention: query head h reads kv head h // (num_heads // num_kv_heads)."
        )
    check_dropout(dropout_rate, None, True)
    if broadcast_dropout and dropout_rate > 0.0:
        raise NotImplementedError(
            "`broadcast_dropout=True` is not supported: attnax kernels draw the dropout mask as a function of "
            "(dropout_rng, b, h, i, j), one independent mask per batch row and head. Set broadcast_dropout=False."
        )


def check_mha_inputs(inputs_q, inputs_kv, *, in_features: int, in_kv_features: int) -> None:
    """Inputs of a :class:`attnax.MultiHeadAttention` call: ``[batch, length, features]``."""
    shape_q = _shape_of("inputs_q", inputs_q)
    if len(shape_q) != 3:
        raise ValueError(
            f"`inputs_q` must have shape [batch, length, features]; got shape {shape_q}. Add a batch axis "
            f"(x[None]) or merge extra ones (x.reshape(-1, *x.shape[-2:]))."
        )
    if shape_q[-1] != in_features:
        raise ValueError(
            f"`inputs_q` has {shape_q[-1]} features (last axis of shape {shape_q}) but the module was built "
            f"with in_features={in_features}. Project the input or rebuild with in_features={shape_q[-1]}."
        )
    if inputs_kv is None:
        return
    shape_kv = _shape_of("inputs_kv", inputs_kv)
    if len(shape_kv) != 3 or shape_kv[0] != shape_q[0]:
        raise ValueError(
            f"`inputs_kv` must have shape [batch, kv_length, features] with the batch of `inputs_q`; "
            f"got inputs_q {shape_q} and inputs_kv {shape_kv}."
        )
    if shape_kv[-1] != in_kv_features:
        raise ValueError(
            f"`inputs_kv` has {shape_kv[-1]} features (last axis of shape {shape_kv}) but the module was built "
            f"with in_kv_features={in_kv_features}. Rebuild with in_kv_features={shape_kv[-1]}."
        )


def check_rope(rope, head_dim: int):
    """``rope`` is None/False, True, or an :class:`attnax.nn.RoPE`; the head dim must be even."""
    from attnax.nn._rope import RoPE

    if rope is None or rope is False:
        return None
    if rope is True:
        rope = RoPE()
    if not isinstance(rope, RoPE):
        raise TypeError(f"`rope` must be None, True or an attnax.nn.RoPE; got {type(rope).__name__}.")
    if head_dim % 2:
        raise ValueError(
            f"rotary embeddings rotate pairs of features, so the head dim must be even; got head_dim={head_dim} "
            f"(qkv_features // num_heads). Choose qkv_features so that the head dim is even, or set rope=None."
        )
    return rope


def check_rope_base(base) -> float:
    """The RoPE wavelength base: a real number > 1."""
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 1:
        raise ValueError(f"`base` (the RoPE wavelength base) must be a number > 1; got {base!r}. Typical: 10000.0.")
    return float(base)


def check_init_cache(batch_size, max_length) -> None:
    """Arguments of ``MultiHeadAttention.init_cache``."""
    if not _is_pos_int(batch_size):
        raise ValueError(f"`batch_size` must be a positive int; got {batch_size!r}.")
    if not _is_pos_int(max_length):
        raise ValueError(f"`max_length` must be a positive int (the cache capacity in tokens); got {max_length!r}.")


def check_decode_call(cache, inputs_kv) -> None:
    """A decode-mode call: a cache exists, and it is self-attention."""
    if cache is None:
        raise ValueError(
            "decode mode needs a KV cache: call `attn.init_cache(batch_size, max_length)` first "
            "(or pass decode=False)."
        )
    if inputs_kv is not None:
        raise ValueError(
            "decode mode is causal self-attention over the cache: `inputs_kv` must be None; got an array. "
            "Use decode=False for cross-attention."
        )


def check_cache_append(key, value, cache_shape: tuple) -> None:
    """New keys/values ``[B, T, Hk, D]`` must match a ``[B, S_max, Hk, D]`` cache but for the length."""
    for name, x in (("key", key), ("value", value)):
        shape = tuple(x.shape)
        if len(shape) != 4 or shape[0] != cache_shape[0] or shape[2:] != cache_shape[2:]:
            raise ValueError(
                f"decode: the new {name} has shape {shape} but the cache holds [batch, max_length, num_kv_heads, "
                f"head_dim] = {list(cache_shape)}; batch, heads and head_dim must agree. Call init_cache with "
                f"batch_size={shape[0]}."
            )


def check_cache_capacity(index, length: int, max_length: int) -> None:
    """Appending ``length`` tokens at ``index`` must fit into ``max_length`` slots.

    The static part (``length > max_length``) is always checked; the position is
    checked when it is concrete (eager calls). Under ``jit`` the index is traced:
    callers then poison the output instead (NaN), see ``attnax.nn``.
    """
    if length > max_length:
        raise ValueError(
            f"cache overflow: {length} new tokens cannot fit in a KV cache of max_length={max_length}. "
            f"Call init_cache with max_length >= {length}."
        )
    if isinstance(index, jax.core.Tracer):
        return
    index = int(index)
    if index + length > max_length:
        raise ValueError(
            f"cache overflow: the KV cache holds {index} of max_length={max_length} tokens; appending {length} "
            f"more needs {index + length}. Call init_cache with a larger max_length (or a fresh cache)."
        )


def check_attention_fn(attention_fn) -> None:
    """``attention_fn``: None, an :class:`attnax.AttentionType` (or its name), or a callable."""
    from attnax.nn._types import AttentionType

    if attention_fn is None or isinstance(attention_fn, AttentionType) or callable(attention_fn):
        return
    if isinstance(attention_fn, str):
        names = sorted(t.value for t in AttentionType)
        if attention_fn.lower() not in names:
            raise ValueError(f"`attention_fn` names no attnax kernel: got {attention_fn!r}; expected one of {names}.")
        return
    raise TypeError(
        f"`attention_fn` must be None (flash_attention), an attnax.AttentionType, a kernel name, or a callable "
        f"with the attnax AttentionFn contract; got {type(attention_fn).__name__}."
    )


def check_flax_attention_call(*, dropout_active: bool, broadcast_dropout: bool, module) -> None:
    """Flax ``attention_fn`` keywords an attnax kernel cannot serve."""
    if module is not None:
        raise NotImplementedError(
            "`module` is set (MultiHeadAttention(..., sow_weights=True)): attnax kernels never materialise the "
            "attention weights, so there is nothing to sow. Call with sow_weights=False, or use "
            "flax.nnx.dot_product_attention_weights for introspection."
        )
    if dropout_active and broadcast_dropout:
        raise NotImplementedError(
            "`broadcast_dropout=True` with active dropout: attnax kernels draw one dropout mask per batch row and "
            "head (a function of dropout_rng, b, h, i, j). Build the Flax module with broadcast_dropout=False."
        )


def check_dropout_rngs(rngs) -> None:
    """Active dropout in ``MultiHeadAttention`` needs randomness from the call or the module."""
    if rngs is None:
        raise ValueError(
            "dropout is on (dropout_rate > 0, deterministic=False) but no randomness is available: pass "
            "rngs=nnx.Rngs(dropout=...) to the call, build the module with keep_rngs=True, or set "
            "deterministic=True."
        )


def check_ring_layout(layout) -> str:
    """Ring attention's sequence layout: ``"zigzag"`` or ``"contiguous"``."""
    if layout not in ("zigzag", "contiguous"):
        raise ValueError(f"`layout` must be 'zigzag' or 'contiguous'; got {layout!r}.")
    return layout


def check_ring_seq_len(name: str, length: int, num_devices: int) -> None:
    """A global sequence length that splits into ``2 * num_devices`` equal chunks."""
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
        raise ValueError(f"`{name}` must be a positive int; got {length!r}.")
    if length % (2 * num_devices):
        raise ValueError(
            f"`{name}` ({length}) must be a multiple of 2 * num_devices ({2 * num_devices}) for the zig-zag "
            f"layout; pad the sequence to {-(-length // (2 * num_devices)) * 2 * num_devices}."
        )


def _axis_tuple(axis) -> tuple:
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def check_ring_style(axis_name, mesh, seq_axis, batch_axis, head_axis) -> str:
    """Which call style of ring attention: ``"shard_map"`` (``axis_name=``) or ``"mesh"``."""
    if (axis_name is None) == (mesh is None):
        raise ValueError(
            "ring attention takes exactly one of `axis_name=` (called inside shard_map, on local shards) or "
            f"`mesh=` with `seq_axis=` (called on global arrays); got axis_name={axis_name!r}, "
            f"mesh={'None' if mesh is None else 'a Mesh'}."
        )
    if axis_name is not None:
        if seq_axis is not None or batch_axis is not None or head_axis is not None:
            raise ValueError(
                "`seq_axis`, `batch_axis` and `head_axis` go with `mesh=`; inside shard_map pass only "
                f"`axis_name=` (got seq_axis={seq_axis!r}, batch_axis={batch_axis!r}, head_axis={head_axis!r})."
            )
        return "shard_map"
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh (jax.make_mesh); got {type(mesh).__name__}.")
    if seq_axis is None:
        raise ValueError(f"`mesh=` needs `seq_axis=`, the mesh axis to shard the sequence over; mesh axes are "
                         f"{tuple(mesh.axis_names)}.")
    seen = []
    for name, axis in (("seq_axis", seq_axis), ("batch_axis", batch_axis), ("head_axis", head_axis)):
        for a in _axis_tuple(axis):
            if a not in mesh.axis_names:
                raise ValueError(f"`{name}` names mesh axis {a!r}, which is not one of {tuple(mesh.axis_names)}.")
            if a in seen:
                raise ValueError(f"mesh axis {a!r} is used twice among seq_axis, batch_axis and head_axis.")
            seen.append(a)
    return "mesh"


def check_ring_mesh_dims(dims: AttentionDims, mesh, batch_axis, head_axis) -> None:
    """Batch and heads divide evenly over the mesh axes that shard them."""
    for name, axis, sizes in (("batch", batch_axis, {"batch": dims.B}), ("head", head_axis,
                              {"num_heads": dims.H, "num_kv_heads": dims.Hk})):  # fmt: skip
        n = int(np.prod([mesh.shape[a] for a in _axis_tuple(axis)]))
        for what, size in sizes.items():
            if size % n:
                raise ValueError(
                    f"`{what}` ({size}) must be a multiple of the size of `{name}_axis` {axis!r} ({n}) to shard it."
                )


def check_ring_local_len(name: str, length: int, layout: str) -> None:
    """Inside shard_map, a zig-zag shard is two equal chunks: its length must be even."""
    if layout == "zigzag" and length % 2:
        raise ValueError(
            f"with layout='zigzag' the local {name} length must be even (two chunks per device); got {length}. "
            "Pad the global sequence to a multiple of 2 * num_devices, or use layout='contiguous'."
        )


# --- attnax.cache and paged attention ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PagedDims:
    """Static sizes of one paged attention call."""

    B: int
    H: int
    Hk: int
    T: int
    D: int
    Dv: int
    num_pages: int
    page_size: int
    max_pages: int  # block table columns: pages one sequence can hold

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.H // self.Hk

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: ``max_pages * page_size``."""
        return self.max_pages * self.page_size


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_int_array(name: str, x, rank: int, what: str):
    shape = _shape_of(name, x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be an integer array {what}; got dtype {x.dtype}.")
    if len(shape) != rank:
        raise ValueError(f"`{name}` must have rank {rank} {what}; got shape {shape}.")
    return shape


def check_paged_args(query, k_pages, v_pages, block_tables, lengths, *, score_mod=None, mask_mod=None, scale=None):
    """Shapes and dtypes of :func:`attnax.kernels.paged_attention`; returns ``(PagedDims, scale)``."""
    q = _shape_of("query", query)
    kp = _shape_of("k_pages", k_pages)
    vp = _shape_of("v_pages", v_pages)
    if len(q) != 4:
        raise ValueError(f"`query` must have rank 4 [batch, num_heads, num_new_tokens, head_dim]; got shape {q}.")
    for name, s in (("k_pages", kp), ("v_pages", vp)):
        if len(s) != 4:
            raise ValueError(
                f"`{name}` must have rank 4 [num_pages, page_size, num_kv_heads, head_dim]; got shape {s}."
            )
    dtypes = [jnp.dtype(x.dtype) for x in (query, k_pages, v_pages)]
    for name, d in zip(("query", "k_pages", "v_pages"), dtypes):
        if d not in [jnp.dtype(t) for t in _FLOAT_DTYPES]:
            raise TypeError(f"`{name}` must be bfloat16, float16, float32 or float64; got {d}.")
    if not dtypes[0] == dtypes[1] == dtypes[2]:
        raise TypeError(
            f"`query`, `k_pages` and `v_pages` must share one dtype; got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}. "
            "Cast the query to the cache dtype, e.g. query.astype(k_pages.dtype)."
        )
    B, H, T, D = q
    N, ps, Hk, Dk = kp
    if vp[:3] != (N, ps, Hk):
        raise ValueError(
            f"`k_pages` and `v_pages` must share [num_pages, page_size, num_kv_heads]; got {kp} and {vp}."
        )
    if D != Dk:
        raise ValueError(f"`query` and `k_pages` must share head_dim; got {D} and {Dk}.")
    if min(B, H, T, D, N, ps, Hk, vp[3]) < 1:
        raise ValueError(f"paged attention needs non-empty inputs; got query {q}, k_pages {kp}, v_pages {vp}.")
    if H % Hk:
        raise ValueError(
            f"`num_heads` ({H}) must be a multiple of `num_kv_heads` ({Hk}) for grouped-query attention: "
            f"query head h reads kv head h // (num_heads // num_kv_heads)."
        )
    bt = _check_int_array("block_tables", block_tables, 2, "[batch, max_pages_per_seq]")
    ln = _check_int_array("lengths", lengths, 1, "[batch]")
    if bt[0] != B or ln[0] != B:
        raise ValueError(
            f"`block_tables` {bt} and `lengths` {ln} must have one row per batch entry of `query` ({B})."
        )
    dims = PagedDims(B=B, H=H, Hk=Hk, T=T, D=D, Dv=vp[3], num_pages=N, page_size=ps, max_pages=bt[1])
    if T > dims.capacity:
        raise ValueError(
            f"the block table is too small: {T} new tokens need positions in a sequence, but `block_tables` has "
            f"{bt[1]} columns of page_size {ps} ({dims.capacity} tokens). Give it at least {-(-T // ps)} columns."
        )
    check_callable("score_mod", score_mod, "fn(score, b, h, q_idx, kv_idx)")
    check_callable("mask_mod", mask_mod, "fn(b, h, q_idx, kv_idx) -> bool")
    return dims, check_scale(scale, D)


def check_paged_values(block_tables, lengths, dims: PagedDims) -> None:
    """Eager calls (concrete arrays): lengths fit the block table, and every page in use exists.

    Under ``jit`` the values are unknown at trace time; kernels then return NaN
    for rows that fail these checks instead.
    """
    if not (_is_concrete(lengths) and _is_concrete(block_tables)):
        return
    lengths = np.asarray(lengths)
    bad = np.flatnonzero((lengths < 0) | (lengths > dims.capacity))
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"`lengths[{b}]` = {int(lengths[b])} is out of range: a sequence holds 0 to max_pages_per_seq * "
            f"page_size = {dims.max_pages} * {dims.page_size} = {dims.capacity} tokens. Give `block_tables` more "
            f"columns (more pages per sequence), or check that lengths count the tokens actually written."
        )
    table = np.asarray(block_tables)
    used = -(-lengths // dims.page_size)
    in_use = np.arange(dims.max_pages)[None, :] < used[:, None]
    wrong = in_use & ((table < 0) | (table >= dims.num_pages))
    if wrong.any():
        b, j = (int(i) for i in np.argwhere(wrong)[0])
        raise ValueError(
            f"`block_tables[{b}, {j}]` = {int(table[b, j])} is not a page: row {b} holds {int(lengths[b])} tokens, "
            f"so its first {int(used[b])} entries must be page indices in [0, {dims.num_pages}). Allocate the "
            f"pages before attending (attnax.cache.PagedKVCache.append does)."
        )


def check_paged_implementation(implementation, interpret) -> str:
    """``implementation``: None, ``'pallas'`` or ``'xla'``; resolves None by platform."""
    if implementation not in (None, "pallas", "xla"):
        raise ValueError(f"`implementation` must be None, 'pallas' or 'xla'; got {implementation!r}.")
    if not isinstance(interpret, bool):
        raise TypeError(f"`interpret` must be a bool; got {type(interpret).__name__}.")
    if implementation is None:
        implementation = "pallas" if (interpret or jax.default_backend() == "gpu") else "xla"
    if interpret and implementation != "pallas":
        raise ValueError(
            "`interpret=True` runs the Pallas kernel on CPU: it goes with implementation='pallas' (or None)."
        )
    return implementation


def check_cache_create(*, batch_size, max_length=None, num_kv_heads, head_dim, value_head_dim=None,
                       num_pages=None, page_size=None, max_pages_per_seq=None) -> None:  # fmt: skip
    """Sizes given to ``KVCache.create`` / ``PagedKVCache.create``: positive ints."""
    for name, v in (
        ("batch_size", batch_size), ("max_length", max_length), ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim), ("value_head_dim", value_head_dim), ("num_pages", num_pages),
        ("page_size", page_size), ("max_pages_per_seq", max_pages_per_seq),
    ):  # fmt: skip
        if v is not None and not _is_pos_int(v):
            raise ValueError(f"`{name}` must be a positive int; got {v!r}.")


def check_kv_append(key, value, *, batch: int, num_kv_heads: int, head_dim: int, value_head_dim: int, num_new=None):
    """New tokens ``[B, T, Hk, D]`` / ``[B, T, Hk, Dv]`` for a cache of these sizes; returns ``T``."""
    for name, x, d in (("key", key, head_dim), ("value", value, value_head_dim)):
        shape = _shape_of(name, x)
        if len(shape) != 4 or shape[0] != batch or shape[2] != num_kv_heads or shape[3] != d:
            raise ValueError(
                f"the new `{name}` must have shape [batch, num_new_tokens, num_kv_heads, head_dim] = "
                f"[{batch}, T, {num_kv_heads}, {d}] to fit this cache; got {shape}."
            )
    if key.shape[1] != value.shape[1] or key.shape[1] < 1:
        raise ValueError(f"`key` and `value` must hold the same number (>= 1) of new tokens; got {key.shape} and "
                         f"{value.shape}.")
    if num_new is not None:
        shape = _check_int_array("num_new", num_new, 1, "[batch]")
        if shape[0] != batch:
            raise ValueError(f"`num_new` must have shape [{batch}] (one count per row); got {shape}.")
        if _is_concrete(num_new):
            n = np.asarray(num_new)
            if (n < 0).any() or (n > key.shape[1]).any():
                raise ValueError(f"`num_new` entries must lie in [0, {key.shape[1]}] (the new tokens given); got "
                                 f"{n.tolist()}.")
    return key.shape[1]


def check_cache_room(lengths, num_new, capacity: int, what: str) -> None:
    """Eagerly: ``lengths + num_new`` fits ``capacity`` tokens per row (skipped under ``jit``)."""
    if not (_is_concrete(lengths) and _is_concrete(num_new)):
        return
    total = np.asarray(lengths) + np.asarray(num_new)
    bad = np.flatnonzero(total > capacity)
    if bad.size:
        b = int(bad[0])
        raise ValueError(
            f"cache overflow: row {b} holds {int(np.asarray(lengths)[b])} tokens and appending "
            f"{int(np.broadcast_to(np.asarray(num_new), total.shape)[b])} more needs {int(total[b])}, but {what} "
            f"holds {capacity}. Create the cache with more room."
        )


def check_pages_available(needed, num_free) -> None:
    """Eagerly: the free list holds the pages an append needs (skipped under ``jit``)."""
    if not (_is_concrete(needed) and _is_concrete(num_free)):
        return
    if int(needed) > int(num_free):
        raise ValueError(
            f"out of pages: this append needs {int(needed)} new pages but only {int(num_free)} are free. Release "
            f"finished sequences (PagedKVCache.release) or create the cache with more num_pages."
        )


def check_release_rows(rows, batch: int):
    """``rows``: a bool array ``[batch]`` (True = free that row's pages)."""
    shape = _shape_of("rows", rows)
    if jnp.dtype(rows.dtype) != jnp.dtype(bool) or shape != (batch,):
        raise ValueError(f"`rows` must be a boolean array of shape [{batch}] (True = release); got dtype "
                         f"{rows.dtype}, shape {shape}.")
