"""GPU timing of gradients to score-mod leaves (learnable ALiBi slopes, a learnable bias).

    PYTHONPATH=. python3 benchmarks/gpu_leaf_grads.py [T]

Forward+backward of causal attention with ALiBi, B=1, H=16, D=128, bf16:
the slopes held constant (gradients to q, k, v only) against the slopes
learned (also their gradient, computed in the dQ kernel), a learned per-key
bias ``[B, 1, 1, T]`` (summed in the dK/dV kernel) and a learned ``[1, 1, T,
T]`` bias (written tile by tile by the dQ kernel); the memory-efficient XLA
kernel and PyTorch FlexAttention (a ``score_mod`` capturing tensors that
require grad) on the same cases. Prints a Markdown table of milliseconds
(median of timed runs) and the ratios.
"""

import importlib.metadata as md
import json
import subprocess
import sys

import jax
import jax.numpy as jnp

from attnax.kernels import (
    additive_bias_mod,
    alibi_mod,
    causal_mod,
    compose_score_mods,
    memory_efficient_attention,
    pallas_flash_attention,
)
from attnax.score_mods import alibi_slopes
from benchmarks._timing import TimingConfig, time_jax

_TORCH = r"""
import json, sys, torch
from torch.nn.attention.flex_attention import flex_attention, create_block_mask
from benchmarks._timing import TimingConfig, time_torch
B, H, T, D = 1, 16, int(sys.argv[1]), 128
dev, bf = "cuda", torch.bfloat16
q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=bf, requires_grad=True) for _ in range(3))
do = torch.randn(B, H, T, D, device=dev, dtype=bf)
const = 2.0 ** (-8.0 * torch.arange(1, H + 1, device=dev) / H)
slopes = const.clone().requires_grad_()
kv_bias = torch.randn(B, T, device=dev, requires_grad=True)
bias = torch.randn(T, T, device=dev, requires_grad=True)
causal = lambda b, h, i, j: i >= j
bm = create_block_mask(causal, None, None, T, T)
mods = {
    "alibi constant": (lambda s, b, h, i, j: s - const[h] * (i - j), (q, k, v)),
    "alibi learned": (lambda s, b, h, i, j: s - slopes[h] * (i - j), (q, k, v, slopes)),
    "key bias learned": (lambda s, b, h, i, j: s - const[h] * (i - j) + kv_bias[b, j], (q, k, v, kv_bias)),
    "full bias learned": (lambda s, b, h, i, j: s + bias[i, j], (q, k, v, bias)),
}
fa = torch.compile(flex_attention)
out = {}
for name, (mod, wrt) in mods.items():
    try:
        g = lambda: torch.autograd.grad(fa(q, k, v, score_mod=mod, block_mask=bm), wrt, do)
        out[name] = time_torch(g, TimingConfig())["ms"]
    except Exception as e:
        out[name] = None
        print(name, "failed:", repr(e)[:400], file=sys.stderr)
print(json.dumps(out))
"""


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 8192
    B, H, D = 1, 16, 128
    ks = jax.random.split(jax.random.key(0), 6)
    q, k, v, do = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks[:4])
    slopes = jnp.asarray(alibi_slopes(H), jnp.float32)
    kv_bias = jax.random.normal(ks[4], (B, 1, 1, T), jnp.float32)
    bias = jax.random.normal(ks[5], (1, 1, T, T), jnp.float32)
    alibi = lambda s: compose_score_mods(causal_mod(), alibi_mod(slopes=s))  # noqa: E731
    cases = {
        "alibi constant": (lambda s: alibi(s), slopes, False),
        "alibi learned": (lambda s: alibi(s), slopes, True),
        "key bias learned": (lambda kb: compose_score_mods(alibi(slopes), additive_bias_mod(kb)), kv_bias, True),
        "full bias learned": (lambda b: compose_score_mods(causal_mod(), additive_bias_mod(b)), bias, True),
    }
    kernels = {"pallas": pallas_flash_attention, "memory_efficient": memory_efficient_attention}
    if "--flex-only" in sys.argv:
        kernels = {}
    rows = {}
    for case, (make, leaf, learned) in cases.items():
        for kname, kern in kernels.items():

            def fb(q, k, v, leaf, do, kern=kern, make=make, learned=learned):
                f = lambda q, k, v, leaf: kern(q, k, v, score_mod=make(leaf))  # noqa: E731
                if learned:
                    return jax.vjp(f, q, k, v, leaf)[1](do)
                return jax.vjp(lambda q, k, v: f(q, k, v, leaf), q, k, v)[1](do)

            try:
                rows[(case, kname)] = time_jax(jax.jit(fb), (q, k, v, leaf, do), TimingConfig())["ms"]
            except Exception as e:  # noqa: BLE001 - report, do not fail the script
                rows[(case, kname)] = None
                print(case, kname, "failed:", repr(e)[:400], flush=True)
            print(case, kname, rows[(case, kname)], flush=True)
    res = None
    try:
        res = subprocess.run([sys.executable, "-c", _TORCH, str(T)], capture_output=True, text=True, timeout=400)
        for name, ms in json.loads(res.stdout.strip().splitlines()[-1]).items():
            rows[(name, "FlexAttention")] = ms
        print("torch stderr (tail):", res.stderr[-1500:])
    except Exception as e:  # noqa: BLE001
        print("torch peer failed:", e, res.stderr[-2000:] if res is not None else "")
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib", "torch"))
    print(f"\n{jax.devices()[0].device_kind}; {versions}; python {sys.version.split()[0]}")
    print(f"causal B={B} H={H} T=S={T} D={D} bf16 (leaves float32); forward+backward ms, median of timed runs")
    print("| case | pallas | memory_efficient | FlexAttention | x memory_efficient | x Flex |")
    print("|---|---|---|---|---|---|")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for case in cases:
        p, m, f = (rows.get((case, n)) for n in ("pallas", "memory_efficient", "FlexAttention"))
        rm = f"{m / p:.2f}" if p and m else "-"
        rf = f"{f / p:.2f}" if p and f else "-"
        print(f"| {case} | {fmt(p)} | {fmt(m)} | {fmt(f)} | {rm} | {rf} |")
    a, b = rows.get(("alibi learned", "pallas")), rows.get(("alibi constant", "pallas"))
    if a and b:
        print(f"learning the slopes costs {a / b:.2f}x the constant-slope backward")


if __name__ == "__main__":
    main()
