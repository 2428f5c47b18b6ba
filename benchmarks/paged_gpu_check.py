"""GPU check of paged_attention's Pallas kernel: correctness vs the oracle, then decode bandwidth vs cuDNN.

Run from the repository root on the GPU machine (about 2 minutes):

    PYTHONPATH=. python3 benchmarks/paged_gpu_check.py

1. Correctness, compiled: ``paged_attention(implementation='pallas')`` against
   ``attention_reference`` (float32, on the gathered pages) for GQA decode
   with shuffled 16-token pages and ragged lengths, 256-token pages, a
   contiguous cache, a chunk of 4 new tokens with ALiBi + a sliding window
   (visit lists, per-head mods), softcap, D=64 MHA, and forced splits.
2. Timing (bf16, H=32, Hk=8, D=128, one new token, median of repeated runs):
   B=8/S=32768 and B=32/S=8192 with page sizes 16 and 256 and a contiguous
   cache; the Pallas kernel alone (no XLA glue) for page size 16; and cuDNN via
   ``jax.nn.dot_product_attention(implementation='cudnn')`` on contiguous K/V.
   Effective bandwidth = bytes of K and V read / time.

Logs, tracebacks and ``paged_gpu_check.json`` go to ``$OUT`` (default /tmp);
the table is printed last. ``--smoke`` runs tiny shapes in GPU interpret mode
on CPU (checks the script itself, in about a minute; timings meaningless).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp

from attnax.cache import KVCache
from attnax.kernels import (
    PagedAttentionConfig,
    _paged,
    _paged_mgpu,
    _pallas_mgpu_common,
    alibi_mod,
    causal_mod,
    compose_score_mods,
    paged_attention,
    sliding_window_mod,
    softcap_mod,
)
from attnax.reference import attention_reference
from benchmarks._timing import median_ms

OUT = os.environ.get("OUT", "/tmp")
SMOKE = "--smoke" in sys.argv
PALLAS = {"implementation": "pallas", "interpret": SMOKE}
T_START = time.time()
results: dict = {"device": str(jax.devices()[0]), "jax": jax.__version__, "checks": [], "timings": []}


def log(*a):
    print(*a, flush=True)


def random_pages(key, B, Hk, D, S, ps, num_pages=None, dtype=jnp.bfloat16):
    """Shuffled pages holding S tokens per row: ``(k_pages, v_pages, tables)``."""
    P = -(-S // ps)
    N = num_pages or B * P + 7
    kk, kv, kt = jax.random.split(key, 3)
    k_pages = jax.random.normal(kk, (N, ps, Hk, D), dtype)
    v_pages = jax.random.normal(kv, (N, ps, Hk, D), dtype)
    tables = jax.random.permutation(kt, N)[: B * P].reshape(B, P).astype(jnp.int32)
    return k_pages, v_pages, tables


def gathered(pages, tables):
    B, P = tables.shape
    x = pages[tables].reshape(B, P * pages.shape[1], *pages.shape[2:])
    return jnp.swapaxes(x, 1, 2).astype(jnp.float32)  # [B, Hk, S, D]


# --- 1. correctness ---------------------------------------------------------------------------------------------


def check(name, *, B, H, Hk, T, D, S, ps, lengths, score_mod=None, config=None, contiguous=False):
    try:
        key = jax.random.key(zlib.crc32(name.encode()))
        kq, kp = jax.random.split(key)
        q = jax.random.normal(kq, (B, H, T, D), jnp.bfloat16)
        lengths = jnp.asarray(lengths, jnp.int32)
        if contiguous:
            k = jax.random.normal(kp, (B, S, Hk, D), jnp.bfloat16)
            v = jax.random.normal(jax.random.fold_in(kp, 1), (B, S, Hk, D), jnp.bfloat16)
            cache = KVCache(key=k, value=v, lengths=lengths)
            fn = jax.jit(lambda q, c: c.attend(q, score_mod=score_mod, return_lse=True, config=config, page_size=ps,
                                               **PALLAS))  # fmt: skip
            out, lse = fn(q, cache)
            kf, vf = (jnp.swapaxes(x, 1, 2).astype(jnp.float32) for x in (k, v))
        else:
            k_pages, v_pages, tables = random_pages(kp, B, Hk, D, S, ps)
            fn = jax.jit(functools.partial(paged_attention, score_mod=score_mod, return_lse=True, config=config,
                                           **PALLAS))  # fmt: skip
            out, lse = fn(q, k_pages, v_pages, tables, lengths)
            kf, vf = gathered(k_pages, tables), gathered(v_pages, tables)
        ref, ref_lse = attention_reference(
            q.astype(jnp.float32), kf, vf, score_mod=compose_score_mods(causal_mod(), score_mod),
            q_offset=lengths - T, return_lse=True,
        )  # fmt: skip
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
        fin = jnp.isfinite(ref_lse)
        lerr = float(jnp.max(jnp.where(fin, jnp.abs(lse - ref_lse), 0.0)))
        ok = err < 3e-2 and lerr < 1e-2 and bool(jnp.all(jnp.isfinite(lse) == fin))
        log(f"check {name:34s} out_err={err:.2e} lse_err={lerr:.2e} {'OK' if ok else 'FAIL'}")
        results["checks"].append({"name": name, "out_err": err, "lse_err": lerr, "ok": ok})
    except Exception as e:  # keep going: the timings are still useful
        log(f"check {name:34s} ERROR {type(e).__name__}: {str(e)[:1500]}")
        with open(f"{OUT}/paged_err_{name}.txt", "w") as f:
            traceback.print_exc(file=f)
        results["checks"].append({"name": name, "error": f"{type(e).__name__}: {str(e)[:500]}", "ok": False})


log(f"jax {jax.__version__}, {jax.devices()[0]}{' (smoke: interpret mode)' if SMOKE else ''}")
if SMOKE:
    check("smoke decode ps16", B=2, H=4, Hk=2, T=1, D=64, S=256, ps=16, lengths=[200, 7],
          score_mod=alibi_mod(4), config=PagedAttentionConfig(block_kv=64, num_splits=2))  # fmt: skip
    check("smoke contiguous", B=1, H=2, Hk=1, T=2, D=64, S=128, ps=64, lengths=[100], contiguous=True)
else:
    check("gqa decode ps16 ragged", B=3, H=32, Hk=8, T=1, D=128, S=2048, ps=16, lengths=[2048, 1, 777])
    check("gqa decode ps256", B=2, H=32, Hk=8, T=1, D=128, S=4096, ps=256, lengths=[4000, 300])
    check("contiguous decode", B=2, H=16, Hk=2, T=1, D=128, S=3072, ps=256, lengths=[3072, 1000], contiguous=True)
    check("chunk T=4 alibi+window", B=2, H=8, Hk=2, T=4, D=128, S=1024, ps=16, lengths=[1000, 9],
          score_mod=compose_score_mods(alibi_mod(8), sliding_window_mod(300)))  # fmt: skip
    check("softcap ps32 D=64 mha", B=2, H=4, Hk=4, T=1, D=64, S=1024, ps=32, lengths=[1024, 513],
          score_mod=softcap_mod(20.0))  # fmt: skip
    check("forced 5 splits ps64 3 stages", B=1, H=8, Hk=1, T=2, D=128, S=4096, ps=64, lengths=[4096],
          config=PagedAttentionConfig(block_kv=64, num_stages=3, num_splits=5))  # fmt: skip
    check("prefill chunk T=64 (2 row blocks)", B=1, H=4, Hk=2, T=64, D=128, S=512, ps=16, lengths=[500])


# --- 2. timing --------------------------------------------------------------------------------------------------


def bench(fn, *args, reps=1 if SMOKE else 5, n=1 if SMOKE else 10):
    """Seconds per call (see ``benchmarks._timing.median_ms``)."""
    jax.block_until_ready(fn(*args))  # a second warm-up call
    return median_ms(fn, args, n=n, reps=reps) / 1e3


H, Hk, D = (4, 2, 64) if SMOKE else (32, 8, 128)
SHAPES = ((1, 256),) if SMOKE else ((8, 32768), (32, 8192))
rows = []


def time_shape(B, S):
    kv_bytes = 2 * B * S * Hk * D * 2
    q = jax.random.normal(jax.random.key(1), (B, H, 1, D), jnp.bfloat16)
    lengths = jnp.full((B,), S, jnp.int32)

    def row(name, seconds, extra=""):
        tbs = kv_bytes / seconds / 1e12
        rows.append((B, S, name, seconds * 1e6, tbs, extra))
        results["timings"].append({"B": B, "S": S, "impl": name, "us": seconds * 1e6, "TB/s": tbs, "note": extra})
        log(f"time B={B:3d} S={S:6d} {name:28s} {seconds * 1e6:9.1f} us {tbs:6.2f} TB/s {extra}")

    def timed(name, make):
        try:
            fn, args, extra = make()
            row(name, bench(fn, *args), extra)
        except Exception as e:
            log(f"time B={B} S={S} {name} ERROR {type(e).__name__}: {str(e)[:1500]}")
            with open(f"{OUT}/paged_err_time_{name.replace(' ', '_')}_{B}.txt", "w") as f:
                traceback.print_exc(file=f)

    def contiguous_kv():
        k = jax.random.normal(jax.random.key(3), (B, S, Hk, D), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(4), (B, S, Hk, D), jnp.bfloat16)
        return k, v

    def make_paged(ps):
        k_pages, v_pages, tables = random_pages(jax.random.key(2), B, Hk, D, S, ps, num_pages=B * (S // ps))
        fn = jax.jit(functools.partial(paged_attention, **PALLAS))
        dims = _paged.PagedDims(B=B, H=H, Hk=Hk, T=1, D=D, Dv=D, num_pages=B * (S // ps), page_size=ps,
                                max_pages=S // ps)  # fmt: skip
        bkv, stages, splits = _paged.resolve_config(None, dims, jnp.bfloat16)
        return fn, (q, k_pages, v_pages, tables, lengths), f"bkv={bkv} stages={stages} splits={splits}"

    def make_kernel_only(ps=16):
        k_pages, v_pages, tables = random_pages(jax.random.key(2), B, Hk, D, S, ps, num_pages=B * (S // ps))
        dims = _paged.PagedDims(B=B, H=H, Hk=Hk, T=1, D=D, Dv=D, num_pages=B * (S // ps), page_size=ps,
                                max_pages=S // ps)  # fmt: skip
        bkv, stages, splits = _paged.resolve_config(None, dims, jnp.bfloat16)
        G = H // Hk
        st = _paged_mgpu.DecodeStatic(
            block_kv=bkv, num_stages=stages, num_splits=splits, page_size=ps, scale=D**-0.5, T=1, group=G,
            num_row_blocks=1, rows_out=-(-G // 8) * 8, has_transform=False, has_mask=False,
            transform_per_head=False, mask_per_head=False, interpret=SMOKE,
        )  # fmt: skip
        qp = jnp.pad(q.reshape(B, Hk, G, D), ((0, 0), (0, 0), (0, 64 - G), (0, 0)))
        params = _pallas_mgpu_common.interpret_params() if SMOKE else None

        def fn(qp, kp, vp, t, n):
            return _paged_mgpu.decode_kernel_call(qp, kp, vp, t, n, None, [], lambda r, c: (None, None), st, params)

        return jax.jit(fn), (qp, k_pages, v_pages, tables, lengths), f"kernel only, splits={splits} (no combine)"

    def make_contiguous():
        k, v = contiguous_kv()
        fn = jax.jit(lambda q, c: c.attend(q, **PALLAS))
        return fn, (q, KVCache(key=k, value=v, lengths=lengths)), "KVCache.attend (page = 256 rows of the buffer)"

    def make_cudnn():
        k, v = contiguous_kv()
        fn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"))
        return fn, (jnp.swapaxes(q, 1, 2), k, v), "jax.nn.dot_product_attention, q_len 1"

    for ps in (16, 256):
        timed(f"attnax pallas paged ps={ps}", functools.partial(make_paged, ps))
    timed("attnax pallas kernel ps=16", make_kernel_only)
    timed("attnax pallas contiguous", make_contiguous)
    if not SMOKE:
        timed("cudnn", make_cudnn)


for B, S in SHAPES:
    time_shape(B, S)

with open(f"{OUT}/paged_gpu_check.json", "w") as f:
    json.dump(results, f, indent=1)

log("")
log(f"{jax.devices()[0]}, jax {jax.__version__}, {time.time() - T_START:.0f} s")
log("checks: " + ", ".join(f"{c['name']}: {'OK' if c['ok'] else 'FAIL'}" for c in results["checks"]))
log(f"{'B':>3} {'S':>6} {'implementation':28s} {'us':>9} {'TB/s':>6}  note")
for B, S, name, us, tbs, extra in rows:
    log(f"{B:3d} {S:6d} {name:28s} {us:9.1f} {tbs:6.2f}  {extra}")
for B, S in SHAPES:
    cud = [r for r in rows if r[:2] == (B, S) and r[2] == "cudnn"]
    if cud:
        for r in rows:
            if r[:2] == (B, S) and r[2] != "cudnn":
                log(f"ratio B={B} S={S} {r[2]:28s} {r[4] / cud[0][4]:.2f}x cuDNN")
sys.exit(0 if all(c["ok"] for c in results["checks"]) else 1)
