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
    }


def timeit(f, *args, n=10):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


def main():
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks[:3])
    do = jax.random.normal(ks[3], (B, H, T, D), jnp.bfloat16)
    real_dq, real_dkv = bwd.dq_kernel_call, bwd.dkv_kernel_call
    rows = []
    only = sys.argv[1:] or list(cases())
    for name, mod in cases().items():
        if name not in only:
            continue
        print(f"=== {name}", file=sys.stderr, flush=True)

        def grads(q, k, v, do, mod=mod):
            _, vjp = jax.vjp(lambda q, k, v: _pallas.pallas_flash_attention(q, k, v, score_mod=mod), q, k, v)
            return vjp(do)

        res = {}
        for variant in ("both", "dq_only", "dkv_only"):
            bwd.dq_kernel_call, bwd.dkv_kernel_call = real_dq, real_dkv
            if variant == "dq_only":
                bwd.dkv_kernel_call = lambda q, k, v, *a, **kw: (jnp.zeros_like(k), jnp.zeros_like(v))
            if variant == "dkv_only":
                bwd.dq_kernel_call = lambda q, *a, **kw: jnp.zeros_like(q)
            res[variant] = timeit(jax.jit(grads), q, k, v, do)
        fwd = timeit(jax.jit(lambda q, k, v: _pallas.pallas_flash_attention(q, k, v, score_mod=mod)), q, k, v)
        rows.append((name, fwd, res["both"], res["dq_only"] - fwd, res["dkv_only"] - fwd))
    bwd.dq_kernel_call, bwd.dkv_kernel_call = real_dq, real_dkv
    print(f"B={B} H={H} T=S={T} D={D} bf16, ms (median of 10); dQ/dKV = grads with the other kernel stubbed, minus fwd")
    print(f"{'case':10s} {'fwd':>7s} {'fwd+bwd':>8s} {'dQ':>7s} {'dK/dV':>7s}")
    for name, f, both, dq, dkv in rows:
        print(f"{name:10s} {f:7.3f} {both:8.3f} {dq:7.3f} {dkv:7.3f}")


if __name__ == "__main__":
    main()
