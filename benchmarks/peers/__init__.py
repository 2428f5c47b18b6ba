"""The peers: one module each, run as ``python -m benchmarks.peers.<module> --peer NAME``.

``PEERS`` maps a peer's name to its module, its framework and a variant the
module understands; its order is the order of the run (under a time budget,
the peers that matter most run first). Importing this package imports
neither JAX nor PyTorch.
"""

from __future__ import annotations

import dataclasses

__all__ = ["PEERS", "SMOKE_PEERS", "PeerSpec"]


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    """How to run one peer.

    Attributes:
        module: ``benchmarks.peers.<module>``.
        framework: ``'jax'`` or ``'torch'``.
        variant: passed to the module (backend or implementation name).
        label: what the reports call it.
    """

    module: str
    framework: str
    variant: str | None
    label: str


PEERS: dict[str, PeerSpec] = {
    "attnax": PeerSpec("attnax_kernels", "jax", None, "attnax (Pallas)"),
    "cudnn": PeerSpec("jax_nn", "jax", "cudnn", "cuDNN (jax.nn)"),
    "torch_flex": PeerSpec("torch_flex", "torch", None, "FlexAttention"),
    "tokamax_mosaic": PeerSpec("tokamax_attention", "jax", "mosaic", "tokamax Mosaic"),
    "torch_sdpa_cudnn": PeerSpec("torch_sdpa", "torch", "cudnn", "SDPA cuDNN"),
    "jax_pallas": PeerSpec("jax_pallas", "jax", None, "JAX Pallas (Triton)"),
    "torch_sdpa_flash": PeerSpec("torch_sdpa", "torch", "flash", "SDPA flash (FA2)"),
    "tokamax_triton": PeerSpec("tokamax_attention", "jax", "triton", "tokamax Triton"),
    "xla": PeerSpec("jax_nn", "jax", "xla", "XLA (jax.nn)"),
}

#: ``--smoke`` runs (CPU): attnax's XLA kernels and the pure-JAX peers.
SMOKE_PEERS = ("attnax", "xla")
