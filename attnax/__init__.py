"""attnax: one attention protocol, every kernel, for JAX and Flax."""

from attnax import cache, kernels, score_mods
from attnax.block_mask import BlockMask, create_block_mask
from attnax.cache import KVCache, PagedKVCache
from attnax.kernels import (
    flash_attention,
    memory_efficient_attention,
    paged_attention,
    ring_attention,
    ring_attention_reference,
    standard_attention,
)
from attnax.nn import AttentionType, MultiHeadAttention, as_flax_attention_fn
from attnax.reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "AttentionType",
    "BlockMask",
    "KVCache",
    "MultiHeadAttention",
    "PagedKVCache",
    "as_flax_attention_fn",
    "attention_reference",
    "cache",
    "create_block_mask",
    "flash_attention",
    "kernels",
    "memory_efficient_attention",
    "paged_attention",
    "ring_attention",
    "ring_attention_reference",
    "score_mods",
    "standard_attention",
]
