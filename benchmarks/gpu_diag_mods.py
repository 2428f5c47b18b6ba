"""GPU diagnosis: each score_rewrites / compositions case alone, fwd and grads."""
import sys, traceback
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "tests")
from conformance import MOD_CASES, random_qkv, to64
from attnax.kernels._pallas import pallas_flash_attention
from attnax.reference import attention_reference

B, H, Hk, T, S, D = 2, 4, 2, 19, 27, 8
interp = "--interpret" in sys.argv
groups = [a for a in sys.argv[1:] if not a.startswith("--")] or ["score_rewrites", "compositions"]
for group in groups:
    _, facs = MOD_CASES[group]
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(0, B, H, Hk, T, S, D, dtype=jnp.bfloat16)
    ct = jax.random.normal(jax.random.key(5), (B, H, T, D), jnp.float32)
    for name, f in facs.items():
        kw = f(B, H, T, S, rng)
        try:
            fn = lambda q, k, v: pallas_flash_attention(q, k, v, interpret=interp, **kw)
            out, vjp = jax.vjp(fn, q, k, v)
            ref, rvjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), *to64(q, k, v))
            e_out = float(jnp.max(jnp.abs(out.astype(jnp.float64) - ref)))
            g = vjp(ct.astype(out.dtype)); r = rvjp(ct.astype(jnp.float64))
            e_g = [float(jnp.max(jnp.abs(a.astype(jnp.float64) - b))) for a, b in zip(g, r)]
            print(f"{group:15s} {name:35s} out {e_out:.3g}  dq/dk/dv {e_g[0]:.3g} {e_g[1]:.3g} {e_g[2]:.3g}", flush=True)
        except Exception as e:
            print(f"{group:15s} {name:35s} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
