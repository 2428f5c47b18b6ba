"""What is counted and how it is timed.

Counting (numpy only):

- forward FLOPs ``4·B·H·T·S·D`` times the visible fraction of ``(q, k)``
  pairs: exactly ½ for plain causal (the convention of ANCHORS.md, FlashAttention
  and FlexAttention), the exact fraction (:func:`benchmarks._cases.visible_fraction`)
  for windows and documents;
- forward+backward: 3.5 × forward (2.5 matmuls in the backward per forward matmul);
- decode: bytes of K and V read (``2·B·Hk·S·D·itemsize``), reported as TB/s.

Timing: compile and warm up (at least ``warmup`` calls and ``warmup_s``
seconds, so that the GPU clocks have ramped up), then the median of ``runs``
timed runs. A run of a fast kernel (under ``min_run_s``) repeats the call back
to back and divides, so that host dispatch does not count; JAX runs end in
``jax.block_until_ready``, PyTorch runs are timed by CUDA events. A JAX run is
wall-clock time and pays the host round trip of its first dispatch and its
final sync once; with 2 ms runs that added 12-17% to sub-millisecond attnax
calls and 1-5% to cuDNN's, against the same calls timed in 20-call runs
(H100, session 10), while CUDA events leave it out of the PyTorch peers: runs
of at least 10 ms keep it under 1%.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

from benchmarks._cases import Case, visible_fraction

__all__ = ["TimingConfig", "count", "median_ms", "time_jax", "time_torch"]


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """Warm-up and repetition settings.

    Attributes:
        warmup: untimed calls after the compiling one (at least).
        warmup_s: warm-up calls go on until this many seconds have passed.
        runs: timed runs; the median is reported.
        min_run_s: a run shorter than this repeats the call ``n_inner`` times.
        max_inner: cap on ``n_inner``.
        max_case_s: cap on the time spent in timed runs of one measurement
            (fewer runs, at least 3, for very slow calls).
    """

    warmup: int = 3
    warmup_s: float = 0.2
    runs: int = 20
    min_run_s: float = 10e-3
    max_inner: int = 256
    max_case_s: float = 15.0

    @classmethod
    def smoke(cls) -> TimingConfig:
        return cls(warmup=1, warmup_s=0.0, runs=3, min_run_s=0.0, max_inner=1, max_case_s=2.0)


def attention_flops(case: Case) -> float:
    """Forward FLOPs of one call (see the module docstring for the masks)."""
    full = 4.0 * case.B * case.H * case.T * case.S * case.D
    plain_causal = case.causal and case.window is None and not case.docs and case.T == case.S and not case.q_offset
    return full * (0.5 if plain_causal else visible_fraction(case))


def kv_bytes(case: Case, itemsize: int = 2) -> float:
    """Bytes of K and V a decode step reads (contiguous or paged alike)."""
    return 2.0 * case.B * case.Hk * case.S * case.D * itemsize


def count(case: Case, mode: str) -> dict:
    """``{'flops': ..., 'bytes': ...}`` of one call in ``mode`` (``'fwd'`` / ``'fwd+bwd'``)."""
    f = attention_flops(case)
    if mode == "fwd+bwd":
        f *= 3.5
    elif mode != "fwd":
        raise ValueError(f"unknown mode {mode!r}")
    return {"flops": f, "bytes": kv_bytes(case) if case.is_decode else None}


def _plan(t_call: float, cfg: TimingConfig) -> tuple[int, int]:
    """``(n_inner, runs)`` for a call taking ``t_call`` seconds."""
    n_inner = 1
    if cfg.min_run_s > 0 and t_call < cfg.min_run_s:
        n_inner = min(cfg.max_inner, max(1, math.ceil(cfg.min_run_s / max(t_call, 1e-6))))
    runs = cfg.runs
    if t_call * n_inner * runs > cfg.max_case_s:
        runs = max(3, int(cfg.max_case_s / max(t_call * n_inner, 1e-9)))
    return n_inner, runs


def _summary(times_s: list[float], n_inner: int, compile_s: float) -> dict:
    ms = [t * 1e3 for t in times_s]
    return {
        "ms": statistics.median(ms),
        "ms_min": min(ms),
        "ms_max": max(ms),
        "runs": len(ms),
        "n_inner": n_inner,
        "compile_s": compile_s,
    }


def time_jax(fn, args, cfg: TimingConfig) -> dict:
    """Time a jitted JAX function of ``args`` (the first call compiles)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0

    def call():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    n_inner, runs = _plan(_warm_up(call, cfg), cfg)
    times = [_jax_run_s(fn, args, n_inner) for _ in range(runs)]
    return _summary(times, n_inner, compile_s)


def _warm_up(call, cfg: TimingConfig) -> float:
    """Calls ``call()`` (seconds per call) ``cfg.warmup`` times and for ``cfg.warmup_s``; the median."""
    warm = []
    t_start = time.perf_counter()
    while len(warm) < max(cfg.warmup, 1) or time.perf_counter() - t_start < cfg.warmup_s:
        warm.append(call())
    return statistics.median(warm)


def _jax_run_s(fn, args, n: int) -> float:
    """Seconds per call of ``n`` back-to-back calls of ``fn(*args)``, ending in one sync."""
    import jax

    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def time_torch(fn, cfg: TimingConfig) -> dict:
    """Time a CUDA PyTorch callable with CUDA events (the first call compiles)."""
    import torch

    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    def call():
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    n_inner, runs = _plan(_warm_up(call, cfg), cfg)
    times = []
    for _ in range(runs):
        start.record()
        for _ in range(n_inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n_inner)
    return _summary(times, n_inner, compile_s)


def median_ms(fn, args, n: int = 20, reps: int = 5) -> float:
    """Milliseconds per call of a jitted JAX ``fn(*args)``: the median of ``reps`` runs of ``n`` calls.

    For same-process A/B diagnostics (``benchmarks/gpu_*.py``): one compiling
    call, then back-to-back runs, each ending in one sync.
    """
    import jax

    jax.block_until_ready(fn(*args))
    return statistics.median(_jax_run_s(fn, args, n) for _ in range(reps)) * 1e3


def interleaved_ms(fns: dict, args, rounds: int = 3, n: int = 20, reps: int = 5) -> dict:
    """``{name: [ms of each round]}``: :func:`median_ms` of every ``fns[name]``, the variants interleaved.

    Each round times every variant once, in order, so drift of a shared GPU
    falls on all of them alike; callers take the median over the rounds.
    """
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_ms(fn, args, n, reps))
    return times
