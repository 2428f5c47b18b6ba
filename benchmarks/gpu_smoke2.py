import functools, json, os, time
import numpy as np
import jax, jax.numpy as jnp
from attnax.kernels import causal_mod, alibi_mod, compose_score_mods, softcap_mod, document_mask_mod, sliding_window_mod
from attnax.kernels._pallas import pallas_flash_attention
from attnax.block_mask import create_block_mask
from attnax.reference import attention_reference
print(jax.__version__, jax.devices(), flush=True)
def rnd(shape, i, dt=jnp.bfloat16): return jax.random.normal(jax.random.key(i), shape, dt)
B, H, Hk, T, S, D = 2, 4, 2, 300, 700, 128
q, k, v = rnd((B, H, T, D), 0), rnd((B, Hk, S, D), 1), rnd((B, Hk, S, D), 2)
ids = jnp.repeat(jnp.arange(4), 250)[:1000]
for name, m in {"docs": document_mask_mod(ids), "docs2d": document_mask_mod(jnp.stack([ids, ids[::-1]])), "causal": causal_mod()}.items():
    o, l = jax.jit(functools.partial(pallas_flash_attention, score_mod=m, q_offset=300, return_lse=True))(q, k, v)
    r, lr = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), score_mod=m, q_offset=300, return_lse=True)
    print(name, float(jnp.max(jnp.abs(o.astype(jnp.float32) - r))), float(jnp.max(jnp.where(jnp.isinf(lr), 0, jnp.abs(l - lr)))), flush=True)
def bench(f, *args, n=20):
    f = jax.jit(f); jax.block_until_ready(f(*args)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3
H, S, D = 16, 16384, 128
q, k, v = rnd((1, H, S, D), 3), rnd((1, H, S, D), 4), rnd((1, H, S, D), 5)
doc_ids = jnp.repeat(jnp.arange(8), S // 8)
mods = {"causal": causal_mod(), "alibi": compose_score_mods(causal_mod(), alibi_mod(H)), "softcap": compose_score_mods(causal_mod(), softcap_mod(50.0)),
        "window1024": sliding_window_mod(1024), "docs8": compose_score_mods(causal_mod(), document_mask_mod(doc_ids))}
qt, kt, vt = (x.swapaxes(1, 2) for x in (q, k, v))
print("cudnn causal", bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"), qt, kt, vt))
print("cudnn window", bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(1023, 0), implementation="cudnn"), qt, kt, vt))
for name, m in mods.items():
    t = bench(lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=m), q, k, v)
    bm = create_block_mask(m.mask_mod, None, None, S, S, block_size=(128, 128))
    t2 = bench(lambda q, k, v, bm: pallas_flash_attention(q, k, v, block_mask=bm, score_mod=m if m.has_transform else None), q, k, v, bm)
    tl = bench(lambda: create_block_mask(m.mask_mod, None, None, S, S, block_size=(128, 128)))
    print(f"{name:12s} attnax fwd {t:.3f} ms | with prebuilt block_mask {t2:.3f} ms | create_block_mask {tl:.3f} ms", flush=True)
