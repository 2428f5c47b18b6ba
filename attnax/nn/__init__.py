"""Flax NNX layers over attnax kernels.

:class:`MultiHeadAttention` is multi-head attention whose core is any attnax
kernel (score mods, GQA, RoPE, a decode-mode KV cache);
:func:`as_flax_attention_fn` plugs any attnax kernel into Flax's own
:class:`flax.nnx.MultiHeadAttention`.
"""

from attnax.nn._attention import MultiHeadAttention
from attnax.nn._cache import CacheView, ContiguousKVCache, DecodeCache
from attnax.nn._flax_adapter import as_flax_attention_fn
from attnax.nn._paged_cache import PagedDecodeCache
from attnax.nn._rope import RoPE, apply_rope
from attnax.nn._types import AttentionType

__all__ = [
    "AttentionType",
    "CacheView",
    "ContiguousKVCache",
    "DecodeCache",
    "MultiHeadAttention",
    "PagedDecodeCache",
    "RoPE",
    "apply_rope",
    "as_flax_attention_fn",
]
