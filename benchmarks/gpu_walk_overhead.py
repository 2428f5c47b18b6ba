"""GPU diagnosis (session 13): the fixed cost of a query tile's walk in the forward.

Unmasked forward, D=128 B=1 H=16 T=16384, key lengths S = 128 ... 2048 (one to
sixteen 128-key tiles per walk), with the default pairing of query tiles and
with pairing off. A line through ms against tiles per walk: its intercept is
the cost of a walk's fixed part (launch, Q load, pipeline fill and drain,
epilogue) in tile-steps.

    python benchmarks/gpu_walk_overhead.py           # GPU
    INTERP=1 python benchmarks/gpu_walk_overhead.py  # CPU dry run (tiny shapes)
"""
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import _pallas_mgpu_sm90 as sm90
from attnax.kernels._pallas import pallas_flash_attention
from benchmarks._timing import interleaved_ms

INTERP = os.environ.get("INTERP") == "1"
B, H, T, D = (1, 16, 16384, 128) if not INTERP else (1, 1, 256, 128)
SS = (128, 256, 512, 1024, 2048) if not INTERP else (128, 256)
_QueryTiles = sm90.QueryTiles
MODE = ["default"]
sm90.QueryTiles = lambda nq, paired: _QueryTiles(nq, paired and MODE[0] == "default")

ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (B, H, T, D), jnp.bfloat16)
fns, args = {}, {}
for S in SS:
    k, v = (jax.random.normal(kk, (B, H, S, D), jnp.bfloat16) for kk in ks[1:])
    for mode in ("default", "unpaired"):
        MODE[0] = mode
        f = jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, interpret=INTERP))
        f(q, k, v).block_until_ready()
        fns[(S, mode)] = f
        args[S] = (q, k, v)
MODE[0] = "default"
times = {}
for S in SS:
    sub = {key: f for key, f in fns.items() if key[0] == S}
    times.update(interleaved_ms(sub, args[S], *((3, 20, 5) if not INTERP else (1, 1, 1))))
print(f"\n# unmasked forward, B={B} H={H} T={T} D={D}: ms (median of 3 interleaved rounds)")
print("| S | tiles | default (paired) | unpaired |")
print("|---|---|---|---|")
for S in SS:
    paired, unpaired = (statistics.median(times[(S, mode)]) for mode in ("default", "unpaired"))
    print(f"| {S} | {S // 128} | {paired:.4f} | {unpaired:.4f} |")
for mode in ("default", "unpaired"):
    x = np.array([S // 128 for S in SS], float)
    y = np.array([statistics.median(times[(S, mode)]) for S in SS])
    slope, icept = np.polyfit(x, y, 1)
    print(f"{mode}: ms = {icept:.4f} + {slope:.4f} * tiles; fixed part = {icept / slope:.2f} tile-steps per walk")
