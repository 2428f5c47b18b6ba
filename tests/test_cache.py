"""attnax.cache: contiguous and paged KV caches, page allocation, serving loops, Flax decode with pages."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnax
from attnax.cache import KVCache, PagedKVCache
from attnax.reference import attention_reference
from attnax.score_mods import alibi_mod, causal_mod, compose_score_mods, sliding_window_mod

try:
    from paged_helpers import jit_paged, paged_oracle, rand
except ImportError:  # tests/ imported as a package
    from tests.paged_helpers import jit_paged, paged_oracle, rand


def _close(got, want, atol=1e-10):
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), atol=atol, rtol=0)


def _paged_contents(cache: PagedKVCache):
    """The paged cache's tokens as contiguous ``[B, capacity, Hk, D]`` (unallocated pages read as NaN)."""
    tables = np.asarray(cache.block_tables)
    B, P = tables.shape
    out = []
    for pages in (np.asarray(cache.k_pages), np.asarray(cache.v_pages)):
        x = np.where((tables >= 0)[:, :, None, None, None], pages[np.maximum(tables, 0)], np.nan)
        out.append(x.reshape(B, P * cache.page_size, *pages.shape[2:]))
    return out


def _check_allocator(cache: PagedKVCache):
    """Held pages are distinct, a prefix of each row's table, cover the row, and with the free list make the pool."""
    tables = np.asarray(cache.block_tables)
    held = tables[tables >= 0]
    free = np.asarray(cache.free_pages)[: int(cache.num_free)]
    assert len(set(held.tolist())) == held.size
    assert sorted(held.tolist() + free.tolist()) == list(range(cache.num_pages))
    n_held = (tables >= 0).sum(axis=1)
    assert np.all((tables >= 0) == (np.arange(tables.shape[1])[None, :] < n_held[:, None]))
    assert np.all(n_held * cache.page_size >= np.asarray(cache.lengths))


def test_kv_cache_append_num_new_release_and_attend():
    B, S, Hk, D = 3, 12, 2, 4
    cache = KVCache.create(B, S, Hk, D, jnp.float64)
    want_k, want_v = np.zeros((B, S, Hk, D)), np.zeros((B, S, Hk, D))
    k1, v1 = rand(1, (B, 3, Hk, D)), rand(2, (B, 3, Hk, D))
    cache = cache.append(k1, v1)
    want_k[:, :3], want_v[:, :3] = k1, v1
    # A left-padded chunk: row 0 writes 2 tokens, row 1 none, row 2 the last one.
    k2, v2 = rand(3, (B, 2, Hk, D)), rand(4, (B, 2, Hk, D))
    cache = cache.append(k2, v2, num_new=jnp.array([2, 0, 1], jnp.int32))
    want_k[0, 3:5], want_v[0, 3:5] = k2[0], v2[0]
    want_k[2, 3], want_v[2, 3] = k2[2, 1], v2[2, 1]
    assert cache.lengths.tolist() == [5, 3, 4]
    _close(cache.key, want_k)
    _close(cache.value, want_v)
    q = rand(5, (B, 4, 2, D))
    out, lse = cache.attend(q, return_lse=True, implementation="xla")
    r_out, r_lse = paged_oracle(q, want_k, want_v, cache.lengths)
    _close(out, r_out)
    _close(lse, r_lse)
    cache = cache.release(jnp.array([False, True, False]))
    assert cache.lengths.tolist() == [5, 0, 4]


def test_paged_cache_appends_cross_page_boundaries():
    B, Hk, D, ps = 2, 1, 4, 5
    cache = PagedKVCache.create(B, num_pages=9, page_size=ps, max_pages_per_seq=4, num_kv_heads=Hk, head_dim=D,
                                dtype=jnp.float64)  # fmt: skip
    want_k, want_v = np.full((B, 20, Hk, D), np.nan), np.full((B, 20, Hk, D), np.nan)
    n = np.zeros(B, int)
    append = jax.jit(lambda c, k, v, m: c.append(k, v, num_new=m))
    for i, (T, num_new) in enumerate([(3, None), (4, None), (7, [7, 2]), (1, None), (2, [0, 2])]):
        k, v = rand(10 + i, (B, T, Hk, D)), rand(20 + i, (B, T, Hk, D))
        cache = append(cache, k, v, jnp.asarray([T] * B if num_new is None else num_new, jnp.int32))
        for b in range(B):
            m = T if num_new is None else num_new[b]
            want_k[b, n[b] : n[b] + m], want_v[b, n[b] : n[b] + m] = k[b, T - m :], v[b, T - m :]
            n[b] += m
        assert cache.lengths.tolist() == n.tolist()
        _check_allocator(cache)
    got_k, got_v = _paged_contents(cache)
    for b in range(B):
        _close(got_k[b, : n[b]], want_k[b, : n[b]])
        _close(got_v[b, : n[b]], want_v[b, : n[b]])
    q = rand(30, (B, 2, 3, D))
    out, lse = jit_paged(implementation="xla")(q, cache.k_pages, cache.v_pages, cache.block_tables, cache.lengths)
    r_out, r_lse = paged_oracle(q, np.nan_to_num(want_k), np.nan_to_num(want_v), cache.lengths)
    _close(out, r_out)
    _close(lse, r_lse)


def test_release_returns_pages_and_they_are_reused():
    B, Hk, D, ps = 3, 2, 4, 2
    cache = PagedKVCache.create(B, num_pages=10, page_size=ps, max_pages_per_seq=4, num_kv_heads=Hk, head_dim=D,
                                dtype=jnp.float64)  # fmt: skip
    k, v = rand(40, (B, 5, Hk, D)), rand(41, (B, 5, Hk, D))
    cache = cache.append(k, v)  # 3 pages per row: 9 of 10
    assert int(cache.num_free) == 1
    with pytest.raises(ValueError, match="out of pages: this append needs 3 new pages but only 1 are free"):
        cache.append(k[:, :2], v[:, :2])
    freed = set(np.asarray(cache.block_tables[1]).tolist())
    cache = cache.release(jnp.array([False, True, False]))
    _check_allocator(cache)
    assert int(cache.num_free) == 4 and cache.lengths.tolist() == [5, 0, 5]
    k2, v2 = rand(42, (B, 2, Hk, D)), rand(43, (B, 2, Hk, D))
    cache = cache.append(k2, v2)  # rows 0 and 2 cross into a 4th page; row 1 restarts on a freed page
    _check_allocator(cache)
    assert int(cache.num_free) == 1
    assert set(np.asarray(cache.block_tables).ravel().tolist()) >= freed - {-1}
    want_k = np.concatenate([k, k2], axis=1)
    want_v = np.concatenate([v, v2], axis=1)
    want_k[1, :2], want_v[1, :2] = k2[1], v2[1]  # row 1 holds only its new tokens, at positions 0 and 1
    q = rand(44, (B, 4, 1, D))
    out, lse = cache.attend(q, return_lse=True, implementation="xla")
    r_out, r_lse = paged_oracle(q, want_k, want_v, cache.lengths)
    _close(out, r_out)
    _close(lse, r_lse)


def test_overflow_eager_errors_and_nan_under_jit():
    k, v = rand(50, (2, 3, 1, 4)), rand(51, (2, 3, 1, 4))
    kv = KVCache.create(2, 4, 1, 4, jnp.float64).append(k, v)
    with pytest.raises(ValueError, match="cache overflow: row 0 holds 3 tokens and appending 2 more needs 5"):
        kv.append(k[:, :2], v[:, :2])
    paged = PagedKVCache.create(2, 8, 2, 2, 1, 4, jnp.float64).append(k, v)
    with pytest.raises(ValueError, match=r"max_pages_per_seq \* page_size = 2 \* 2"):
        paged.append(k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match=r"the new `key` must have shape \[batch, num_new_tokens"):
        paged.append(k[:1], v[:1])
    with pytest.raises(ValueError, match=r"`num_new` entries must lie in \[0, 3\]"):
        paged.append(k, v, num_new=jnp.array([4, 0], jnp.int32))
    # Under jit nothing can raise: the overflowing rows attend to NaN, the others stay exact.
    q = rand(52, (2, 2, 1, 4))

    @jax.jit
    def step(cache, k, v, q):
        cache = cache.append(k, v, num_new=jnp.array([1, 0], jnp.int32))
        return cache, cache.attend(q, implementation="xla")

    one = jnp.array([1, 0], jnp.int32)
    for cache in (kv, paged):
        cache = cache.append(k[:, :1], v[:, :1], num_new=one)  # row 0 full: 4 of 4
        cache, out = step(cache, k[:, :1], v[:, :1], q)  # row 0 overflows, row 1 appends nothing
        assert np.all(np.isnan(np.asarray(out[0])))
        want, _ = paged_oracle(q[1:], k[1:], v[1:], jnp.array([3]))
        _close(out[1:], want)


def test_out_of_pages_under_jit_gives_nan_rows():
    k, v = rand(55, (2, 3, 1, 4)), rand(56, (2, 3, 1, 4))
    cache = PagedKVCache.create(2, 3, 2, 4, 1, 4, jnp.float64)
    cache, out = jax.jit(lambda c, q: (lambda c: (c, c.attend(q, implementation="xla")))(c.append(k, v)))(
        cache, rand(57, (2, 2, 1, 4))
    )
    assert int(cache.num_free) == 3  # 4 pages needed, 3 free: nothing taken
    assert np.all(np.isnan(np.asarray(out)))
    # With enough pages the same step is exact.
    big = PagedKVCache.create(2, 4, 2, 4, 1, 4, jnp.float64)
    q = rand(58, (2, 2, 1, 4))
    out = jax.jit(lambda c, q: c.append(k, v).attend(q, implementation="xla"))(big, q)
    _close(out, paged_oracle(q, k, v, jnp.array([3, 3]))[0])


def _hlo_full_copies(compiled_text: str, shape: str) -> list[str]:
    """Instructions that copy or convert a whole cache buffer."""
    pat = re.compile(rf"= \w+\[{shape}\]\S* (copy|convert|copy-start)\(")
    return [line.strip()[:120] for line in compiled_text.splitlines() if pat.search(line)]


def test_append_is_in_place_under_donation():
    k = rand(60, (4, 1, 2, 64), jnp.float32)
    caches = {
        "4,4096,2,64": KVCache.create(4, 4096, 2, 64, jnp.float32),
        "512,16,2,64": PagedKVCache.create(4, 512, 16, 256, 2, 64, jnp.float32),
    }
    for shape, cache in caches.items():
        fn = jax.jit(lambda c, k, v: c.append(k, v), donate_argnums=0)
        text = fn.lower(cache, k, k).compile().as_text()
        assert "input_output_alias={ {0}: (0, {}, may-alias), {1}: (1, {}, may-alias)" in text
        assert _hlo_full_copies(text, shape) == []
        new = fn(cache, k, k)
        assert jax.tree_util.tree_leaves(cache)[0].is_deleted()  # the buffers were donated
        q = rand(61, (4, 2, 1, 64), jnp.float32)
        want, _ = paged_oracle(q, k, k, jnp.ones((4,), jnp.int32))
        _close(new.attend(q, implementation="xla"), want, atol=1e-5)


@pytest.mark.parametrize("paged", [True, False])
def test_serving_loop_prefill_then_decode_equals_full_forward(paged):
    """Prefill 5 tokens, then 8 jitted decode steps with a donated cache: equals one causal forward."""
    B, H, Hk, D, S, P0 = 2, 4, 2, 8, 13, 5
    q, k, v = rand(70, (B, H, S, D)), rand(71, (B, Hk, S, D)), rand(72, (B, Hk, S, D))
    mod = alibi_mod(H)
    full = attention_reference(q, k, v, score_mod=compose_score_mods(causal_mod(), mod))
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # the cache layout [B, S, Hk, D]
    if paged:
        cache = PagedKVCache.create(B, num_pages=11, page_size=3, max_pages_per_seq=5, num_kv_heads=Hk, head_dim=D,
                                    dtype=jnp.float64)  # fmt: skip
    else:
        cache = KVCache.create(B, 16, Hk, D, jnp.float64)

    def step(cache, q, k, v):
        cache = cache.append(k, v)
        return cache, cache.attend(q, score_mod=mod, implementation="xla")

    cache, out = step(cache, q[:, :, :P0], kt[:, :P0], vt[:, :P0])
    outs = [out]
    decode = jax.jit(step, donate_argnums=0)
    for t in range(P0, S):
        cache, out = decode(cache, q[:, :, t : t + 1], kt[:, t : t + 1], vt[:, t : t + 1])
        outs.append(out)
    assert cache.lengths.tolist() == [S, S]
    _close(jnp.concatenate(outs, axis=2), full)
    if paged:
        _check_allocator(cache)
        assert np.any(np.diff(np.asarray(cache.block_tables[0])) != 1)  # the rows' pages interleave in the pool


def test_multihead_attention_decode_with_paged_cache_matches_full_forward():
    """Flax decode mode on a paged cache (GQA, RoPE, ALiBi + window): equals the oracle forward."""
    mod = compose_score_mods(causal_mod(), alibi_mod(4), sliding_window_mod(6))
    attn = attnax.MultiHeadAttention(nnx.Rngs(0), num_heads=4, num_kv_heads=2, in_features=16, score_mod=mod,
                                     rope=True, attention_fn=attention_reference, param_dtype=jnp.float64)  # fmt: skip
    x = rand(80, (2, 9, 16))
    full = attn(x)
    attn.init_cache(batch_size=2, max_length=12, page_size=3, num_pages=7)
    assert isinstance(attn.cache, attnax.nn.PagedDecodeCache)
    step = nnx.jit(lambda m, t: m(t, decode=True))
    outs = [attn(x[:, :4], decode=True)] + [step(attn, x[:, t : t + 1]) for t in range(4, 9)]
    _close(jnp.concatenate(outs, axis=1), full, atol=1e-9)
    assert attn.cache.position.tolist() == [9, 9]
    attn.cache.release(jnp.array([True, False]))
    assert attn.cache.position.tolist() == [0, 9] and int(attn.cache.num_free[...]) == 4  # 3 of 7 pages held
    with pytest.raises(NotImplementedError, match="dense `mask=`"):
        attn(x[:, :1], decode=True, mask=jnp.ones((1, 1, 1, 1), bool))
