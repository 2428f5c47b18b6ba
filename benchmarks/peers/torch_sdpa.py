"""Peers ``torch_sdpa_flash`` and ``torch_sdpa_cudnn``: ``scaled_dot_product_attention``.

One backend forced with ``torch.nn.attention.sdpa_kernel`` (FlashAttention-2
or cuDNN); ``is_causal`` only (other masks would be dense). Decode: one
query token against the contiguous cache, GQA through ``enable_gqa``.
"""

from __future__ import annotations

import sys

from benchmarks._cases import Case
from benchmarks.peers._protocol import main
from benchmarks.peers._torch_harness import TorchBuilt, TorchPeer

__all__ = ["SdpaPeer", "make_peer"]


class SdpaPeer(TorchPeer):
    def setup(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
        if self.variant not in backends:
            raise ValueError(f"variant must be one of {sorted(backends)}; got {self.variant!r}")
        self.backend = backends[self.variant]
        self.sdpa_kernel = sdpa_kernel

    def build(self, case: Case, inputs: dict) -> TorchBuilt:
        F = self.torch.nn.functional
        if case.window is not None or case.docs or case.alibi or case.softcap:
            raise NotImplementedError("SDPA takes only is_causal or a dense mask")
        if case.is_decode and case.page is not None:
            raise NotImplementedError("no paged KV cache")
        if case.causal and case.T != case.S:
            raise NotImplementedError("SDPA's is_causal is top-left aligned")
        causal = bool(case.causal)
        gqa = case.H != case.Hk
        backend, ctx = self.backend, self.sdpa_kernel

        def fn(q, k, v):
            with ctx(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        return TorchBuilt(fn, f"SDPA {self.variant}" + (", enable_gqa" if gqa else ""))


def make_peer(variant, **kw):
    return SdpaPeer(variant, **kw)


if __name__ == "__main__":
    sys.exit(main(make_peer))
