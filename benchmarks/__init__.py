"""attnax's peer-comparison benchmarks: ``python -m benchmarks --suite dense|mods|decode``.

Every peer (attnax, cuDNN, XLA, JAX's Pallas ops, tokamax, PyTorch
FlexAttention and SDPA) runs in its own subprocess, so JAX and PyTorch never
share a process and a crashing peer costs only its own results. The parent
process never imports JAX or PyTorch.

Modules:
    _cases: the benchmark cases (shapes, masks, which peers serve them) and a
        numpy reference for spot checks of the outputs.
    _timing: FLOP and byte counts; timing loops for JAX and PyTorch.
    _report: JSON, Markdown and PNG reports.
    _cli: the command line and the subprocess orchestration.
    peers: one module per peer, each runnable as
        ``python -m benchmarks.peers.<module>``.
"""
