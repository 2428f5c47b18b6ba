import functools, os, time
import numpy as np
import jax, jax.numpy as jnp
from attnax.kernels import causal_mod, sliding_window_mod, document_mask_mod, compose_score_mods
from attnax.kernels._pallas import pallas_flash_attention, PallasFlashConfig
from attnax.block_mask import create_block_mask
print(jax.__version__, jax.devices(), flush=True)
def rnd(shape, i, dt=jnp.bfloat16): return jax.random.normal(jax.random.key(i), shape, dt)
def bench(f, *args, n=30):
    f = jax.jit(f); jax.block_until_ready(f(*args)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3, float(np.min(ts)) * 1e3
H, S, D = 16, 16384, 128
q, k, v = rnd((1, H, S, D), 3), rnd((1, H, S, D), 4), rnd((1, H, S, D), 5)
allfull = create_block_mask(lambda b, h, qq, kk: kk >= 0, None, None, S, S, block_size=(128, 128))
win = create_block_mask(sliding_window_mod(1024).mask_mod, None, None, S, S, block_size=(128, 128))
cau = create_block_mask(causal_mod().mask_mod, None, None, S, S, block_size=(128, 128))
print("classes allfull", np.unique(np.asarray(allfull.block_classes), return_counts=True))
for stages in (2, 3):
    cfg = PallasFlashConfig(64, 128, stages)
    for name, kw in [("dense", {}), ("allfull-lists", dict(block_mask=allfull)), ("causal-bm", dict(block_mask=cau)),
                     ("causal-mod", dict(score_mod=causal_mod())), ("window-bm", dict(block_mask=win)), ("window-mod", dict(score_mod=sliding_window_mod(1024)))]:
        try:
            med, mn = bench(lambda q, k, v, kw=kw: pallas_flash_attention(q, k, v, block_sizes=cfg, **kw), q, k, v)
            print(f"stages={stages} {name:14s} median {med:.3f} ms  min {mn:.3f} ms", flush=True)
        except Exception as e:
            print(f"stages={stages} {name} ERROR {str(e)[:300]}", flush=True)
# XLA-side costs
from attnax.kernels._pallas import tile_classes, lists_from_classes
from attnax._validation import AttentionDims
d = AttentionDims(1, H, H, S, S, D, D)
print("tile lists causal", bench(lambda: lists_from_classes(tile_classes(causal_mod().mask, None, d, 0, 128, 128), False)))
