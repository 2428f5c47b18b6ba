"""``as_flax_attention_fn``: any attnax kernel as Flax's ``attention_fn``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax.nnx.nn import dtypes

from attnax._validation import check_flax_attention_call
from attnax.nn._layout import attend_btnh
from attnax.nn._types import AttentionType, resolve_attention_fn
from attnax.score_mods import additive_bias_mod, causal_mod, compose_score_mods

__all__ = ["as_flax_attention_fn"]


def _flatten_batch(x, batch_shape, flat: int):
    """``[*batch_shape?, *tail]`` (left-padded with 1s, broadcast) -> ``[flat, *tail]``, keeping the last 3 axes."""
    tail = x.shape[-3:] if x.ndim >= 3 else (1,) * (3 - x.ndim) + x.shape
    lead = x.shape[:-3] if x.ndim > 3 else ()
    lead = (1,) * (len(batch_shape) - len(lead)) + lead
    x = x.reshape(lead + tail)
    if all(n == 1 for n in lead):
        return x.reshape((1,) + tail)
    return jnp.broadcast_to(x, tuple(batch_shape) + tail).reshape((flat,) + tail)


def as_flax_attention_fn(kernel: Callable | AttentionType | str | None = None, *, score_mod: Any = None) -> Callable:
    """Adapts an attnax kernel to Flax's ``attention_fn`` contract.

    The result can be given to :class:`flax.nnx.MultiHeadAttention`
    (``attention_fn=``) or called like :func:`flax.nnx.dot_product_attention`.
    Flax's layout is BTNH, ``[batch..., length, heads, head_dim]``; attnax
    kernels take BHSD: the adapter transposes at the boundary.

    Flax calls ``attention_fn(query, key, value, **keywords)``. The keyword
    contract, and what the adapter does with each:

    =====================  =========================================================
    keyword                meaning here
    =====================  =========================================================
    ``bias``               float, broadcastable to ``[batch..., H, T, S]``: added to
                           the scaled scores (an :func:`~attnax.score_mods.additive_bias_mod`).
    ``mask``               broadcastable to ``[batch..., H, T, S]``, any dtype;
                           nonzero/True = attend (Flax passes float masks in decode mode).
    ``broadcast_dropout``  must be False when dropout is active (attnax draws one mask
                           per batch row and head); ``NotImplementedError`` otherwise.
    ``dropout_rng``        key for dropout.
    ``dropout_rate``       dropout on the normalised weights.
    ``deterministic``      True disables dropout.
    ``dtype``              computation dtype: ``query``/``key``/``value`` are promoted
                           to it with ``promote_dtype``.
    ``precision``          ignored: attnax kernels run the matmuls in the input dtype
                           with float32 accumulation.
    ``module``             must be None (``sow_weights=False``): attnax kernels never
                           form the weight matrix; ``NotImplementedError`` otherwise.
    ``promote_dtype``      the dtype promotion function (Flax's by default).
    ``is_causal``          adds :func:`~attnax.score_mods.causal_mod` (top-left aligned,
                           as Flax does).
    =====================  =========================================================

    Query and key/value heads may differ (GQA: ``H % Hk == 0``). Extra batch
    dimensions are flattened; unbatched ``[T, N, D]`` inputs work too. A row
    with no visible key gives 0 (Flax gives the mean of the values there).
    Dropout masks are attnax's (a hash of the key and position), not Flax's
    ``bernoulli`` draws, so outputs with dropout differ from Flax's own.

    Args:
        kernel: an :class:`attnax.typing.AttentionFn` (a ``functools.partial``
            with kernel options included), an :class:`attnax.AttentionType`,
            its name, or None for :func:`attnax.flash_attention`.
        score_mod: a score mod applied on every call (composed before the
            causal mask and ``bias``). Give mods here rather than in a
            ``partial``: the adapter passes its own ``score_mod``.

    Returns:
        ``attention_fn(query, key, value, bias=None, mask=None, ...)``
        returning ``[batch..., T, H, Dv]``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import attnax
        >>> fn = attnax.as_flax_attention_fn(attnax.standard_attention)
        >>> mha = nnx.MultiHeadAttention(2, 8, attention_fn=fn, decode=False, rngs=nnx.Rngs(0))
        >>> ref = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(1), (1, 5, 8))
        >>> bool(jnp.allclose(mha(x, is_causal=True), ref(x, is_causal=True), atol=1e-5))
        True
    """
    fn = resolve_attention_fn(kernel)

    def attention_fn(
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout: bool = True,
        dropout_rng=None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype=None,
        precision=None,
        module=None,
        promote_dtype=dtypes.promote_dtype,
        is_causal: bool = False,
    ):
        del precision  # see the contract: kernels choose their own matmul precision
        query, key, value = promote_dtype((query, key, value), dtype=dtype)
        dropout_active = (not deterministic) and dropout_rate > 0.0
        check_flax_attention_call(dropout_active=dropout_active, broadcast_dropout=broadcast_dropout, module=module)
        batch_shape = query.shape[:-3]
        flat = math.prod(batch_shape)
        q, k, v = (x.reshape((flat,) + x.shape[-3:]) for x in (query, key, value))

        mods = [score_mod, causal_mod() if is_causal else None]
        if bias is not None:
            mods.append(additive_bias_mod(_flatten_batch(jnp.asarray(bias), batch_shape, flat)))
        mods = [m for m in mods if m is not None]
        kwargs: dict[str, Any] = {}
        if mods:
            kwargs["score_mod"] = compose_score_mods(*mods)
        if mask is not None:
            kwargs["mask"] = _flatten_batch(jnp.asarray(mask).astype(bool), batch_shape, flat)
        if dropout_active:
            kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=False)
        out = attend_btnh(fn, q, k, v, **kwargs)
        return out.reshape(batch_shape + out.shape[1:])

    name = getattr(fn, "__name__", type(fn).__name__)
    attention_fn.__name__ = f"flax_{name}"
    attention_fn.__qualname__ = attention_fn.__name__
    attention_fn.__doc__ = f"Flax ``attention_fn`` over ``{name}`` (see attnax.as_flax_attention_fn)."
    attention_fn.__wrapped__ = fn
    return attention_fn
