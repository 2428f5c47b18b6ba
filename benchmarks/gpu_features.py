"""GPU timing of the Pallas kernel's options: dropout and the BSHD layout.

    PYTHONPATH=. python3 benchmarks/gpu_features.py [T] [--autotune]

Dropout 0.1 against the same call without dropout, the memory-efficient XLA
kernel with dropout and PyTorch SDPA (flash backend) with dropout; the BSHD
layout read in place against BSHD arrays transposed to BHSD and back (what a
kernel without the layout costs a Flax model). Prints a table of milliseconds
(median of timed runs), forward and forward+backward, causal, B=1, H=16, D=128,
bf16. With ``--autotune`` it also tunes the D=64 causal forward at T and prints
the chosen config.
"""

import importlib.metadata as md
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
    sw = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    variants = {
        "pallas": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod),
        "pallas+dropout": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod, **drop),
        "memory_efficient+dropout": lambda q, k, v: memory_efficient_attention(q, k, v, score_mod=mod, **drop),
        "pallas BSHD in place": lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod, layout="BSHD"),
        "pallas BSHD via transposes": lambda q, k, v: sw(pallas_flash_attention(sw(q), sw(k), sw(v), score_mod=mod)),
    }
    rows = {}
    for name, f in variants.items():
        args = (q, k, v, do) if "BSHD" not in name else tuple(map(sw, (q, k, v, do)))
        fwd = jax.jit(f)
        fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
        rows[name] = (time_jax(fwd, args[:3], TimingConfig())["ms"], time_jax(fb, args, TimingConfig())["ms"])
        print(name, rows[name], flush=True)
    res = None
    try:
        res = subprocess.run([sys.executable, "-c", _TORCH, str(T), str(RATE)], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        t = json.loads(res.stdout.strip().splitlines()[-1])
        rows["torch SDPA flash+dropout"] = (t["fwd"], t["fwd+bwd"])
    except Exception as e:  # noqa: BLE001 - report, do not fail the script
        print("torch peer failed:", e, res.stderr[-2000:] if res is not None else "")
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "torch"))
    print(f"\n{jax.devices()[0].device_kind}; {versions}; python {sys.version.split()[0]}")
    print(f"causal B={B} H={H} T=S={T} D={D} bf16, dropout {RATE}; ms, median of timed runs")
    print("| variant | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for name, (a, b) in rows.items():
        print(f"| {name} | {a:.3f} | {b:.3f} |")

    def ratio(num, den, what):
        if num in rows and den in rows:
            (a, b), (c, d) = rows[num], rows[den]
            print(f"{what}: fwd {a / c:.2f}, fwd+bwd {b / d:.2f}  ({num} / {den})")

    ratio("pallas+dropout", "pallas", "dropout cost")
    ratio("torch SDPA flash+dropout", "pallas+dropout", "x torch SDPA (dropout)")
    ratio("memory_efficient+dropout", "pallas+dropout", "x memory_efficient (dropout)")
    ratio("pallas BSHD via transposes", "pallas BSHD in place", "BSHD in place speed-up")
    if "--autotune" in sys.argv:
        q64, k64, v64 = (x[..., :64] for x in (q, k, v))
        cfg = autotune_pallas_config(q64, k64, v64, score_mod=mod)
        print("autotune D=64 causal fwd:", cfg)


if __name__ == "__main__":
    main()
