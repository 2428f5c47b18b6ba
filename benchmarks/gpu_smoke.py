"""GPU smoke test: compile the Pallas kernel, check it against the oracle, time it vs cuDNN."""
import functools, json, os, sys, time, traceback
import numpy as np
import jax, jax.numpy as jnp
from attnax.kernels import causal_mod, alibi_mod, compose_score_mods, softcap_mod, document_mask_mod, sliding_window_mod
from attnax.kernels._pallas import pallas_flash_attention
from attnax.reference import attention_reference

print(jax.__version__, jax.devices(), flush=True)
OUT = os.environ.get("OUT", "/tmp")

def rnd(shape, i, dt=jnp.bfloat16):
    return jax.random.normal(jax.random.key(i), shape, dt)

# 1) correctness, compiled
B, H, Hk, T, S, D = 2, 4, 2, 300, 700, 128
q, k, v = rnd((B, H, T, D), 0), rnd((B, Hk, S, D), 1), rnd((B, Hk, S, D), 2)
ids = jnp.repeat(jnp.arange(4), 250)[:1000]
cases = {
    "none": None, "causal": causal_mod(), "alibi_causal": compose_score_mods(causal_mod(), alibi_mod(H)),
    "softcap_causal": compose_score_mods(causal_mod(), softcap_mod(20.0)), "window": sliding_window_mod(128),
    "docs": document_mask_mod(ids),
}
for name, m in cases.items():
    for D_ in (64, 128, 256):
        try:
            qq, kk, vv = q[..., :D_] if D_ <= 128 else jnp.concatenate([q, q], -1), k[..., :D_] if D_ <= 128 else jnp.concatenate([k, k], -1), v[..., :D_] if D_ <= 128 else jnp.concatenate([v, v], -1)
            o, l = jax.jit(functools.partial(pallas_flash_attention, score_mod=m, q_offset=300, return_lse=True))(qq, kk, vv)
            r, lr = attention_reference(*(x.astype(jnp.float32) for x in (qq, kk, vv)), score_mod=m, q_offset=300, return_lse=True)
            err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - r))); lerr = float(jnp.max(jnp.where(jnp.isinf(lr), 0, jnp.abs(l - lr))))
            print(f"check {name:16s} D={D_:3d} out_err={err:.2e} lse_err={lerr:.2e} {'OK' if err < 3e-2 and lerr < 1e-2 else 'FAIL'}", flush=True)
        except Exception as e:
            print(f"check {name:16s} D={D_} ERROR {type(e).__name__}: {str(e)[:2000]}", flush=True)
            traceback.print_exc(file=open(f"{OUT}/err_{name}_{D_}.txt", "w"))

# 2) timing vs cuDNN
def bench(f, *args, n=20):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return float(np.median(ts))

rows = []
for (B, S, causal, D) in [(2, 8192, False, 128), (1, 16384, True, 128), (2, 8192, False, 64), (1, 16384, True, 64)]:
    H = 16
    q, k, v = rnd((B, H, S, D), 3), rnd((B, H, S, D), 4), rnd((B, H, S, D), 5)
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    res = {"B": B, "S": S, "D": D, "causal": causal}
    try:
        t = bench(lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=causal_mod() if causal else None), q, k, v)
        res["attnax_ms"] = t * 1e3; res["attnax_tflops"] = flops / t / 1e12
    except Exception as e:
        res["attnax_err"] = str(e)[:500]
    try:
        qt, kt, vt = (x.swapaxes(1, 2) for x in (q, k, v))
        t = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"), qt, kt, vt)
        res["cudnn_ms"] = t * 1e3; res["cudnn_tflops"] = flops / t / 1e12
    except Exception as e:
        res["cudnn_err"] = str(e)[:500]
    rows.append(res); print(json.dumps(res), flush=True)
json.dump(rows, open(f"{OUT}/smoke.json", "w"), indent=1)
print("\n| B | S | D | causal | attnax ms | attnax TF/s | cudnn ms | cudnn TF/s | ratio |")
for r in rows:
    print(f"| {r['B']} | {r['S']} | {r['D']} | {r['causal']} | {r.get('attnax_ms', float('nan')):.3f} | {r.get('attnax_tflops', float('nan')):.0f} | {r.get('cudnn_ms', float('nan')):.3f} | {r.get('cudnn_tflops', float('nan')):.0f} | {r.get('cudnn_ms', float('nan'))/r.get('attnax_ms', float('nan')):.2f} |")
