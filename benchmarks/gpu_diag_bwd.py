"""GPU diagnosis of the Pallas backward: per-kernel time (dQ vs dK/dV) and ptxas register use.

Run with MOSAIC_GPU_DUMP_PTXAS=1 and stderr captured to see spills per case.
"""
import sys
import time

import jax
import jax.numpy as jnp

from attnax import score_mods as sm
from attnax.kernels import _pallas
from attnax.kernels import _pallas_mgpu_sm90_bwd as bwd

B, H, T, D = 1, 16, 16384, 128


def cases():
    causal = sm.causal_mod()
    return {
        "causal": causal,
        "alibi": sm.compose_score_mods(causal, sm.alibi_mod(H)),
        "softcap": sm.compose_score_mods(causal, sm.softcap_mod(50.0)),
        "window": sm.sliding_window_mod((1023, 0)),
        "docs": sm.compose_score_mods(causal, sm.document_mask_mod(jnp.repeat(jnp.arange(8), T // 8)[None])),
    }


def timeit(f, *args, n=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


VARIANTS = {  # name: (_BWD_DQ_BLOCK_KV by transform, backward registers (compute, memory))
    "auto-232": ({False: 128, True: 64}, (232, 40)),
    "auto-240": ({False: 128, True: 64}, (240, 24)),
}


def main():
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks[:3])
    do = jax.random.normal(ks[3], (B, H, T, D), jnp.bfloat16)
    real_dq, real_dkv = bwd.dq_kernel_call, bwd.dkv_kernel_call
    rows = []
    only = [a for a in sys.argv[1:] if a in cases()] or list(cases())
    variants = [a for a in sys.argv[1:] if a in VARIANTS] or list(VARIANTS)
    for name, mod in cases().items():
        if name not in only:
            continue
        fwd = timeit(jax.jit(lambda q, k, v, mod=mod: _pallas.pallas_flash_attention(q, k, v, score_mod=mod)), q, k, v)
        for var in variants:
            _pallas._BWD_DQ_BLOCK_KV, bwd._REGISTERS = VARIANTS[var]
            res = {}
            for split in ("both", "dq_only", "dkv_only"):
                print(f"=== {name} {var} {split}", file=sys.stderr, flush=True)
                bwd.dq_kernel_call, bwd.dkv_kernel_call = real_dq, real_dkv
                if split == "dq_only":
                    bwd.dkv_kernel_call = lambda q, k, v, *a, **kw: (jnp.zeros_like(k), jnp.zeros_like(v))
                if split == "dkv_only":
                    bwd.dq_kernel_call = lambda q, *a, **kw: jnp.zeros_like(q)

                def grads(q, k, v, do, mod=mod):  # a fresh function: no jit cache hit across variants
                    _, vjp = jax.vjp(lambda q, k, v: _pallas.pallas_flash_attention(q, k, v, score_mod=mod), q, k, v)
                    return vjp(do)

                try:
                    res[split] = timeit(jax.jit(grads), q, k, v, do)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} {var} {split}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    res[split] = float("nan")
            rows.append((name, var, fwd, res["both"], res["dq_only"] - fwd, res["dkv_only"] - fwd))
            print(rows[-1], flush=True)
    bwd.dq_kernel_call, bwd.dkv_kernel_call = real_dq, real_dkv
    print(f"B={B} H={H} T=S={T} D={D} bf16, ms (median of 10); dQ/dKV = grads with the other kernel stubbed, minus fwd")
    print(f"{'case':10s} {'variant':10s} {'fwd':>7s} {'fwd+bwd':>8s} {'dQ':>7s} {'dK/dV':>7s}")
    for name, var, f, both, dq, dkv in rows:
        print(f"{name:10s} {var:10s} {f:7.3f} {both:8.3f} {dq:7.3f} {dkv:7.3f}")




def forward_registers():
    """``--fwd``: forward time by the forward kernel's register split."""
    from attnax.kernels import _pallas_mgpu_sm90 as fwd_mod

    ks = jax.random.split(jax.random.key(0), 3)
    shapes = {"dense8k-b2": (2, 16, 8192, None), **{n: (1, 16, 16384, m) for n, m in cases().items()}}
    print(f"{'case':12s} {'(232,40)':>9s} {'(240,24)':>9s}")
    for name, (b, h, t, mod) in shapes.items():
        q, k, v = (jax.random.normal(kk, (b, h, t, D), jnp.bfloat16) for kk in ks)
        out = []
        for regs in ((232, 40), (240, 24)):
            fwd_mod._REGISTERS = regs
            f = jax.jit(lambda q, k, v, mod=mod, regs=regs: _pallas.pallas_flash_attention(q, k, v, score_mod=mod))
            out.append(timeit(f, q, k, v))
        print(f"{name:12s} {out[0]:9.3f} {out[1]:9.3f}", flush=True)




def forward_configs():
    """``--fwd-configs``: D=64 forward time by tiling config."""
    from attnax.kernels._pallas import PallasFlashConfig

    ks = jax.random.split(jax.random.key(0), 3)
    configs = [(64, 128, 2), (64, 128, 3), (64, 128, 4), (64, 64, 4), (64, 256, 2)]
    print("case           " + " ".join(f"{str(c):>13s}" for c in configs))
    for b, t, causal in ((2, 8192, False), (1, 16384, False), (4, 4096, True), (8, 2048, False)):
        q, k, v = (jax.random.normal(kk, (b, 16, t, 64), jnp.bfloat16) for kk in ks)
        mod = sm.causal_mod() if causal else None
        out = []
        for c in configs:
            cfg = PallasFlashConfig(block_q=c[0], block_kv=c[1], num_stages=c[2])
            f = jax.jit(
                lambda q, k, v, cfg=cfg, mod=mod: _pallas.pallas_flash_attention(
                    q, k, v, score_mod=mod, block_sizes=cfg
                )
            )
            try:
                out.append(f"{timeit(f, q, k, v):13.3f}")
            except Exception as e:  # noqa: BLE001
                out.append(f"{type(e).__name__[:13]:>13s}")
        print(f"d64-s{t}-b{b}{'-c' if causal else '  '} " + " ".join(out), flush=True)


if __name__ == "__main__":
    if "--fwd" in sys.argv:
        forward_registers()
    elif "--fwd-configs" in sys.argv:
        forward_configs()
    else:
        main()
