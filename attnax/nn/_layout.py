"""The one place where Flax's BTNH layout meets the kernels' BHSD layout.

Flax projects to ``[batch, length, heads, head_dim]`` (BTNH); attnax kernels
take ``[batch, heads, length, head_dim]`` (BHSD). Every attention call in
``attnax.nn`` goes through :func:`attend_btnh`: kernels that read BTNH
natively (:func:`~attnax.kernels.pallas_flash_attention` with
``layout='BSHD'``: strided TMA copies) get it as it is, the others get
transposed copies.
"""

from __future__ import annotations

import jax.numpy as jnp

from attnax.kernels._pallas import pallas_flash_attention

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
    if kernel is pallas_flash_attention:
        return kernel(query, key, value, layout="BSHD", **kwargs)
    out = kernel(_to_bhsd(query), _to_bhsd(key), _to_bhsd(value), **kwargs)
    return jnp.swapaxes(out, -3, -2)
