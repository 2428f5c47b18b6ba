"""Every attnax kernel, and (for convenience) the prebuilt mods and helpers."""

from attnax.kernels import score_mods
from attnax.kernels._cudnn import cudnn_attention
from attnax.kernels._dispatch import flash_attention
from attnax.kernels._memory_efficient import MemoryEfficientConfig
from attnax.kernels._memory_efficient import memory_efficient_attention
from attnax.kernels._paged import PagedAttentionConfig
from attnax.kernels._paged import paged_attention
from attnax.kernels._pallas import PallasFlashConfig
from attnax.kernels._pallas import pallas_flash_attention
from attnax.kernels._pallas_autotune import autotune_pallas_config
from attnax.kernels._ring import ring_attention
from attnax.kernels._ring import ring_attention_reference
from attnax.kernels._ring_layout import ring_block_counts
from attnax.kernels._ring_layout import zigzag_permutation
from attnax.kernels._ring_layout import zigzag_shard
from attnax.kernels._ring_layout import zigzag_unshard
from attnax.kernels._standard import standard_attention
from attnax.score_mods import additive_bias_mod
from attnax.score_mods import alibi_mod
from attnax.score_mods import alibi_slopes
from attnax.score_mods import and_masks
from attnax.score_mods import causal_mod
from attnax.score_mods import compose_score_mods
from attnax.score_mods import document_mask_mod
from attnax.score_mods import mask_mod_to_boolean_mask
from attnax.score_mods import mask_mod_to_score_mod
from attnax.score_mods import or_masks
from attnax.score_mods import prefix_lm_mod
from attnax.score_mods import sliding_window_mod
from attnax.score_mods import softcap_mod

__all__ = [
    "MemoryEfficientConfig",
    "PagedAttentionConfig",
    "PallasFlashConfig",
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "and_masks",
    "autotune_pallas_config",
    "causal_mod",
    "compose_score_mods",
    "cudnn_attention",
    "document_mask_mod",
    "flash_attention",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "memory_efficient_attention",
    "or_masks",
    "paged_attention",
    "pallas_flash_attention",
    "prefix_lm_mod",
    "ring_attention",
    "ring_attention_reference",
    "ring_block_counts",
    "score_mods",
    "sliding_window_mod",
    "softcap_mod",
    "standard_attention",
    "zigzag_permutation",
    "zigzag_shard",
    "zigzag_unshard",
]
