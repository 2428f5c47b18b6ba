"""cuDNN's fused attention through ``jax.nn.dot_product_attention``, for the mods it can express.

cuDNN takes fixed masks only: no mask (full), causal, and causal or two-sided
sliding windows, with the first query at position 0. Anything else raises
``NotImplementedError`` naming what cuDNN cannot serve; the dispatcher then
uses the Pallas kernel, which runs every mod.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnax._validation import check_attention_args, check_kernel_options
from attnax.score_mods._base import ComposedMod
from attnax.score_mods._prebuilt import CausalMod, SlidingWindowMod

__all__ = ["cudnn_attention", "cudnn_unsupported_reason"]


def _fixed_masks(score_mod):
    """``(is_causal, window)`` for mods cuDNN expresses, else None."""
    mods = () if score_mod is None else score_mod.mods if isinstance(score_mod, ComposedMod) else (score_mod,)
    causal, window = False, None
    for m in mods:
        if isinstance(m, CausalMod):
            causal = True
        elif isinstance(m, SlidingWindowMod) and window is None and m.left >= 0 and m.right >= 0:
            window = (m.left, m.right)
        else:
            return None
    if causal and window is not None:
        window = (window[0], 0)
    return causal, window


def cudnn_unsupported_reason(query, key, value, *, score_mod=None, mask_mod=None, mask=None, block_mask=None,
                             q_offset=0, dropout_rate=0.0, deterministic=True, return_lse=False, **_) -> str | None:
    """Why cuDNN cannot serve these arguments, or None when it can."""  # noqa: D401
    try:
        on_gpu = jax.default_backend() == "gpu"
    except RuntimeError:
        on_gpu = False
    if not on_gpu:
        return "cuDNN attention needs an NVIDIA GPU"
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention takes bfloat16/float16; got {query.dtype}"
    if query.shape[-1] != value.shape[-1] or query.shape[-1] > 128 or query.shape[-1] % 8:
        return "cuDNN attention here needs D == Dv, a multiple of 8 and at most 128"
    if mask_mod is not None or mask is not None or block_mask is not None:
        return "cuDNN takes fixed masks only (no mask_mod, dense mask or block_mask)"
    if _fixed_masks(score_mod) is None:
        return "cuDNN expresses only causal and sliding-window score mods"
    if not isinstance(q_offset, int) or q_offset != 0:
        return "cuDNN's masks assume the first query at position 0 (q_offset=0)"
    if dropout_rate and not deterministic:
        return "attnax's dropout (a counter-based hash) is not cuDNN's"
    if return_lse:
        return "jax.nn.dot_product_attention does not return the log-sum-exp"
    return None


def cudnn_attention(
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
    return_lse=False,
    **kernel_options,
):
    """Attention by cuDNN (``jax.nn.dot_product_attention(implementation='cudnn')``).

    Serves no mask, :func:`~attnax.score_mods.causal_mod` and
    :func:`~attnax.score_mods.sliding_window_mod` (alone or composed), with
    ``q_offset=0``, bfloat16/float16 inputs and ``D == Dv <= 128``. Inputs
    are BHSD like every attnax kernel (transposed for cuDNN, which takes BTNH).

    Raises:
        NotImplementedError: the arguments need something cuDNN cannot do; the
            message says what.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import cudnn_attention
        >>> q = jnp.ones((1, 2, 8, 16), jnp.bfloat16)
        >>> try:
        ...     cudnn_attention(q, q, q)
        ... except NotImplementedError as e:  # on a machine without a GPU
        ...     print(e)
        cudnn_attention cannot serve these arguments: cuDNN attention needs an NVIDIA GPU
    """
    check_kernel_options("cudnn_attention", kernel_options, ())
    args = check_attention_args(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask,
        scale=scale, q_offset=q_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        deterministic=deterministic,
    )  # fmt: skip
    why = cudnn_unsupported_reason(
        query, key, value, score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask,
        q_offset=q_offset, dropout_rate=dropout_rate, deterministic=deterministic, return_lse=return_lse,
    )  # fmt: skip
    if why is not None:
        raise NotImplementedError(f"cudnn_attention cannot serve these arguments: {why}")
    is_causal, window = _fixed_masks(score_mod)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
    out = jax.nn.dot_product_attention(
        q, k, v, scale=args.scale, is_causal=is_causal, local_window_size=window, implementation="cudnn"
    )
    return jnp.swapaxes(out, 1, 2)
