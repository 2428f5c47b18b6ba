"""GPU diagnosis (session 12): the launch order of the dK/dV kernel's CTAs.

Same process, interleaved rounds: forward + backward (``jax.vjp``, random
cotangent) at D=128 and D=64, bf16, H=16, with the dK/dV grid's outer axis
the heads (key tiles in order within each head) or the key tiles (heaviest
first across all heads): ``attnax.kernels._pallas_mgpu_sm90_bwd._DKV_OUTER``.
Both orders give the same gradients bit for bit (each CTA's work is the same).

    python benchmarks/gpu_dkv_order.py          # GPU
    INTERP=1 python benchmarks/gpu_dkv_order.py # CPU dry run (tiny shapes)
"""
import os
import statistics

import jax
import jax.numpy as jnp

from attnax import score_mods as sm
from attnax.kernels import _pallas_mgpu_sm90_bwd as bwd
from attnax.kernels._pallas import pallas_flash_attention
from benchmarks._timing import interleaved_ms

INTERP = os.environ.get("INTERP") == "1"
H = 16 if not INTERP else 2
L = 16384 if not INTERP else 256
causal = sm.causal_mod()
ids = jnp.repeat(jnp.arange(8), L // 8)[None]
CASES = {  # name: (B, T, D, mod)
    "dense4k-d128": (4 if not INTERP else 1, L // 4, 128, None),
    "causal4k-d128": (4 if not INTERP else 1, L // 4, 128, causal),
    "causal16k-d128": (1, L, 128, causal),
    "dense16k-d128": (1, L, 128, None),
    "causal16k-d64": (1, L, 64, causal),
    "alibi16k-d128": (1, L, 128, sm.compose_score_mods(causal, sm.alibi_mod(H))),
    "window16k-d128": (1, L, 128, sm.sliding_window_mod((1023, 0))),
    "docs16k-d128": (1, L, 128, sm.compose_score_mods(causal, sm.document_mask_mod(ids))),
}


def grads(mod, outer):
    def fn(q, k, v, do):  # the switch is read while tracing
        bwd._DKV_OUTER = outer
        try:
            f = lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod, interpret=INTERP)  # noqa: E731
            return jax.vjp(f, q, k, v)[1](do)
        finally:
            bwd._DKV_OUTER = "heads"

    # GPU interpret mode can deadlock on a forward and a backward in one XLA program: not jitted there.
    return fn if INTERP else jax.jit(fn)


rows = []
only = os.environ.get("ONLY")
for name, (B, T, D, mod) in CASES.items():
    if only and name not in only.split(","):
        continue
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)
    fns = {"heads": grads(mod, "heads"), "kv": grads(mod, "kv")}
    a, b = fns["heads"](q, k, v, do), fns["kv"](q, k, v, do)
    same = all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b))
    times = interleaved_ms(fns, (q, k, v, do), *((5, 10, 3) if not INTERP else (1, 1, 1)))
    med = {n: statistics.median(t) for n, t in times.items()}
    rows.append((name, med, same))
    print(name, {n: round(t, 3) for n, t in med.items()}, "same", same, flush=True)

print("\n# forward + backward, bf16, H=16 (ms, median of 5 interleaved rounds); dK/dV grid outer axis")
print("| case | heads outer | key tiles outer | heads / kv | gradients equal |")
print("|---|---|---|---|---|")
for name, med, same in rows:
    print(f"| {name} | {med['heads']:.3f} | {med['kv']:.3f} | {med['heads'] / med['kv']:.3f} | {same} |")
