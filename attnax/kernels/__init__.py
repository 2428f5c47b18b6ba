"""Every attnax kernel, and (for convenience) the prebuilt mods and helpers."""

from attnax.kernels import score_mods
from attnax.kernels._cudnn import cudnn_attention
from attnax.kernels._dispatch import flash_attention
from attnax.kernels._memory_efficient import MemoryEfficientConfig, memory_efficient_attention
from attnax.kernels._paged import PagedAttentionConfig, paged_attention
from attnax.kernels._pallas import PallasFlashConfig, pallas_flash_attention
from attnax.kernels._pallas_autotune import autotune_pallas_config
from attnax.kernels._ring import ring_attention, ring_attention_reference
from attnax.kernels._ring_layout import ring_block_counts, zigzag_permutation, zigzag_shard, zigzag_unshard
from attnax.kernels._standard import standard_attention
from attnax.score_mods import (
    additive_bias_mod,
    alibi_mod,
    alibi_slopes,
    and_masks,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    mask_mod_to_boolean_mask,
    mask_mod_to_score_mod,
    or_masks,
    prefix_lm_mod,
    sliding_window_mod,
    softcap_mod,
)

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
