"""``python -m attnax.demo``: what ``make demo`` runs on this machine.

1. The platform: backend, devices, versions.
2. Correctness: every kernel in :data:`KERNELS` (plus any other kernel that
   :mod:`attnax.kernels` exports with the :class:`~attnax.typing.AttentionFn`
   keywords) against :func:`attnax.reference.attention_reference` on fresh
   random inputs, for each mod in :func:`check_mods`: output, log-sum-exp and
   the gradients of ``query``/``key``/``value`` under a random cotangent.
3. Speed: forward and forward+backward times of each distinct kernel at a few
   sizes (median of several runs after a warm-up).
4. A tiny transformer built on :class:`attnax.MultiHeadAttention`, trained for
   a few steps with optax; the loss must fall.

The exit status is 1 if any check fails. A kernel that cannot run here
(``NotImplementedError``: a GPU kernel on CPU, say) is reported as SKIP.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import inspect
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import attnax
from attnax import kernels
from attnax.kernels import _dispatch
from attnax.reference import attention_reference
from attnax.score_mods import (
    alibi_mod,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    sliding_window_mod,
    softcap_mod,
)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel the demo runs: an :class:`~attnax.typing.AttentionFn` and fixed options.

    Attributes:
        name: the row label.
        fn: the kernel.
        options: keyword arguments added to every call, or a function of no
            arguments returning them (for options that need the backend, such
            as a device mesh).
        timed: whether the timing table includes it (False for entries that
            run the same code as another entry).
        discovered: found by :func:`discovered_kernels`, not listed in
            :data:`KERNELS`: an error calling it (it may need options) is a
            SKIP, a wrong result still a FAIL.
    """

    name: str
    fn: Callable
    options: dict | Callable[[], dict] = dataclasses.field(default_factory=dict)
    timed: bool = True
    discovered: bool = False

    def bind(self) -> Callable:
        options = self.options() if callable(self.options) else self.options
        return functools.partial(self.fn, **options)


def _sequence_mesh() -> dict:
    return {"mesh": jax.make_mesh((jax.device_count(),), ("seq",)), "seq_axis": "seq"}


_DISTINCT = (kernels.standard_attention, kernels.memory_efficient_attention)

#: The kernels the demo checks and times. A new kernel adds one line here.
KERNELS: list[Kernel] = [
    Kernel("standard_attention", kernels.standard_attention),
    Kernel("memory_efficient_attention", kernels.memory_efficient_attention),
    *(
        Kernel(f"flash_attention[{name}]", kernels.flash_attention, {"implementation": name}, timed=fn not in _DISTINCT)
        for name, fn in getattr(_dispatch, "IMPLEMENTATIONS", {}).items()
    ),
    # The sequence sharded over every local device (one device: a ring of one). Not timed: its speed is a
    # question of the interconnect, for the benchmarks.
    Kernel("ring_attention", kernels.ring_attention, _sequence_mesh, timed=False),
]

_PROTOCOL_KEYWORDS = {"score_mod", "mask_mod", "q_offset", "return_lse"}


def discovered_kernels(registered: list[Kernel]) -> list[Kernel]:
    """Kernels that :mod:`attnax.kernels` exports but :data:`KERNELS` does not list.

    A kernel qualifies when its name ends in ``_attention``, it takes
    ``(query, key, value)`` and the protocol keywords, and every other
    argument has a default.
    """
    known = {k.fn for k in registered}
    found = []
    for name in getattr(kernels, "__all__", ()):
        fn = getattr(kernels, name)
        if not name.endswith("_attention") or fn in known or not inspect.isfunction(fn):
            continue
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params[:3]]
        required = [p for p in params[3:] if p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if positional == ["query", "key", "value"] and not required and _PROTOCOL_KEYWORDS <= {p.name for p in params}:
            found.append(Kernel(name, fn, discovered=True))
    return found


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and tolerances for one platform."""

    dtype: Any
    check_shape: tuple[int, int, int, int, int]  # B, H, Hk, T (= S), D
    time_lengths: tuple[int, ...]
    time_batch_tokens: int  # B * T of each timed case
    time_heads: int
    time_head_dim: int
    runs: int
    #: Error bound per quantity, relative to max(1, max |reference|).
    tolerance: dict[str, float]


def settings_for(backend: str) -> Settings:
    if backend == "cpu":
        return Settings(
            dtype=jnp.float32, check_shape=(2, 4, 2, 600, 64), time_lengths=(512, 1024, 2048),
            time_batch_tokens=2048, time_heads=4, time_head_dim=64, runs=5,
            tolerance={"out": 1e-4, "lse": 1e-4, "grad": 1e-3},
        )  # fmt: skip
    return Settings(
        dtype=jnp.bfloat16, check_shape=(2, 8, 2, 1000, 128), time_lengths=(1024, 4096, 8192),
        time_batch_tokens=16384, time_heads=16, time_head_dim=128, runs=10,
        tolerance={"out": 3e-2, "lse": 3e-2, "grad": 8e-2},
    )  # fmt: skip


def check_mods(batch: int, heads: int, length: int, key) -> dict[str, Any]:
    """The mods every kernel is checked with (documents: random boundaries per batch row)."""
    starts = jax.random.bernoulli(key, 8.0 / length, (batch, length))
    segment_ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    return {
        "none": None,
        "causal": causal_mod(),
        "causal + ALiBi": compose_score_mods(causal_mod(), alibi_mod(heads)),
        "sliding window 128": sliding_window_mod(128),
        "documents": document_mask_mod(segment_ids),
        "softcap 2": softcap_mod(2.0),
    }


# --------------------------------------------------------------------------- correctness


@functools.partial(jax.jit, static_argnums=0)
def _forward_backward(fn, q, k, v, mod, cotangent):
    def attend(q, k, v):
        return fn(q, k, v, score_mod=mod, return_lse=True)

    (out, lse), vjp = jax.vjp(attend, q, k, v)
    return out, lse, vjp((cotangent.astype(out.dtype), jnp.zeros_like(lse)))


def _scaled_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(got[~finite], want[~finite]):
        return float("inf")
    diff = np.abs(got[finite] - want[finite])
    return float(diff.max(initial=0.0) / max(1.0, np.abs(want[finite]).max(initial=0.0)))


@dataclasses.dataclass
class CheckResult:
    kernel: str
    mod: str
    errors: dict[str, float] = dataclasses.field(default_factory=dict)
    status: str = "PASS"
    note: str = ""


def run_checks(kernel_list: list[Kernel], cfg: Settings, key, progress: Progress) -> list[CheckResult]:
    B, H, Hk, T, D = cfg.check_shape
    kq, kk, kv, kc, km = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, H, T, D), jnp.float32).astype(cfg.dtype)
    k = jax.random.normal(kk, (B, Hk, T, D), jnp.float32).astype(cfg.dtype)
    v = jax.random.normal(kv, (B, Hk, T, D), jnp.float32).astype(cfg.dtype)
    cotangent = jax.random.normal(kc, (B, H, T, D), jnp.float32)
    mods = check_mods(B, H, T, km)
    expected = {name: _forward_backward(attention_reference, q, k, v, mod, cotangent) for name, mod in mods.items()}

    results = []
    task = progress.add_task("checking kernels", total=len(kernel_list) * len(mods))
    for kernel in kernel_list:
        fn = kernel.bind()
        for mod_name, mod in mods.items():
            progress.update(task, description=escape(f"{kernel.name} · {mod_name}"))
            result = CheckResult(kernel.name, mod_name)
            try:
                out, lse, grads = _forward_backward(fn, q, k, v, mod, cotangent)
            except NotImplementedError as e:
                result.status, result.note = "SKIP", str(e).splitlines()[0]
            except Exception as e:  # noqa: BLE001 - any other error is a failed check, reported
                result.status, result.note = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0]}"
                if kernel.discovered:
                    result.status = "SKIP"
                    result.note = f"not in demo.KERNELS, and a plain call fails ({result.note})"
            else:
                ref_out, ref_lse, ref_grads = expected[mod_name]
                result.errors = {
                    "out": _scaled_error(out, ref_out),
                    "lse": _scaled_error(lse, ref_lse),
                    "grad": max(_scaled_error(g, r) for g, r in zip(grads, ref_grads)),
                }
                if any(err > cfg.tolerance[name] for name, err in result.errors.items()):
                    result.status = "FAIL"
            results.append(result)
            progress.advance(task)
    return results


def check_table(results: list[CheckResult], cfg: Settings) -> Table:
    tol = cfg.tolerance
    table = Table(
        title=f"Kernels vs attention_reference ({jnp.dtype(cfg.dtype).name}; "
        f"[B, H, Hk, T=S, D] = {list(cfg.check_shape)})",
        caption=f"max |kernel - reference| / max(1, max |reference|); tolerances: out {tol['out']:g}, "
        f"lse {tol['lse']:g}, grad {tol['grad']:g}",
    )
    for column in ("kernel", "mod"):
        table.add_column(column)
    for column in ("out", "lse", "dq/dk/dv"):
        table.add_column(column, justify="right")
    table.add_column("result")
    style = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    by_kernel: dict[str, list[CheckResult]] = {}
    for r in results:
        by_kernel.setdefault(r.kernel, []).append(r)
    for kernel, rows in by_kernel.items():
        if len(rows) > 1 and all(r.status == "SKIP" and r.note == rows[0].note for r in rows):
            rows = [dataclasses.replace(rows[0], mod="(all)")]  # one reason for every mod: one row
        for i, r in enumerate(rows):
            errs = [f"{r.errors[n]:.1e}" if n in r.errors else "" for n in ("out", "lse", "grad")]
            label = r.status if not r.note else f"{r.status}: {r.note}"
            table.add_row(escape(kernel) if i == 0 else "", r.mod, *errs, f"[{style[r.status]}]{escape(label)}[/]")
    return table


# --------------------------------------------------------------------------- timing


def _median_ms(f, args, runs: int) -> float:
    jax.block_until_ready(f(*args))  # compile and warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_timings(kernel_list: list[Kernel], cfg: Settings, key, progress: Progress) -> list[dict]:
    cases = [(kernel, T) for T in cfg.time_lengths for kernel in kernel_list]
    task = progress.add_task("timing", total=len(cases))
    rows = []
    mod = causal_mod()
    for kernel, T in cases:
        progress.update(task, description=escape(f"timing {kernel.name} · T={T}"))
        B, H, D = max(1, cfg.time_batch_tokens // T), cfg.time_heads, cfg.time_head_dim
        q, k, v = (x.astype(cfg.dtype) for x in jax.random.normal(key, (3, B, H, T, D), jnp.float32))
        fn = kernel.bind()
        fwd = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, score_mod=mod))
        loss = lambda q, k, v, fn=fn: fn(q, k, v, score_mod=mod).astype(jnp.float32).sum()  # noqa: E731
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        row = {"kernel": kernel.name, "shape": (B, H, T, D)}
        for label, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            try:
                row[label] = _median_ms(f, (q, k, v), cfg.runs)
            except NotImplementedError:
                row[label] = None
            except Exception as e:  # noqa: BLE001 - out of memory at the largest size, for instance
                row[label] = type(e).__name__
        rows.append(row)
        progress.advance(task)
    return rows


def timing_table(rows: list[dict], cfg: Settings) -> Table:
    table = Table(
        title=f"Causal attention, {jnp.dtype(cfg.dtype).name}, median of {cfg.runs} runs after warm-up",
        caption="TFLOP/s counts 4·B·H·T²·D / 2 (causal) forward, 3.5× that forward+backward",
    )
    table.add_column("kernel")
    table.add_column("[B, H, T, D]")
    for column in ("fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s"):
        table.add_column(column, justify="right")
    for row in rows:
        B, H, T, D = row["shape"]
        flops = 4 * B * H * T * T * D / 2
        cells = []
        for label, scale in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            ms = row[label]
            cells.append(f"{ms:.2f}" if isinstance(ms, float) else ms or "n/a")
            cells.append(f"{scale * flops / ms / 1e9:.3g}" if isinstance(ms, float) else "")
        table.add_row(escape(row["kernel"]), str(list(row["shape"])), cells[0], cells[2], cells[1], cells[3])
    return table


# --------------------------------------------------------------------------- the rest


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def platform_table() -> Table:
    table = Table(title="Platform", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    devices = jax.devices()
    table.add_row("backend", jax.default_backend())
    table.add_row("devices", f"{len(devices)} × {devices[0].device_kind}")
    table.add_row("python", platform.python_version())
    table.add_row("attnax", attnax.__version__)
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy"):
        table.add_row(dist, _version(dist))
    return table


def train_tiny_model(console: Console, steps: int) -> bool:
    """Trains the tiny LM; True when every loss is finite and the last is below the first."""
    from attnax._tiny_lm import train_tiny_lm

    console.rule("Tiny transformer (attnax.MultiHeadAttention + optax)")
    start = time.perf_counter()
    losses = train_tiny_lm(steps=steps, log=console.print)
    ok = bool(np.all(np.isfinite(losses))) and losses[-1] < losses[0]
    verdict = "[green]PASS[/]" if ok else "[bold red]FAIL[/]"
    console.print(
        f"loss {losses[0]:.3f} → {losses[-1]:.3f} in {steps} steps ({time.perf_counter() - start:.1f} s): {verdict}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the tiny model (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    start = time.perf_counter()
    console.print(platform_table())
    cfg = settings_for(jax.default_backend())
    kernel_list = KERNELS + discovered_kernels(KERNELS)
    key_checks, key_timing = jax.random.split(jax.random.key(args.seed))

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    section = time.perf_counter()
    with Progress(*columns, console=console, transient=True) as progress:
        results = run_checks(kernel_list, cfg, key_checks, progress)
    console.print(check_table(results, cfg))
    console.print(f"[dim]checks: {time.perf_counter() - section:.1f} s[/]", justify="center")
    ok = all(r.status != "FAIL" for r in results)

    if not args.no_timing:
        section = time.perf_counter()
        with Progress(*columns, console=console, transient=True) as progress:
            rows = run_timings([k for k in kernel_list if k.timed], cfg, key_timing, progress)
        console.print(timing_table(rows, cfg))
        console.print(f"[dim]timing: {time.perf_counter() - section:.1f} s[/]", justify="center")

    if args.steps > 0:
        ok &= train_tiny_model(console, args.steps)

    failed = sum(r.status == "FAIL" for r in results)
    passed = sum(r.status == "PASS" for r in results)
    skipped = len(results) - passed - failed
    summary = f"{passed} checks passed, {failed} failed, {skipped} skipped; {time.perf_counter() - start:.0f} s"
    console.rule("[green]all good[/]" if ok else "[bold red]FAILED[/]")
    console.print(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
