"""GPU timing of dropout in the Pallas kernel, against the same call without dropout,
the memory-efficient XLA kernel with dropout and PyTorch SDPA (flash backend) with dropout.

    PYTHONPATH=. python3 benchmarks/gpu_dropout.py [T] [--autotune]

Prints a table of milliseconds (median of timed runs), forward and forward+backward,
causal, B=1, H=16, D=128, bf16, dropout 0.1. With ``--autotune`` it also tunes the
D=64 causal forward at T and prints the chosen config.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp

from attnax.kernels import autotune_pallas_config, causal_mod, memory_efficient_attention, pallas_flash_attention
from benchmarks._timing import TimingConfig, time_jax

RATE = 0.1
_TORCH = r"""
import json, sys, torch
from benchmarks._timing import TimingConfig, time_torch
B, H, T, D, rate = 1, 16, int(sys.argv[1]), 128, float(sys.argv[2])
q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=rate)
g = lambda: torch.autograd.grad(f(), (q, k, v), do)
with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
    print(json.dumps({"fwd": time_torch(f, TimingConfig())["ms"], "fwd+bwd": time_torch(g, TimingConfig())["ms"]}))
"""


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 8192
    B, H, D = 1, 16, 128
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)
    drop = dict(dropout_rate=RATE, dropout_rng=jax.random.key(1), deterministic=False)
    mod = causal_mod()
    variants = {
        "pallas": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod),
        "pallas+dropout": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod, **drop),
        "memory_efficient+dropout": lambda q, k, v: memory_efficient_attention(q, k, v, score_mod=mod, **drop),
    }
    rows = {}
    for name, f in variants.items():
        fwd = jax.jit(f)
        fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
        rows[name] = (time_jax(fwd, (q, k, v), TimingConfig())["ms"], time_jax(fb, (q, k, v, do), TimingConfig())["ms"])
        print(name, rows[name], flush=True)
    res = None
    try:
        res = subprocess.run([sys.executable, "-c", _TORCH, str(T), str(RATE)], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        t = json.loads(res.stdout.strip().splitlines()[-1])
        rows["torch SDPA flash+dropout"] = (t["fwd"], t["fwd+bwd"])
    except Exception as e:  # noqa: BLE001 - report, do not fail the script
        print("torch peer failed:", e, res.stderr[-2000:] if res is not None else "")
    base = rows["pallas+dropout"]
    print(f"\ncausal B={B} H={H} T=S={T} D={D} bf16 dropout={RATE}; ms (ratio = row / pallas+dropout)")
    print("| variant | fwd ms | fwd+bwd ms | fwd ratio | fwd+bwd ratio |\n|---|---|---|---|---|")
    for name, (a, b) in rows.items():
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / base[0]:.2f} | {b / base[1]:.2f} |")
    if "--autotune" in sys.argv:
        q64, k64, v64 = (x[..., :64] for x in (q, k, v))
        cfg = autotune_pallas_config(q64, k64, v64, score_mod=mod)
        print("autotune D=64 causal fwd:", cfg)


if __name__ == "__main__":
    main()
