"""Prebuilt score and mask mods, and the helpers that combine them.

Every mod here is a pytree (a frozen registered dataclass): its arrays are
leaves, so new values never retrace a jitted function and gradients reach
learnable ones. Mask-type mods (causal, windows, prefix-LM, documents) carry
their mask, which kernels use to skip fully hidden blocks.
"""

from attnax.score_mods._base import (
    AttentionMod,
    and_masks,
    compose_score_mods,
    mask_mod_to_boolean_mask,
    mask_mod_to_score_mod,
    or_masks,
    split_score_mod,
)
from attnax.score_mods._prebuilt import (
    additive_bias_mod,
    alibi_mod,
    alibi_slopes,
    causal_mod,
    document_mask_mod,
    prefix_lm_mod,
    sliding_window_mod,
    softcap_mod,
)

__all__ = [
    "AttentionMod",
    "additive_bias_mod",
    "alibi_mod",
    "alibi_slopes",
    "and_masks",
    "causal_mod",
    "compose_score_mods",
    "document_mask_mod",
    "mask_mod_to_boolean_mask",
    "mask_mod_to_score_mod",
    "or_masks",
    "prefix_lm_mod",
    "sliding_window_mod",
    "softcap_mod",
    "split_score_mod",
]
