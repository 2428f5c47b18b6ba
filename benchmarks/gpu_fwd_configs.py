"""GPU diagnosis (session 10): forward tilings at D=64 against cuDNN, and the harness's timing settings.

1. ``timing``: the benchmark harness's timing, old settings (2 ms runs, 3 warm-up calls)
   against new (10 ms runs, 0.2 s of warm-up): attnax and cuDNN alike.
2. The D=64 (FWD_D=128: D=128) forward with several ``PallasFlashConfig`` tilings and cuDNN
   (``jax.nn``), dense and causal, interleaved: three rounds of 20-call runs.

3. ``mods``: the D=128 window-1024 and packed-documents forwards (B=1 H=16
   T=S=16384) with several tilings.

    PYTHONPATH=. python benchmarks/gpu_fwd_configs.py [timing] [mods]  # GPU
    INTERP=1 PYTHONPATH=. python benchmarks/gpu_fwd_configs.py  # CPU dry run (tiny shapes)
"""
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels import causal_mod
from attnax.kernels._pallas import PallasFlashConfig, pallas_flash_attention
from benchmarks._timing import interleaved_ms, median_ms

INTERP = os.environ.get("INTERP") == "1"
SHAPES = [(8, 2048), (4, 4096), (2, 8192), (1, 16384)] if not INTERP else [(1, 256)]
D = int(os.environ.get("FWD_D", 64))  # FWD_D=128: the D=128 tilings
H = 16 if not INTERP else 2
TILINGS = {  # (block_q, block_kv, num_stages); the first is the default
    64: {
        False: [(64, 256, 2), (128, 128, 2), (64, 128, 2)],
        True: [(64, 128, 2), (128, 128, 2), (64, 256, 2), (128, 64, 3)],
    },
    128: {
        False: [(64, 128, 2), (64, 192, 2), (64, 64, 4)],
        True: [(64, 128, 2), (64, 192, 2), (64, 64, 4)],
    },
}[D]


def qkv(B, T, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)


def attnax_fn(causal, cfg=None):
    mod = causal_mod() if causal else None
    return jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod, block_sizes=cfg, interpret=INTERP))


def cudnn_fn(causal):
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))


def timing_settings():
    from benchmarks._timing import TimingConfig, time_jax

    old = TimingConfig(warmup=3, warmup_s=0.0, min_run_s=2e-3, max_inner=64)
    new = TimingConfig()
    for B, T, causal in ((4, 4096, True), (8, 2048, False), (1, 16384, True)):
        ks = jax.random.split(jax.random.key(1), 3)
        q, k, v = (jax.random.normal(kk, (B, 16, T, 64), jnp.bfloat16) for kk in ks)
        t = tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        fa, fc = attnax_fn(causal), cudnn_fn(causal)
        for _ in range(2):
            for name, cfg in (("old", old), ("new", new)):
                ra, rc = time_jax(fa, (q, k, v), cfg), time_jax(fc, t, cfg)
                print(f"timing B{B} T{T} causal={causal} {name}: attnax {ra['ms']:.3f} (n_inner {ra['n_inner']}) "
                      f"cudnn {rc['ms']:.3f} (n_inner {rc['n_inner']})", flush=True)


def tilings():
    rows = []
    for causal in (False, True):
        for B, T in SHAPES:
            q, k, v = qkv(B, T)
            t = tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v))
            fns = {f"{bq}x{bkv}s{st}": (attnax_fn(causal, PallasFlashConfig(bq, bkv, st)), (q, k, v))
                   for bq, bkv, st in TILINGS[causal]}
            if not INTERP:
                fns["cudnn"] = (cudnn_fn(causal), t)
            outs = {}
            for name, (f, a) in fns.items():
                o = f(*a)
                outs[name] = np.asarray((jnp.swapaxes(o, 1, 2) if name == "cudnn" else o).astype(jnp.float32))
            first = outs[next(iter(outs))]
            times = {n: [] for n in fns}
            for _ in range(3 if not INTERP else 1):
                for name, (f, a) in fns.items():
                    times[name].append(median_ms(f, a, *((20, 5) if not INTERP else (1, 1))))
            flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
            for name in fns:
                ms = statistics.median(times[name])
                err = float(np.max(np.abs(outs[name] - first)))
                rows.append(f"B{B} T{T} {'causal' if causal else 'dense':6s} {name:10s} {ms:8.3f} ms "
                            f"{flops / ms / 1e9:5.0f} TF/s  max|diff| to the first {err:.2g}")
                print(rows[-1], flush=True)
    print(f"\n# D={D} forward tilings (median of 3 interleaved rounds)")
    print("\n".join(rows))


def mod_tilings():
    from attnax.kernels import compose_score_mods, document_mask_mod, sliding_window_mod

    B, H, T, D = (1, 16, 16384, 128) if not INTERP else (1, 2, 512, 128)
    ks = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)
    mods = {
        "window1024": sliding_window_mod((1023, 0)),
        "docs8": compose_score_mods(causal_mod(), document_mask_mod(jnp.repeat(jnp.arange(8), T // 8))),
        "causal": causal_mod(),
    }
    rows = []
    for name, mod in mods.items():
        fns = {}
        for bq, bkv, st in ((64, 128, 2), (64, 64, 2), (64, 64, 3), (64, 64, 4)):
            cfg = PallasFlashConfig(bq, bkv, st)
            fns[f"{bq}x{bkv}s{st}"] = jax.jit(
                lambda q, k, v, cfg=cfg, mod=mod: pallas_flash_attention(
                    q, k, v, score_mod=mod, block_sizes=cfg, interpret=INTERP))
        outs = {n: np.asarray(f(q, k, v).astype(jnp.float32)) for n, f in fns.items()}
        first = outs[next(iter(outs))]
        times = interleaved_ms(fns, (q, k, v), *((3, 20, 5) if not INTERP else (1, 1, 1)))
        for n in fns:
            rows.append(f"{name:10s} {n:10s} {statistics.median(times[n]):8.3f} ms  "
                        f"max|diff| to the first {float(np.max(np.abs(outs[n] - first))):.2g}")
            print(rows[-1], flush=True)
    print("\n# D=128 mod forwards by tiling (median of 3 interleaved rounds)")
    print("\n".join(rows))


if __name__ == "__main__":
    import sys

    if "mods" in sys.argv[1:]:
        mod_tilings()
    else:
        if "timing" in sys.argv[1:]:
            timing_settings()
        tilings()
