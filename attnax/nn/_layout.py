"""The one place where Flax's BTNH layout meets the kernels' BHSD layout.

Flax projects to ``[batch, length, heads, head_dim]`` (BTNH); attnax kernels
take ``[batch, heads, length, head_dim]`` (BHSD). Every attention call in
``attnax.nn`` goes through :func:`attend_btnh`, so when a kernel learns to
read BTNH natively (Pallas kernels do, through their BlockSpec index maps)
the transposes disappear here and nowhere else.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["attend_btnh"]


def _to_bhsd(x):
    return jnp.swapaxes(x, -3, -2)


def attend_btnh(kernel, query, key, value, **kwargs):
    """Calls a BHSD ``kernel`` on BTNH ``query``/``key``/``value``; returns BTNH.

    Args:
        kernel: an :class:`attnax.typing.AttentionFn`.
        query: ``[B, T, H, D]``.
        key: ``[B, S, Hk, D]``.
        value: ``[B, S, Hk, Dv]``.
        **kwargs: forwarded to ``kernel`` unchanged.

    Returns:
        ``[B, T, H, Dv]``.
    """
    out = kernel(_to_bhsd(query), _to_bhsd(key), _to_bhsd(value), **kwargs)
    return jnp.swapaxes(out, -3, -2)
