"""Peer ``attnax``: the library under test.

Attention: ``attnax.kernels.pallas_flash_attention`` (BHSD), the mask and
mods as attnax score mods, passed to the jitted function as a pytree
argument. Forward+backward is ``jax.grad`` of ``sum(out * cotangent)``; a
kernel without a backward yet reports ``unsupported`` / ``error`` with the
message. Decode: ``attnax.kernels.paged_attention(implementation='pallas')``
when it exists (a contiguous cache is one page of ``S`` per sequence).
``--smoke`` and CPU runs use attnax's XLA kernels instead
(``flash_attention(implementation='memory_efficient')``,
``paged_attention(implementation='xla')``): the same mods, to test the
plumbing.
"""

from __future__ import annotations

import sys

from benchmarks._cases import Case, document_ids
from benchmarks.peers._jax_harness import Built, JaxPeer
from benchmarks.peers._protocol import Unavailable, main

__all__ = ["AttnaxPeer", "make_peer", "score_mod_for"]


def score_mod_for(case: Case):
    """The attnax score mod of a case's mask and mods (None: plain attention)."""
    import jax.numpy as jnp

    from attnax.kernels import (
        alibi_mod,
        causal_mod,
        compose_score_mods,
        document_mask_mod,
        sliding_window_mod,
        softcap_mod,
    )

    parts = []
    if case.window is not None:
        # A causal window (right = 0) already implies causality: one mask, not two.
        if case.causal and case.window[1] != 0:
            parts.append(causal_mod())
        parts.append(sliding_window_mod(tuple(case.window)))
    elif case.causal:
        parts.append(causal_mod())
    if case.docs:
        parts.append(document_mask_mod(jnp.asarray(document_ids(case))))
    if case.alibi:
        parts.append(alibi_mod(case.H))
    if case.softcap:
        parts.append(softcap_mod(float(case.softcap)))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else compose_score_mods(*parts)


class AttnaxPeer(JaxPeer):
    def setup(self):
        import attnax.kernels as K

        self.K = K
        if self.smoke or self.platform == "cpu":
            self.kernel_name = "flash_attention(implementation='memory_efficient')"
            self.attn = lambda q, k, v, **kw: K.flash_attention(q, k, v, implementation="memory_efficient", **kw)
        else:
            fn = getattr(K, "pallas_flash_attention", None)
            if fn is None:
                from attnax.kernels._pallas import pallas_flash_attention as fn
            self.kernel_name = "pallas_flash_attention"
            self.attn = fn
        self.paged = getattr(K, "paged_attention", None)
        # Explicit, so that a kernel that cannot serve a case raises instead of falling back.
        self.paged_impl = "xla" if (self.smoke or self.platform == "cpu") else "pallas"

    def extra_info(self) -> dict:
        import attnax

        return {
            "attnax": getattr(attnax, "__version__", "?"),
            "attnax_kernel": self.kernel_name,
            "attnax_paged_attention": self.paged_impl if self.paged is not None else None,
        }

    def supports(self, case: Case) -> None:
        if case.is_decode and self.paged is None:
            raise Unavailable("attnax.kernels.paged_attention is not importable (not written yet?)")

    def build(self, case: Case, inputs: dict) -> Built:
        jnp = self.jnp
        if case.is_decode:
            q = inputs["q"]
            if case.page is None:
                kp = inputs["k"].transpose(0, 2, 1, 3)  # [B, S, Hk, D]: one page per sequence
                vp = inputs["v"].transpose(0, 2, 1, 3)
                table = jnp.arange(case.B, dtype=jnp.int32)[:, None]
                note = "paged_attention, contiguous = one page of S per sequence"
            else:
                kp = self.pages(inputs["k"], case, inputs["table"])
                vp = self.pages(inputs["v"], case, inputs["table"])
                table = jnp.asarray(inputs["table"])
                note = f"paged_attention, page {case.page}"
            lengths = jnp.full((case.B,), case.S, jnp.int32)
            paged, impl = self.paged, self.paged_impl
            fn = lambda q, kp, vp, table, lengths: paged(q, kp, vp, table, lengths, implementation=impl)
            return Built(fn, (q, kp, vp, table, lengths), note=f"{note} ({impl})")

        mod = score_mod_for(case)
        attn = self.attn
        fn = lambda q, k, v, mod: attn(q, k, v, score_mod=mod)
        return Built(fn, (inputs["q"], inputs["k"], inputs["v"], mod), note=self.kernel_name)


def make_peer(variant, **kw):
    return AttnaxPeer(variant, **kw)


if __name__ == "__main__":
    sys.exit(main(make_peer))
