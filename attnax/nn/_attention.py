"""``MultiHeadAttention``: Flax NNX multi-head attention over any attnax kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from attnax._validation import (
    check_decode_call,
    check_dropout_rngs,
    check_init_cache,
    check_mha_config,
    check_mha_inputs,
    check_rope,
)
from attnax.nn._cache import ContiguousKVCache
from attnax.nn._layout import attend_btnh
from attnax.nn._paged_cache import PagedDecodeCache
from attnax.nn._rope import RoPE
from attnax.nn._types import AttentionType, resolve_attention_fn
from attnax.score_mods._base import compose_score_mods

__all__ = ["MultiHeadAttention"]

_zeros_init = initializers.zeros_init()


def _compose(*mods):
    mods = [m for m in mods if m is not None]
    return compose_score_mods(*mods) if mods else None


def _self_attending(attention):
    """An ``attention_fn`` for a cache that attends itself: the new keys and values are already in it."""

    def fn(query, key, value, **kwargs):
        del key, value
        return attention(query, **kwargs)

    return fn


class MultiHeadAttention(nnx.Module):
    r"""Multi-head attention whose core is any attnax kernel.

    Projects the inputs to ``H`` query heads and ``Hk`` key/value heads
    (grouped-query attention when ``Hk < H``, multi-query when ``Hk = 1``),
    optionally rotates queries and keys (RoPE), runs ``attention_fn`` with the
    module's and the call's score mods, and projects the ``H`` heads back:

    .. math::

        \mathrm{out} = \sum_h \mathrm{attn}(x_q W^Q_h, x_{kv} W^K_{g(h)}, x_{kv} W^V_{g(h)}) W^O_h,
        \quad g(h) = h \,/\!/\, (H / H_k).

    The parameters (``query``, ``key``, ``value``, ``out``, each an
    :class:`flax.nnx.LinearGeneral`) have the names and shapes of
    :class:`flax.nnx.MultiHeadAttention`'s, so weights move between the two
    with ``nnx.update(attn, nnx.state(flax_attn, nnx.Param))`` and the
    outputs agree.

    **Score mods.** ``score_mod`` (constructor) and ``score_mod=`` (call)
    compose, the constructor's first: scores are rewritten by one then the
    other, masks are ANDed (:func:`attnax.score_mods.compose_score_mods`).
    Positions seen by mods are absolute, in decode mode too.

    **Decode mode** (``decode=True`` here or per call): call
    :meth:`init_cache` first. Each call appends its ``T`` tokens' keys and
    values to the cache and attends causally over everything written so far,
    with ``q_offset`` = the number of cached tokens, so a prefill of many
    tokens followed by one token at a time reproduces the full causal forward
    (RoPE, ALiBi, windows and documents included: they see absolute
    positions). Shapes never change from step to step, so an ``nnx.jit``-ted
    step compiles once per distinct ``T``. Overflowing the cache raises a
    ``ValueError`` in eager calls; under ``jit`` (where the position is not
    known at trace time) the step's output is NaN instead. The cache lives in
    ``self.cache``; any object with the :class:`attnax.nn.DecodeCache`
    interface can replace it.

    Args:
        rngs: :class:`flax.nnx.Rngs` for the parameters (and dropout).
        num_heads: number of query heads ``H``.
        in_features: features of ``inputs_q``.
        qkv_features: total query features ``H * D``; default
            ``in_features``. Must be divisible by ``num_heads``.
        out_features: output features; default ``in_features``.
        num_kv_heads: key/value heads ``Hk``; default ``num_heads``. Must
            divide ``num_heads``.
        in_kv_features: features of ``inputs_kv``; default ``in_features``.
        attention_fn: the kernel: None (:func:`attnax.flash_attention`, the
            best one for the platform), an :class:`attnax.AttentionType`, or
            any :class:`attnax.typing.AttentionFn` (a
            ``functools.partial(kernel, implementation=..., ...)`` included).
            It receives BHSD arrays.
        score_mod: a score mod applied on every call (e.g.
            :func:`attnax.score_mods.causal_mod` for a decoder).
        dropout_rate: dropout on the attention weights.
        broadcast_dropout: must be False when dropout is on: attnax kernels
            draw one mask per batch row and head.
        deterministic: disables dropout; the call's ``deterministic=`` takes
            precedence. ``nnx.Module.eval()`` sets it.
        use_bias: biases in the four projections.
        decode: decode mode by default (the call's ``decode=`` takes
            precedence).
        rope: rotary embeddings: None, True (base 10000) or a
            :class:`attnax.nn.RoPE`. Rotations use absolute positions
            (``arange(T)`` queries, ``arange(S)`` keys; offset by the cache
            position in decode mode).
        dtype: computation dtype (default: inferred from inputs and params).
        param_dtype: parameter dtype.
        precision: precision of the projections.
        kernel_init: initializer of the projection kernels.
        out_kernel_init: initializer of the output kernel; default
            ``kernel_init``.
        bias_init: initializer of the biases.
        out_bias_init: initializer of the output bias; default ``bias_init``.
        keep_rngs: keep a dropout stream (forked from ``rngs``) for calls that
            pass no ``rngs``.

    Raises:
        ValueError: sizes that do not divide, or a bad argument value.
        NotImplementedError: ``broadcast_dropout=True`` with dropout.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> import attnax
        >>> from attnax.score_mods import causal_mod
        >>> attn = attnax.MultiHeadAttention(
        ...     nnx.Rngs(0), num_heads=4, num_kv_heads=2, in_features=16, score_mod=causal_mod(), rope=True
        ... )
        >>> x = jax.random.normal(jax.random.key(1), (2, 5, 16))
        >>> full = attn(x)
        >>> full.shape
        (2, 5, 16)
        >>> attn.init_cache(batch_size=2, max_length=8)
        >>> steps = [attn(x[:, :3], decode=True)] + [attn(x[:, t : t + 1], decode=True) for t in (3, 4)]
        >>> bool(jax.numpy.allclose(jax.numpy.concatenate(steps, axis=1), full, atol=1e-5))
        True
    """

    def __init__(
        self,
        rngs: nnx.Rngs,
        *,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        attention_fn: Callable | AttentionType | str | None = None,
        score_mod: Any = None,
        dropout_rate: float = 0.0,
        broadcast_dropout: bool = False,
        deterministic: bool = False,
        use_bias: bool = True,
        decode: bool = False,
        rope: RoPE | bool | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Callable = default_kernel_init,
        out_kernel_init: Callable | None = None,
        bias_init: Callable = _zeros_init,
        out_bias_init: Callable | None = None,
        keep_rngs: bool = True,
    ):
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        in_kv_features = in_features if in_kv_features is None else in_kv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_mha_config(
            num_heads=num_heads, num_kv_heads=num_kv_heads, in_features=in_features, in_kv_features=in_kv_features,
            qkv_features=qkv_features, out_features=out_features, dropout_rate=dropout_rate,
            broadcast_dropout=broadcast_dropout,
        )  # fmt: skip
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.in_features = in_features
        self.in_kv_features = in_kv_features
        self.qkv_features = qkv_features
        self.out_features = out_features
        self.head_dim = qkv_features // num_heads
        self.attention_fn = resolve_attention_fn(attention_fn)
        self.rope = check_rope(rope, self.head_dim)
        # As a mod pytree (plain callables wrapped as static metadata): its arrays (slopes, ids) are state.
        self.score_mod = nnx.data(_compose(score_mod))
        self.dropout_rate = float(dropout_rate)
        self.broadcast_dropout = broadcast_dropout
        self.deterministic = deterministic
        self.use_bias = use_bias
        self.decode = decode
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

        linear = functools.partial(
            nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
            bias_init=bias_init, use_bias=use_bias, precision=precision, rngs=rngs,
        )  # fmt: skip
        self.query = linear(in_features, (num_heads, self.head_dim))
        self.key = linear(in_kv_features, (num_kv_heads, self.head_dim))
        self.value = linear(in_kv_features, (num_kv_heads, self.head_dim))
        self.out = nnx.LinearGeneral(
            (num_heads, self.head_dim), out_features, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
            kernel_init=out_kernel_init or kernel_init, bias_init=out_bias_init or bias_init, use_bias=use_bias,
            precision=precision, rngs=rngs,
        )  # fmt: skip
        self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)
        self.cache = nnx.data(None)

    def init_cache(
        self, batch_size: int, max_length: int, dtype: Any = None, *, page_size: int | None = None,
        num_pages: int | None = None,
    ) -> None:  # fmt: skip
        """Creates an empty KV cache for decode mode (replacing any previous one).

        Args:
            batch_size: rows decoded together.
            max_length: capacity in tokens (prompt plus generated ones).
            dtype: storage dtype; default the module's ``dtype``, else its
                ``param_dtype``.
            page_size: None for a contiguous cache
                (:class:`attnax.nn.ContiguousKVCache`); an int for a paged one
                (:class:`attnax.nn.PagedDecodeCache`: pages of this many
                tokens, per-row lengths, attention by
                :func:`attnax.kernels.paged_attention` instead of
                ``attention_fn``: the Pallas kernel where it can serve the
                cache, else the XLA path).
            num_pages: pages in a paged cache's pool; default enough for
                every row to reach ``max_length``.

        Example:
            >>> from flax import nnx
            >>> import attnax
            >>> attn = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, decode=True)
            >>> attn.init_cache(3, 16)
            >>> attn.cache.key.shape  # [batch, max_length, num_kv_heads, head_dim]
            (3, 16, 2, 4)
        """
        check_init_cache(batch_size, max_length)
        if dtype is None:  # not `or`: a NumPy dtype object is falsy
            dtype = self.param_dtype if self.dtype is None else self.dtype
        if page_size is None:
            self.cache = ContiguousKVCache(batch_size, max_length, self.num_kv_heads, self.head_dim, dtype)
        else:
            self.cache = PagedDecodeCache(batch_size, max_length, self.num_kv_heads, self.head_dim, dtype,
                                          page_size=page_size, num_pages=num_pages)  # fmt: skip

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        score_mod: Any = None,
        mask: jax.Array | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
        decode: bool | None = None,
    ) -> jax.Array:
        """Attends from ``inputs_q`` to ``inputs_kv`` (default: ``inputs_q``).

        Args:
            inputs_q: ``[B, T, in_features]``.
            inputs_kv: ``[B, S, in_kv_features]``, or None for
                self-attention (required in decode mode).
            score_mod: a score mod for this call, composed after the
                constructor's.
            mask: boolean, broadcastable to ``[B, H, T, S]`` (``S`` is the
                cache's ``max_length`` in decode mode); True = attend.
            deterministic: disables dropout; default the module's setting.
            rngs: dropout randomness for this call: an ``nnx.Rngs`` (its
                ``dropout`` stream), a stream, or a PRNG key; default the
                stream kept at construction.
            decode: decode mode for this call; default the module's setting.

        Returns:
            ``[B, T, out_features]``.

        Raises:
            ValueError: wrong feature sizes or ranks; decode mode without a
                cache, with ``inputs_kv``, or overflowing the cache.
        """
        decode = self.decode if decode is None else decode
        check_mha_inputs(inputs_q, inputs_kv, in_features=self.in_features, in_kv_features=self.in_kv_features)
        if decode:
            check_decode_call(self.cache, inputs_kv)
        x_kv = inputs_q if inputs_kv is None else inputs_kv
        query, key, value = self.query(inputs_q), self.key(x_kv), self.value(x_kv)  # BTNH
        T, S = query.shape[1], key.shape[1]

        kwargs: dict[str, Any] = {}
        view = None
        attention_fn = self.attention_fn
        if decode:
            start = self.cache.position
            steps = jnp.arange(T, dtype=jnp.int32)
            positions = start[:, None] + steps[None, :] if jnp.ndim(start) else start + steps  # per-row caches: [B, T]
            if self.rope is not None:
                query, key = self.rope(query, positions), self.rope(key, positions)
            view = self.cache.append(key, value)
            if view.attention is not None:  # the cache attends itself (paged): keys and values stay in it
                attention_fn = _self_attending(view.attention)
            else:
                key, value = view.key.astype(query.dtype), view.value.astype(query.dtype)
                kwargs.update(q_offset=view.q_offset, mask_mod=view.mask_mod)
        elif self.rope is not None:
            query = self.rope(query, jnp.arange(T, dtype=jnp.int32))
            key = self.rope(key, jnp.arange(S, dtype=jnp.int32))

        mod = _compose(self.score_mod, score_mod)
        if mod is not None:
            kwargs["score_mod"] = mod
        if mask is not None:
            kwargs["mask"] = mask
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.dropout_rate > 0.0 and not deterministic:
            kwargs.update(dropout_rate=self.dropout_rate, dropout_rng=self._dropout_rng(rngs), deterministic=False)

        out = self.out(attend_btnh(attention_fn, query, key, value, **kwargs))
        if view is not None:
            # Under jit an overflow cannot raise: make it impossible to miss instead.
            out = jnp.where(view.valid, out, jnp.asarray(jnp.nan, out.dtype))
        return out

    def _dropout_rng(self, rngs):
        rngs = self.rngs if rngs is None else rngs
        check_dropout_rngs(rngs)
        if isinstance(rngs, nnx.Rngs):
            rngs = rngs.dropout
        return rngs if isinstance(rngs, jax.Array) else rngs()
