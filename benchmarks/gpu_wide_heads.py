"""GPU timing of wide heads (D = 256, Gemma's head dim): the Pallas kernel against cuDNN.

    PYTHONPATH=. python3 benchmarks/gpu_wide_heads.py [T]

Forward and forward+backward, causal and not, B=1, H=8, T=S (default 4096),
bf16; cuDNN through ``jax.nn.dot_product_attention(implementation='cudnn')``
in the same process. Prints a Markdown table of milliseconds (median of timed
runs) and cuDNN / attnax ratios.
"""

import importlib.metadata as md
import sys

import jax
import jax.numpy as jnp

from attnax.kernels import causal_mod, pallas_flash_attention
from benchmarks._timing import TimingConfig, time_jax


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    B, H, D = 1, 8, 256
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)
    sw = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (cuDNN takes [B, T, H, D])
    rows = []
    for causal in (False, True):
        impls = {
            "attnax": lambda q, k, v, c=causal: pallas_flash_attention(q, k, v, score_mod=causal_mod() if c else None),
            "cudnn": lambda q, k, v, c=causal: sw(
                jax.nn.dot_product_attention(sw(q), sw(k), sw(v), is_causal=c, implementation="cudnn")
            ),
        }
        ms = {}
        for name, f in impls.items():
            fb = jax.jit(lambda q, k, v, do, f=f: jax.vjp(f, q, k, v)[1](do))
            try:
                ms[name] = (
                    time_jax(jax.jit(f), (q, k, v), TimingConfig())["ms"],
                    time_jax(fb, (q, k, v, do), TimingConfig())["ms"],
                )
            except Exception as e:  # noqa: BLE001 - report, do not fail the script
                print(name, "failed:", repr(e)[:300], flush=True)
            print(causal, name, ms.get(name), flush=True)
        rows.append((causal, ms))
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "jaxlib"))
    print(f"\n{jax.devices()[0].device_kind}; {versions}; python {sys.version.split()[0]}")
    print(f"B={B} H={H} T=S={T} D={D} bf16; ms, median of timed runs")
    print("| mask | attnax fwd | cuDNN fwd | x cuDNN | attnax fwd+bwd | cuDNN fwd+bwd | x cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for causal, ms in rows:
        a, c = ms.get("attnax"), ms.get("cudnn")
        if a and c:
            print(f"| {'causal' if causal else 'none'} | {a[0]:.3f} | {c[0]:.3f} | {c[0] / a[0]:.2f} | "
                  f"{a[1]:.3f} | {c[1]:.3f} | {c[1] / a[1]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
