"""GPU diagnosis (session 13): the forward on a persistent grid against the per-pair grid.

Each case compiles twice, with ``_pallas._PERSISTENT_MAX_WALK`` forcing the
persistent grid (one CTA per SM taking pairs of query tiles in turn) and the
per-pair grid (a CTA per pair of query tiles), then times both, interleaved:
five rounds of 20-call runs, D=128 bf16. Short walks (windows, 2k keys) and
long ones (causal 4k and 16k, unmasked 16k).

    python benchmarks/gpu_persist_diag.py
"""
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attnax import score_mods as sm
from attnax.kernels import _pallas
from attnax.kernels._pallas import pallas_flash_attention
from benchmarks._timing import interleaved_ms

D = 128
ids = jnp.asarray(np.repeat(np.arange(8), 2048), jnp.int32)
CASES = {
    "window1024 16k": (1, 16, 16384, 16384, sm.sliding_window_mod((1023, 0))),
    "docs8 16k": (1, 16, 16384, 16384, sm.compose_score_mods(sm.causal_mod(), sm.document_mask_mod(ids))),
    "causal 2k B=8": (8, 16, 2048, 2048, sm.causal_mod()),
    "dense 2k B=8": (8, 16, 2048, 2048, None),
    "causal 4k B=4": (4, 16, 4096, 4096, sm.causal_mod()),
    "S=1024 T=16k": (1, 16, 16384, 1024, None),
    "causal 16k": (1, 16, 16384, 16384, sm.causal_mod()),
    "dense 16k": (1, 16, 16384, 16384, None),
}
VARIANTS = {"persist": 10**6, "old": 0}  # _PERSISTENT_MAX_WALK
rows = []
for name, (B, H, T, S, mod) in CASES.items():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, H, T, D), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, H, S, D), jnp.bfloat16) for kk in ks[1:])
    fns = {}
    for var, max_walk in VARIANTS.items():
        _pallas._PERSISTENT_MAX_WALK = max_walk
        f = jax.jit(lambda q, k, v, mod=mod: pallas_flash_attention(q, k, v, score_mod=mod))
        f(q, k, v).block_until_ready()
        fns[var] = f
    t = interleaved_ms(fns, (q, k, v), 5, 20, 5)
    a, b = statistics.median(t["persist"]), statistics.median(t["old"])
    rounds = " / ".join(" ".join(f"{x:.3f}" for x in t[var]) for var in VARIANTS)
    rows.append(f"| {name} | {a:.4f} | {b:.4f} | {b / a:.3f} | {rounds} |")
    print(rows[-1], flush=True)
print("| case | persistent | paired grid | grid / persistent | rounds |")
print("|---|---|---|---|---|")
print("\n".join(rows))
