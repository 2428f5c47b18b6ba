import functools, time
import numpy as np
import jax, jax.numpy as jnp
from attnax.kernels import causal_mod, sliding_window_mod
from attnax.kernels import _pallas as P
from attnax.kernels import _pallas_mgpu_sm90 as sm90
from attnax.kernels._pallas import pallas_flash_attention, PallasFlashConfig
from attnax._validation import AttentionDims
print(jax.__version__, jax.devices(), flush=True)
def rnd(shape, i, dt=jnp.bfloat16): return jax.random.normal(jax.random.key(i), shape, dt)
def bench(f, *args, n=30):
    f = jax.jit(f); jax.block_until_ready(f(*args)); ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3
H, D = 16, 128
for B, S in [(8, 2048), (4, 4096), (1, 16384)]:
    q, k, v = rnd((B, H, S, D), 3), rnd((B, H, S, D), 4), rnd((B, H, S, D), 5)
    qt, kt, vt = (x.swapaxes(1, 2) for x in (q, k, v))
    a = bench(lambda q, k, v: pallas_flash_attention(q, k, v), q, k, v)
    c = bench(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), qt, kt, vt)
    print(f"dense B={B} S={S}: attnax {a:.3f} ms cudnn {c:.3f} ms", flush=True)
B, S = 1, 16384
q, k, v = rnd((B, H, S, D), 3), rnd((B, H, S, D), 4), rnd((B, H, S, D), 5)
d = AttentionDims(B, H, H, S, S, D, D)
for name, mod in [("window", sliding_window_mod(1024)), ("causal", causal_mod())]:
    def prep(q):
        cls = P.tile_classes(mod.mask, None, d, 0, 128, 128)
        counts, order = P.lists_from_classes(cls, False)
        return counts + q[0, 0, 0, 0].astype(jnp.int32) * 0, order
    counts, order = jax.jit(prep)(q)
    print(name, "visited tiles", int(jnp.sum(counts[..., 1])), "full", int(jnp.sum(counts[..., 0])))
    tp = bench(prep, q)
    st = sm90.FwdStatic(block_q=64, block_kv=128, num_stages=2, scale=0.088, T=S, S=S, group=1, has_transform=False,
                        has_mask=True, sparse=True, mask_tail=False, interpret=False)
    def build_mods(refs, ctx):
        return None, mod.mask
    q_off = jnp.zeros((B,), jnp.int32)
    tk = bench(lambda q, k, v, c, o: sm90.forward_kernel_call(q, k, v, q_off, (c, o), [], build_mods, st, None), q, k, v, counts, order)
    tf = bench(lambda q, k, v: pallas_flash_attention(q, k, v, score_mod=mod), q, k, v)
    print(f"{name}: prep {tp:.3f} ms, kernel alone {tk:.3f} ms, full call {tf:.3f} ms", flush=True)
