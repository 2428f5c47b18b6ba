"""Peer ``jax_pallas``: JAX's own Pallas GPU (Triton) ops, as shipped.

Attention: ``jax.experimental.pallas.ops.gpu.attention.mha`` (BSHD,
``causal``, packed documents through ``segment_ids``; default block sizes;
its own backward). Decode: ``decode_attention.gqa`` (contiguous,
``[B, S, Hk, D]``) and ``paged_attention.paged_attention`` (pages
``[Hk, P, page, D]``; it has no softmax scale argument, so the query is
scaled before the timed call). On CPU the kernels run in interpret mode.
"""

from __future__ import annotations

import math
import sys

from benchmarks._cases import Case, document_ids
from benchmarks.peers._jax_harness import Built, JaxPeer
from benchmarks.peers._protocol import main

__all__ = ["JaxPallasPeer", "make_peer"]


class JaxPallasPeer(JaxPeer):
    def setup(self):
        from jax.experimental.pallas.ops.gpu import attention, decode_attention

        self.attention = attention
        self.decode = decode_attention
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention
        except ImportError:  # noqa: PERF203
            paged_attention = None
        self.paged = paged_attention
        self.interpret = self.platform == "cpu"

    def build(self, case: Case, inputs: dict) -> Built:
        jnp = self.jnp
        scale = 1.0 / math.sqrt(case.D)
        interp = self.interpret
        bshd = lambda x: x.transpose(0, 2, 1, 3)
        if case.is_decode:
            q = inputs["q"][:, :, 0, :]  # [B, H, D]
            back = lambda o: o[:, :, None, :]
            if case.page is None:
                gqa = self.decode.gqa
                fn = lambda q, k, v: gqa(q, k, v, sm_scale=scale, interpret=interp)
                return Built(fn, (q, bshd(inputs["k"]), bshd(inputs["v"])), back, note="decode_attention.gqa")
            if self.paged is None:
                raise NotImplementedError("jax.experimental.pallas.ops.gpu.paged_attention is missing")
            # [P, page, Hk, D] -> [Hk, P, page, D]
            kp = self.pages(inputs["k"], case, inputs["table"]).transpose(2, 0, 1, 3)
            vp = self.pages(inputs["v"], case, inputs["table"]).transpose(2, 0, 1, 3)
            table = jnp.asarray(inputs["table"])
            lengths = jnp.full((case.B,), case.S, jnp.int32)
            qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
            pa = self.paged.paged_attention
            fn = lambda q, kp, vp, table, lengths: pa(q, kp, vp, table, lengths, interpret=interp)
            return Built(fn, (qs, kp, vp, table, lengths), back, note="paged_attention.paged_attention (q pre-scaled)")

        if case.window is not None or case.alibi or case.softcap:
            raise NotImplementedError("mha supports causal and segment_ids only")
        mha = self.attention.mha
        q, k, v = (bshd(inputs[n]) for n in ("q", "k", "v"))
        back = lambda o: o.transpose(0, 2, 1, 3)
        causal = bool(case.causal)
        if case.docs:
            seg = jnp.broadcast_to(jnp.asarray(document_ids(case)), (case.B, case.S))
            fn = lambda q, k, v, seg: mha(q, k, v, seg, sm_scale=scale, causal=causal, interpret=interp)
            return Built(fn, (q, k, v, seg), back, note="attention.mha + segment_ids")
        fn = lambda q, k, v: mha(q, k, v, None, sm_scale=scale, causal=causal, interpret=interp)
        return Built(fn, (q, k, v), back, note="attention.mha")


def make_peer(variant, **kw):
    return JaxPallasPeer(variant, **kw)


if __name__ == "__main__":
    sys.exit(main(make_peer))
