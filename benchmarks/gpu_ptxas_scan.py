"""GPU diagnosis: ptxas findings (wgmma serialisation C7513, spills, registers) of every Pallas kernel.

Compiles the forward, the dQ kernel and the dK/dV kernel for a few cases and
reads the ptxas logs that Mosaic GPU writes under ``MOSAIC_GPU_DUMP_TO``
(``SCAN_DUMP_DIR``, else a fresh temporary folder). The dQ and dK/dV steps
differentiate with the other backward kernel stubbed out, so each step's
new dumps are the residual forward and the kernel named. Per kernel it
prints the registers ptxas allocates at launch (warpgroups then resize with
``setmaxnreg``), spill bytes stored/loaded per thread, how often C7513
("wgmma ... serialized") occurs, and the other ptxas message codes.

    SCAN_DUMP_DIR=/tmp/dumps python benchmarks/gpu_ptxas_scan.py [case ...]
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

ROOT = os.environ.get("SCAN_DUMP_DIR") or tempfile.mkdtemp(prefix="attnax-ptxas-")
os.makedirs(ROOT, exist_ok=True)
os.environ["MOSAIC_GPU_DUMP_TO"] = ROOT

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnax import score_mods as sm  # noqa: E402
from attnax.kernels import _pallas  # noqa: E402
from attnax.kernels import _pallas_mgpu_sm90_bwd as bwd  # noqa: E402

T = int(os.environ.get("SCAN_T", 4096))
INTERPRET = bool(os.environ.get("SCAN_INTERPRET"))  # a dry run on CPU (no dumps)


def cases():
    causal = sm.causal_mod()
    docs = sm.document_mask_mod(jnp.repeat(jnp.arange(8), T // 8)[None])
    out = {}
    for d in (64, 128):
        out[f"plain{d}"] = (d, None)
        out[f"causal{d}"] = (d, causal)
    out["alibi128"] = (128, sm.compose_score_mods(causal, sm.alibi_mod(4)))
    out["softcap128"] = (128, sm.compose_score_mods(causal, sm.softcap_mod(50.0)))
    out["window128"] = (128, sm.sliding_window_mod((1023, 0)))
    out["docs128"] = (128, sm.compose_score_mods(causal, docs))
    return out


def findings(path: str) -> str:
    text = open(path, errors="replace").read()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    c7513 = text.count("C7513")
    other = sorted(set(re.findall(r"\b(C\d{4})\b", text)) - {"C7513"})
    spill = ",".join(f"{s}/{l}" for s, l in spills if (s, l) != ("0", "0")) or "0"
    return f"launch regs {'/'.join(regs) or '?'} spill(st/ld) {spill} C7513x{c7513} {' '.join(other)}".rstrip()


def step(label: str, fn, *args):
    before = set(os.listdir(ROOT))
    try:
        jax.block_until_ready(jax.jit(fn)(*args))
    except Exception as e:  # noqa: BLE001
        print(f"{label:24s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return
    new = sorted(set(os.listdir(ROOT)) - before)
    logs = [f for f in new if f.endswith(".ptxas")]
    if not logs:
        print(f"{label:24s} no ptxas dump among {new[:6]}", flush=True)
    for f in logs:
        print(f"{label:24s} {f:28s} {findings(os.path.join(ROOT, f))}", flush=True)


def main():
    argv = sys.argv[1:]
    wanted = [a for a in argv if a in cases()] or list(cases())
    real_dq, real_dkv = bwd.dq_kernel_call, bwd.dkv_kernel_call
    for name in wanted:
        d, mod = cases()[name]
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, do = (jax.random.normal(kk, (1, 4, T, d), jnp.bfloat16) for kk in ks)

        def attn(q, k, v, mod=mod):
            return _pallas.pallas_flash_attention(q, k, v, score_mod=mod, interpret=INTERPRET or None)

        def grads(q, k, v, do):
            return jax.vjp(attn, q, k, v)[1](do)

        # A fresh lambda per step: jax.jit would otherwise reuse the trace made with the other stub.
        step(f"{name} fwd", attn, q, k, v)
        bwd.dq_kernel_call, bwd.dkv_kernel_call = real_dq, lambda q, k, v, *a, **kw: (k, v)
        step(f"{name} res-fwd+dq", lambda *a: grads(*a), q, k, v, do)
        bwd.dq_kernel_call, bwd.dkv_kernel_call = lambda q, *a, **kw: (q,), real_dkv
        step(f"{name} res-fwd+dkv", lambda *a: grads(*a), q, k, v, do)
        bwd.dq_kernel_call, bwd.dkv_kernel_call = real_dq, real_dkv


if __name__ == "__main__":
    main()
