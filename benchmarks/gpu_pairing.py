"""GPU diagnosis (session 11): two query tiles per CTA for forwards with mod operands.

The forward pairs query tiles (:class:`QueryTiles`) only without score
transforms and mod array leaves (measured before the pipelined walk and the
fused forms: ALiBi 19%, soft-cap 9%, documents 22% slower paired). This
re-measures: each variant compiles once with the default tiling and once with
pairing forced, D=128 B=1 H=16 T=S=16384 causal forward, three interleaved
rounds of 20-call runs.

    python benchmarks/gpu_pairing.py           # GPU
    INTERP=1 python benchmarks/gpu_pairing.py  # CPU dry run (tiny shapes)
"""
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attnax import score_mods as sm
from attnax.kernels import _pallas_mgpu_sm90 as sm90
from attnax.kernels._pallas import pallas_flash_attention
from attnax.reference import attention_reference
from benchmarks._timing import interleaved_ms

INTERP = os.environ.get("INTERP") == "1"
B, H, T, D = (1, 16, 16384, 128) if not INTERP else (1, 2, 512, 128)
_QueryTiles = sm90.QueryTiles
FORCE = [False]
sm90.QueryTiles = lambda nq, paired: _QueryTiles(nq, paired or FORCE[0])

causal = sm.causal_mod()
ids = jnp.asarray(np.repeat(np.arange(8), T // 8), jnp.int32)
MODS = {
    "docs8": sm.compose_score_mods(causal, sm.document_mask_mod(ids)),
    "alibi": sm.compose_score_mods(causal, sm.alibi_mod(H)),
    "softcap": sm.compose_score_mods(causal, sm.softcap_mod(50.0)),
    "window": sm.sliding_window_mod((1023, 0)),
}
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)
fns = {}
for name, mod in MODS.items():
    for forced in (False, True):
        FORCE[0] = forced
        f = jax.jit(lambda q, k, v, mod=mod: pallas_flash_attention(q, k, v, score_mod=mod, interpret=INTERP))
        o = f(q, k, v)  # traced and compiled now, with this FORCE
        r = attention_reference(*(x[:, :, :256].astype(jnp.float64) for x in (q, k, v)), score_mod=mod)
        err = float(jnp.max(jnp.abs(o[:, :, :256].astype(jnp.float64) - r)))
        fns[(name, forced)] = f
        print(name, "paired" if forced else "default", f"err {err:.3g}", flush=True)
FORCE[0] = False
times = interleaved_ms(fns, (q, k, v), *((3, 20, 5) if not INTERP else (1, 1, 1)))
print(f"\n# forward, B={B} H={H} T=S={T} D={D} (ms, median of 3 interleaved rounds)")
print("| case | default | paired forced | default / paired |")
print("|---|---|---|---|")
for name in MODS:
    a, b = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
    print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
