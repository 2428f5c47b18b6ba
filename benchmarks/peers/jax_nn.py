"""Peers ``cudnn`` and ``xla``: ``jax.nn.dot_product_attention(implementation=...)``.

Layout BTNH (``[B, T, H, D]``). Causal and sliding windows are native
(``is_causal``, ``local_window_size``); for ``xla`` only, ALiBi is a dense
bias and documents a dense mask (cases up to S = 8192). Decode: one query
token against ``[B, S, Hk, D]`` (GQA native); the paged cases (``xla`` only)
gather the pages into a contiguous cache inside the timed function, as a
naive paged implementation would.
"""

from __future__ import annotations

import sys

from benchmarks._cases import Case, alibi_slopes, document_ids
from benchmarks.peers._jax_harness import Built, JaxPeer
from benchmarks.peers._protocol import main

__all__ = ["JaxNnPeer", "make_peer"]


class JaxNnPeer(JaxPeer):
    def setup(self):
        if self.variant not in ("cudnn", "xla"):
            raise ValueError(f"variant must be 'cudnn' or 'xla'; got {self.variant!r}")

    def build(self, case: Case, inputs: dict) -> Built:
        jax, jnp = self.jax, self.jnp
        impl = self.variant
        bthd = lambda x: x.transpose(0, 2, 1, 3)
        back = lambda o: o.transpose(0, 2, 1, 3)
        q, k, v = (bthd(inputs[n]) for n in ("q", "k", "v"))
        kw = {"implementation": impl, "is_causal": bool(case.causal)}
        if case.window is not None:
            kw["local_window_size"] = tuple(case.window)

        if case.is_decode:
            if case.page is None:
                fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)
                return Built(fn, (q, k, v), back, note=f"jax.nn {impl}, q_len 1")
            if impl != "xla":
                raise NotImplementedError("paged KV cache")
            table = jnp.asarray(inputs["table"])
            kp = self.pages(inputs["k"], case, inputs["table"])
            vp = self.pages(inputs["v"], case, inputs["table"])

            def paged(q, kp, vp, table):
                B = table.shape[0]
                kc = kp[table].reshape(B, -1, *kp.shape[2:])
                vc = vp[table].reshape(B, -1, *vp.shape[2:])
                return jax.nn.dot_product_attention(q, kc, vc, implementation="xla")

            return Built(paged, (q, kp, vp, table), back, note="xla: gather pages, then dense attention")

        extra = []
        if case.alibi:
            if impl != "xla":
                raise NotImplementedError("ALiBi only as a dense bias")
            slopes = jnp.asarray(alibi_slopes(case.H))
            extra.append(("bias", slopes))
        if case.docs:
            if impl != "xla":
                raise NotImplementedError("documents only as a dense mask")
            extra.append(("docs", jnp.asarray(document_ids(case))))
        if case.softcap:
            raise NotImplementedError("jax.nn.dot_product_attention has no logits soft cap")
        names = [n for n, _ in extra]

        def fn(q, k, v, *ex):
            opts = dict(kw)
            T, S = q.shape[1], k.shape[1]
            qi = jnp.arange(T)[:, None] + case.q_offset
            ki = jnp.arange(S)[None, :]
            for n, a in zip(names, ex):
                if n == "bias":
                    opts["bias"] = (-a[:, None, None] * jnp.abs(qi - ki)[None].astype(jnp.float32))[None]
                else:
                    opts["mask"] = (a[qi] == a[ki])[None, None]
            return jax.nn.dot_product_attention(q, k, v, **opts)

        note = f"jax.nn {impl}" + (f" (+ dense {', '.join(names)})" if names else "")
        return Built(fn, (q, k, v, *[a for _, a in extra]), back, note=note)


def make_peer(variant, **kw):
    return JaxNnPeer(variant, **kw)


if __name__ == "__main__":
    sys.exit(main(make_peer))
