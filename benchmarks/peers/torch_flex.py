"""Peer ``torch_flex``: PyTorch FlexAttention, compiled (``torch.compile``).

The mask becomes a ``mask_mod`` and a ``BlockMask`` (built once per case,
outside the timed call); ALiBi and softcap are ``score_mod`` functions.
ALiBi here is the causal form ``slope[h] * (kv - q)``, equal to attnax's
``-slope[h] * |q - kv|`` wherever keys are visible.
"""

from __future__ import annotations

import sys

from benchmarks._cases import Case, alibi_slopes, document_ids
from benchmarks.peers._protocol import main
from benchmarks.peers._torch_harness import TorchBuilt, TorchPeer

__all__ = ["FlexPeer", "make_peer"]


class FlexPeer(TorchPeer):
    def setup(self):
        import torch
        from torch.nn.attention import flex_attention as fa

        # Every case is a new mask/score function, hence a recompile: raise the limits.
        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 512)
        self.fa = fa
        self.flex = torch.compile(fa.flex_attention, dynamic=False)

    def build(self, case: Case, inputs: dict) -> TorchBuilt:
        torch, fa = self.torch, self.fa
        if case.is_decode:
            raise NotImplementedError("decode not benchmarked for FlexAttention")
        off = case.q_offset
        masks = []
        if case.causal:
            masks.append(lambda b, h, q, kv: q + off >= kv)
        if case.window is not None:
            left, right = case.window
            if left >= 0:
                masks.append(lambda b, h, q, kv: q + off - kv <= left)
            if right >= 0:
                masks.append(lambda b, h, q, kv: kv - (q + off) <= right)
        if case.docs:
            ids = torch.as_tensor(document_ids(case), device=self.device)
            masks.append(lambda b, h, q, kv: ids[q + off] == ids[kv])
        block_mask = None
        if masks:
            mask_mod = masks[0] if len(masks) == 1 else fa.and_masks(*masks)
            block_mask = fa.create_block_mask(mask_mod, None, None, case.T, case.S, device=self.device)

        score_mod = None
        if case.alibi or case.softcap:
            slopes = torch.as_tensor(alibi_slopes(case.H), device=self.device) if case.alibi else None
            cap = float(case.softcap) if case.softcap else None

            def score_mod(score, b, h, q, kv):
                if slopes is not None:
                    score = score + slopes[h] * (kv - (q + off))
                if cap is not None:
                    score = cap * torch.tanh(score / cap)
                return score

        flex = self.flex
        gqa = case.H != case.Hk
        fn = lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
        note = "flex_attention compiled" + (", block mask" if block_mask is not None else "")
        return TorchBuilt(fn, note)


def make_peer(variant, **kw):
    return FlexPeer(variant, **kw)


if __name__ == "__main__":
    sys.exit(main(make_peer))
