"""Peers ``tokamax_mosaic`` and ``tokamax_triton``: ``tokamax.dot_product_attention``.

tokamax (Python 3.12, jax >= 0.11.1) is installed only on the GPU machine,
from wheels (``benchmarks/gpu_check.sh``); elsewhere it is ``unavailable``.
Layout BTNH; ``is_causal``, ``local_window_size`` and ``logits_soft_cap``
are native; ALiBi and documents would need dense arrays (n/a). Configs come
from tokamax's heuristics (its default: no autotuning).
"""

from __future__ import annotations

import sys

from benchmarks._cases import Case
from benchmarks.peers._jax_harness import Built, JaxPeer
from benchmarks.peers._protocol import main

__all__ = ["TokamaxPeer", "make_peer"]


class TokamaxPeer(JaxPeer):
    def setup(self):
        import tokamax

        if self.variant not in ("mosaic", "triton"):
            raise ValueError(f"variant must be 'mosaic' or 'triton'; got {self.variant!r}")
        self.tokamax = tokamax

    def extra_info(self) -> dict:
        return {"tokamax": getattr(self.tokamax, "__version__", "?")}

    def build(self, case: Case, inputs: dict) -> Built:
        if case.is_decode:
            raise NotImplementedError("decode not benchmarked for tokamax")
        if case.alibi or case.docs:
            raise NotImplementedError("ALiBi / documents only as dense arrays")
        dpa = self.tokamax.dot_product_attention
        kw = {"implementation": self.variant, "is_causal": bool(case.causal)}
        if case.window is not None:
            kw["local_window_size"] = tuple(case.window)
        if case.softcap:
            kw["logits_soft_cap"] = float(case.softcap)
        bthd = lambda x: x.transpose(0, 2, 1, 3)
        q, k, v = (bthd(inputs[n]) for n in ("q", "k", "v"))
        fn = lambda q, k, v: dpa(q, k, v, **kw)
        return Built(fn, (q, k, v), lambda o: o.transpose(0, 2, 1, 3), note=f"tokamax {self.variant}")


def make_peer(variant, **kw):
    return TokamaxPeer(variant, **kw)


if __name__ == "__main__":
    sys.exit(main(make_peer))
