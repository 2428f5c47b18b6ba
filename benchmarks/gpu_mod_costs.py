"""GPU diagnosis (sessions 10-11): what a score transform costs in the forward kernel.

Times the D=128 causal forward at B=1 H=16 T=S=16384 with several transforms
(interleaved, three rounds of 20-call runs) and counts, in the PTX Mosaic GPU
dumps, the instructions that run at quarter rate on sm90 (int-to-float
conversions, ex2, tanh). ``*_unfused`` variants run a prebuilt mod's plain
``transform`` on the scaled scores; the others its fused ``scaled_transform``.

    python benchmarks/gpu_mod_costs.py          # GPU
    python benchmarks/gpu_mod_costs.py bwd      # GPU, forward + backward (jax.vjp, cotangent of ones)
    INTERP=1 python benchmarks/gpu_mod_costs.py # CPU dry run (tiny shapes)
"""
import glob
import os
import re
import statistics
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="attnax-ptx-")
INTERP = os.environ.get("INTERP") == "1"
BWD = "bwd" in sys.argv[1:]
if not INTERP:
    os.environ["MOSAIC_GPU_DUMP_TO"] = DUMP
from typing import Any, ClassVar  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from attnax import score_mods as sm  # noqa: E402
from attnax.kernels._pallas import pallas_flash_attention  # noqa: E402
from attnax.reference import attention_reference  # noqa: E402
from attnax.score_mods._base import AttentionMod, mod_dataclass  # noqa: E402
from benchmarks._timing import interleaved_ms  # noqa: E402


@mod_dataclass
class Unfused(AttentionMod):
    """``inner``'s transform through the generic path (no fused form): the kernel code before session 11."""

    inner: Any
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        return self.inner.transform(score, b, h, q_idx, kv_idx)


@mod_dataclass
class Identity(AttentionMod):
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        return score


@mod_dataclass
class IntToFloat(AttentionMod):  # one I2F per score, nothing else
    has_transform: ClassVar[bool] = True

    def transform(self, score, b, h, q_idx, kv_idx):
        return score + (kv_idx - q_idx).astype(score.dtype) * 1e-30


B, H, T, D = (1, 16, 16384, 128) if not INTERP else (1, 2, 256, 128)
causal = sm.causal_mod()
VARIANTS = {
    "causal": causal,
    "identity": sm.compose_score_mods(causal, Identity()),
    "i2f": sm.compose_score_mods(causal, IntToFloat()),
    "alibi": sm.compose_score_mods(causal, sm.alibi_mod(H)),
    "alibi_unfused": sm.compose_score_mods(causal, Unfused(sm.alibi_mod(H))),
    "softcap": sm.compose_score_mods(causal, sm.softcap_mod(50.0)),
    "softcap_unfused": sm.compose_score_mods(causal, Unfused(sm.softcap_mod(50.0))),
}
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in ks)
PATTERNS = {"cvt.f32.s32": r"cvt\.rn\.f32\.s32", "ex2": r"ex2\.approx", "tanh": r"tanh\.approx", "rcp": r"rcp\."}


def ptx_counts(files):
    text = "".join(open(f, errors="replace").read() for f in files)
    return " ".join(f"{n}={len(re.findall(p, text))}" for n, p in PATTERNS.items())


fns, info = {}, {}
ref_small = None
for name, mod in VARIANTS.items():
    before = set(glob.glob(os.path.join(DUMP, "**", "*"), recursive=True))
    fwd = jax.jit(lambda q, k, v, mod=mod: pallas_flash_attention(q, k, v, score_mod=mod, interpret=INTERP))
    if BWD:
        fns[name] = jax.jit(lambda q, k, v, f=fwd: jax.vjp(f, q, k, v)[1](jnp.ones_like(q)))
        fns[name](q, k, v)
    else:
        fns[name] = fwd
    o = fwd(q, k, v)
    # correctness on a slice: rows [0, 256) against the float64 oracle
    r = attention_reference(*(x[:, :, :256].astype(jnp.float64) for x in (q, k, v)), score_mod=mod)
    err = float(jnp.max(jnp.abs(o[:, :, :256].astype(jnp.float64) - r)))
    new = sorted(set(glob.glob(os.path.join(DUMP, "**", "*"), recursive=True)) - before)
    ptx = [f for f in new if f.endswith(".ptx")]
    if new and not ptx:
        print("dumped:", sorted({os.path.splitext(f)[1] for f in new}))
    info[name] = f"err {err:.3g} " + (ptx_counts(ptx) if ptx else "(no ptx)")
    print(name, info[name], flush=True)

times = interleaved_ms(fns, (q, k, v), *((3, 20, 5) if not INTERP else (1, 1, 1)))
base = statistics.median(times["causal"])
what = "forward + backward" if BWD else "forward"
print(f"\n# {what}, B=1 H=16 T=S=16384 D=128, causal + transform (ms, median of 3 interleaved rounds)")
for name in fns:
    t = statistics.median(times[name])
    runs = " ".join(f"{x:.3f}" for x in times[name])
    print(f"{name:12s} {t:8.3f} ms  x{t / base:5.2f} of causal  runs {runs}  {info[name]}")
