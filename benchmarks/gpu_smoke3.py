import functools, json, os, time, traceback
import numpy as np
import jax, jax.numpy as jnp
from attnax.kernels import causal_mod, alibi_mod, compose_score_mods, softcap_mod, document_mask_mod, sliding_window_mod
from attnax.kernels._pallas import pallas_flash_attention
from attnax.reference import attention_reference
OUT = os.environ.get("OUT", "/tmp")
print(jax.__version__, jax.devices(), flush=True)
def rnd(shape, i, dt=jnp.bfloat16): return jax.random.normal(jax.random.key(i), shape, dt)
f32 = lambda x: x.astype(jnp.float32)
B, H, Hk, T, S = 2, 4, 2, 300, 700
ids = jnp.repeat(jnp.arange(4), 250)[:1000]
cases = {"none": None, "causal": causal_mod(), "alibi_causal": compose_score_mods(causal_mod(), alibi_mod(H)),
         "softcap_causal": compose_score_mods(causal_mod(), softcap_mod(20.0)), "window": sliding_window_mod(128), "docs": document_mask_mod(ids)}
for D in (64, 128):
    q, k, v, g = rnd((B, H, T, D), 0), rnd((B, Hk, S, D), 1), rnd((B, Hk, S, D), 2), rnd((B, H, T, D), 3)
    for name, m in cases.items():
        try:
            f = jax.jit(jax.vjp, static_argnums=0)
            o, vjp = jax.vjp(jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=m, q_offset=300)), q, k, v)
            dq, dk, dv = jax.jit(vjp)(g)
            r, rvjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, score_mod=m, q_offset=300), f32(q), f32(k), f32(v))
            rq, rk, rv = rvjp(f32(g))
            e = lambda a, b: float(jnp.max(jnp.abs(f32(a) - b)) / (jnp.max(jnp.abs(b)) + 1e-6))
            errs = [e(o, r), e(dq, rq), e(dk, rk), e(dv, rv)]
            print(f"grad {name:14s} D={D} rel errs out/dq/dk/dv = " + " ".join(f"{x:.1e}" for x in errs), "OK" if max(errs) < 2e-2 else "FAIL", flush=True)
        except Exception as ex:
            print(f"grad {name} D={D} ERROR {type(ex).__name__}: {str(ex)[:1500]}", flush=True)
            traceback.print_exc(file=open(f"{OUT}/err_{name}_{D}.txt", "w"))
def bench(f, *args, n=20):
    f = jax.jit(f); jax.block_until_ready(f(*args)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3
def fb(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))
rows = []
for (B, S, D, causal) in [(2, 8192, 128, False), (1, 16384, 128, True), (2, 8192, 64, False), (1, 16384, 64, True)]:
    H = 16
    q, k, v = rnd((B, H, S, D), 3), rnd((B, H, S, D), 4), rnd((B, H, S, D), 5)
    qt, kt, vt = (x.swapaxes(1, 2) for x in (q, k, v))
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    a = lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=causal_mod() if causal else None)
    c = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    r = dict(B=B, S=S, D=D, causal=causal)
    for nm, fn, args in [("attnax", a, (q, k, v)), ("cudnn", c, (qt, kt, vt))]:
        try:
            r[nm + "_fwd"] = bench(fn, *args); r[nm + "_fb"] = bench(fb(fn), *args)
        except Exception as ex:
            r[nm + "_err"] = str(ex)[:300]
    rows.append(r); print(json.dumps(r), flush=True)
H, S, D = 16, 16384, 128
q, k, v = rnd((1, H, S, D), 3), rnd((1, H, S, D), 4), rnd((1, H, S, D), 5)
doc_ids = jnp.repeat(jnp.arange(8), S // 8)
for name, m in {"alibi": compose_score_mods(causal_mod(), alibi_mod(H)), "softcap": compose_score_mods(causal_mod(), softcap_mod(50.0)),
        "window1024": sliding_window_mod(1024), "docs8": compose_score_mods(causal_mod(), document_mask_mod(doc_ids))}.items():
    fn = lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=m)
    try:
        print(f"{name:12s} fwd {bench(fn, q, k, v):.3f} ms  fwd+bwd {bench(fb(fn), q, k, v):.3f} ms", flush=True)
    except Exception as ex:
        print(name, "ERROR", str(ex)[:500])
print("\n| B | S | D | causal | attnax fwd | cudnn fwd | ratio | attnax f+b | cudnn f+b | ratio |")
for r in rows:
    print(f"| {r['B']} | {r['S']} | {r['D']} | {r['causal']} | {r.get('attnax_fwd', 0):.3f} | {r.get('cudnn_fwd', 0):.3f} | {r.get('cudnn_fwd', 0)/max(r.get('attnax_fwd', 1e-9),1e-9):.2f} | {r.get('attnax_fb', 0):.3f} | {r.get('cudnn_fb', 0):.3f} | {r.get('cudnn_fb', 0)/max(r.get('attnax_fb', 1e-9),1e-9):.2f} |")
