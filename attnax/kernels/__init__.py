"""Every attnax kernel, and (for convenience) the prebuilt mods and helpers."""

from attnax.kernels import score_mods
from attnax.kernels._dispatch import flash_attention
from attnax.kernels._memory_efficient import MemoryEfficientConfig
from attnax.kernels._memory_efficient import memory_efficient_attention
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
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "and_masks",
    "causal_mod",
    "compose_score_mods",
    "document_mask_mod",
    "flash_attention",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "memory_efficient_attention",
    "or_masks",
    "prefix_lm_mod",
    "score_mods",
    "sliding_window_mod",
    "softcap_mod",
    "standard_attention",
]
