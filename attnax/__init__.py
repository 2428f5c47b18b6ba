"""attnax: one attention protocol, every kernel, for JAX and Flax."""

from attnax import cache
from attnax import kernels
from attnax import score_mods
from attnax.block_mask import BlockMask
from attnax.block_mask import create_block_mask
from attnax.cache import KVCache
from attnax.cache import PagedKVCache
from attnax.kernels import flash_attention
from attnax.kernels import memory_efficient_attention
from attnax.kernels import paged_attention
from attnax.kernels import ring_attention
from attnax.kernels import ring_attention_reference
from attnax.kernels import standard_attention
from attnax.nn import AttentionType
from attnax.nn import MultiHeadAttention
from attnax.nn import as_flax_attention_fn
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
