"""``flash_attention``: one entry point, the implementation chosen per platform."""

from __future__ import annotations

from attnax._validation import check_qkv
from attnax.kernels._cudnn import cudnn_attention, cudnn_unsupported_reason
from attnax.kernels._memory_efficient import memory_efficient_attention
from attnax.kernels._pallas import pallas_flash_attention, pallas_unsupported_reason
from attnax.kernels._standard import standard_attention

__all__ = ["IMPLEMENTATIONS", "flash_attention"]

#: Implementation names ``flash_attention`` accepts, and the kernel each names.
IMPLEMENTATIONS = {
    "xla": standard_attention,
    "memory_efficient": memory_efficient_attention,
    "pallas": pallas_flash_attention,
    "cudnn": cudnn_attention,
}

# Above this many score elements per (batch, head) the dense path's O(T S)
# memory dominates; the chunked kernel is chosen instead.
_DENSE_LIMIT = 2048 * 2048


def _auto(query, key, value, kwargs) -> str:
    # On an H100 (benchmarks/results/), cuDNN beats attnax's Pallas kernel on
    # the fixed masks it expresses (forward and especially backward); the
    # Pallas kernel serves every other mod and beats FlexAttention there.
    if cudnn_unsupported_reason(query, key, value, **kwargs) is None:
        return "cudnn"
    # Dense masks stay off the Pallas kernel here: it reads them as int32
    # tiles, unmeasured against the other paths.
    if kwargs.get("mask") is None and pallas_unsupported_reason(query, key, value, **kwargs) is None:
        return "pallas"
    T, S = query.shape[-2], key.shape[-2]
    return "xla" if T * S <= _DENSE_LIMIT else "memory_efficient"


def flash_attention(query, key, value, *, implementation=None, **kwargs):
    """Attention through the best available implementation.

    Args:
        query: ``[B, H, T, D]``.
        key: ``[B, Hk, S, D]``.
        value: ``[B, Hk, S, Dv]``.
        implementation: ``None`` (choose), ``'xla'`` (dense
            :func:`~attnax.kernels.standard_attention`),
            ``'memory_efficient'``
            (:func:`~attnax.kernels.memory_efficient_attention`),
            ``'pallas'`` (:func:`~attnax.kernels.pallas_flash_attention`) or
            ``'cudnn'`` (:func:`~attnax.kernels.cudnn_attention`). An
            explicit choice is honoured or raises, never replaced silently.
        **kwargs: the :class:`attnax.typing.AttentionFn` keywords, and the
            chosen kernel's options.

    With ``implementation=None`` the choice follows measurements on an H100
    (``benchmarks/results/``): on an NVIDIA GPU, cuDNN when it can express
    the masks (none, causal, sliding window; ``q_offset=0``; bf16/fp16), else
    the Pallas kernel when it can serve the arguments (bf16/fp16, no dense
    ``mask``); otherwise (CPU, float32, dense masks),
    inputs whose score matrix has at most 2048 x 2048 elements per head use
    the dense XLA kernel and longer ones the memory-efficient kernel
    (``O(T + S)`` memory).

    Raises:
        ValueError: an unknown implementation name.

    Example:
        >>> import jax
        >>> from attnax.kernels import flash_attention, causal_mod
        >>> q = k = v = jax.random.normal(jax.random.key(0), (2, 4, 64, 32))
        >>> flash_attention(q, k, v, score_mod=causal_mod(), implementation="memory_efficient").shape
        (2, 4, 64, 32)
    """
    if implementation is None:
        check_qkv(query, key, value)  # the choice reads shapes: validate them first
        implementation = _auto(query, key, value, kwargs)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`implementation` must be one of {sorted(IMPLEMENTATIONS)} or None; got {implementation!r}."
        )
    return IMPLEMENTATIONS[implementation](query, key, value, **kwargs)
