"""paged_attention: XLA path and the Pallas Mosaic GPU kernel (GPU interpret mode) vs the float64 oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.cache import KVCache
from attnax.kernels import (
    PagedAttentionConfig,
    alibi_mod,
    compose_score_mods,
    document_mask_mod,
    paged_attention,
    sliding_window_mod,
    softcap_mod,
)
from attnax.kernels._paged import combine_splits, default_num_splits

try:
    from paged_helpers import assert_close, jit_paged, paged_oracle, rand, random_paged, unused_pages_to_minus_one
except ImportError:  # tests/ imported as a package
    from tests.paged_helpers import (
        assert_close,
        jit_paged,
        paged_oracle,
        rand,
        random_paged,
        unused_pages_to_minus_one,
    )


# --- XLA path, float64 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "page_size, H, Hk, T, lengths",
    [
        (1, 4, 2, 1, [7, 1, 12]),  # one token per page
        (5, 3, 1, 1, [13, 5, 0]),  # odd page size, MQA, an empty row
        (16, 2, 2, 4, [40, 4, 23]),  # a chunk of 4 new tokens per row
        (5, 4, 2, 3, [21, 9, 3]),  # chunk crossing page boundaries
    ],
)
def test_xla_matches_oracle(page_size, H, Hk, T, lengths):
    seed = 10 * page_size + T
    lengths = jnp.asarray(lengths, jnp.int32)
    k, v, kp, vp, tables = random_paged(seed, B=3, Hk=Hk, D=8, Dv=6, capacity=41, page_size=page_size)
    tables = unused_pages_to_minus_one(tables, lengths, page_size)
    q = rand(seed + 7, (3, H, T, 8))
    got = jit_paged(implementation="xla")(q, kp, vp, tables, lengths)
    assert got[0].dtype == jnp.float64 and got[0].shape == (3, H, T, 6)
    assert_close(got, paged_oracle(q, k, v, lengths), atol=1e-10, lse_atol=1e-10)
    for b in np.flatnonzero(np.asarray(lengths) == 0):  # an empty row: output 0, LSE -inf
        assert np.all(np.asarray(got[0][b]) == 0.0) and np.all(np.isneginf(np.asarray(got[1][b])))


@pytest.mark.parametrize(
    "name",
    ["alibi", "window", "softcap_window", "documents", "mask_mod"],
)
def test_xla_mods_see_absolute_positions(name):
    B, H, Hk, T, ps, cap = 2, 4, 2, 2, 5, 30
    lengths = jnp.array([27, 11], jnp.int32)
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 4, (B, cap)), axis=1), jnp.int32)
    score_mod, mask_mod = {
        "alibi": (alibi_mod(H), None),
        "window": (sliding_window_mod(6), None),
        "softcap_window": (compose_score_mods(softcap_mod(1.5), sliding_window_mod((4, 0))), None),
        "documents": (document_mask_mod(ids), None),
        "mask_mod": (None, lambda b, h, q, kv: (kv % 3 != 1) | (kv == q)),
    }[name]
    k, v, kp, vp, tables = random_paged(21, B=B, Hk=Hk, D=8, capacity=cap, page_size=ps)
    q = rand(22, (B, H, T, 8))
    got = jit_paged(score_mod=score_mod, mask_mod=mask_mod, implementation="xla")(q, kp, vp, tables, lengths)
    assert_close(got, paged_oracle(q, k, v, lengths, score_mod=score_mod, mask_mod=mask_mod), atol=1e-10,
                 lse_atol=1e-10)  # fmt: skip


def test_paged_equals_contiguous_equals_oracle():
    B, Hk, D, S = 2, 2, 8, 24
    lengths = jnp.array([19, 6], jnp.int32)
    k, v = rand(30, (B, S, Hk, D)), rand(31, (B, S, Hk, D))
    contiguous = KVCache(key=k, value=v, lengths=lengths)
    _, _, kp, vp, tables = random_paged(30, B=B, Hk=Hk, D=D, capacity=S, page_size=4)
    # random_paged draws the same k, v for the same seed: the paged cache holds the same tokens.
    q = rand(32, (B, 4, 1, D))
    want = paged_oracle(q, k, v, lengths)
    a = contiguous.attend(q, return_lse=True, implementation="xla")
    b = jit_paged(implementation="xla")(q, kp, vp, tables, lengths)
    assert_close(a, want, atol=1e-10, lse_atol=1e-10)
    assert_close(b, want, atol=1e-10, lse_atol=1e-10)


def test_jit_new_lengths_and_tables_do_not_retrace():
    traces = []

    @jax.jit
    def f(q, kp, vp, t, n):
        traces.append(1)
        return paged_attention(q, kp, vp, t, n, return_lse=True, implementation="xla")

    k, v, kp, vp, tables = random_paged(40, B=2, Hk=1, D=4, capacity=12, page_size=3)
    q = rand(41, (2, 2, 1, 4))
    for lengths in ([5, 12], [1, 7]):
        lengths = jnp.asarray(lengths, jnp.int32)
        assert_close(f(q, kp, vp, tables[::-1][::-1], lengths), paged_oracle(q, k, v, lengths), atol=1e-10)
    assert len(traces) == 1


def test_jit_bad_rows_are_nan_others_exact():
    k, v, kp, vp, tables = random_paged(50, B=3, Hk=1, D=4, capacity=8, page_size=4)
    tables = tables.at[2, 1].set(-1)  # row 2 uses its 2nd page: missing
    lengths = jnp.array([9, 6, 7], jnp.int32)  # row 0 past capacity
    q = rand(51, (3, 1, 1, 4))
    out = jax.jit(lambda *a: paged_attention(*a, implementation="xla"))(q, kp, vp, tables, lengths)
    assert np.all(np.isnan(np.asarray(out[0]))) and np.all(np.isnan(np.asarray(out[2])))
    want, _ = paged_oracle(q[1:2], k[1:2], v[1:2], lengths[1:2])
    np.testing.assert_allclose(np.asarray(out[1:2]), np.asarray(want), atol=1e-10)


def test_errors():
    k, v, kp, vp, tables = random_paged(60, B=2, Hk=2, D=4, capacity=8, page_size=4)
    q = rand(61, (2, 4, 1, 4))
    n = jnp.array([3, 8], jnp.int32)
    # sanity: the valid call matches the oracle
    assert_close(paged_attention(q, kp, vp, tables, n, return_lse=True, implementation="xla"),
                 paged_oracle(q, k, v, n), atol=1e-10)  # fmt: skip
    with pytest.raises(ValueError, match=r"`lengths\[1\]` = 9 is out of range.*2 \* 4 = 8"):
        paged_attention(q, kp, vp, tables, jnp.array([3, 9]))
    with pytest.raises(ValueError, match=r"`lengths\[0\]` = -1"):
        paged_attention(q, kp, vp, tables, jnp.array([-1, 3]))
    with pytest.raises(ValueError, match=r"`block_tables\[1, 1\]` = -1 is not a page"):
        paged_attention(q, kp, vp, tables.at[1, 1].set(-1), n)
    with pytest.raises(ValueError, match="block table is too small: 9 new tokens"):
        paged_attention(rand(62, (2, 4, 9, 4)), kp, vp, tables, n)
    with pytest.raises(ValueError, match=r"`num_heads` \(3\) must be a multiple of `num_kv_heads` \(2\)"):
        paged_attention(q[:, :3], kp, vp, tables, n)
    with pytest.raises(ValueError, match="one row per batch entry"):
        paged_attention(q, kp, vp, tables[:1], n)
    with pytest.raises(TypeError, match="share one dtype"):
        paged_attention(q.astype(jnp.float32), kp, vp, tables, n)
    with pytest.raises(TypeError, match="`block_tables` must be an integer array"):
        paged_attention(q, kp, vp, tables.astype(jnp.float32), n)
    with pytest.raises(ValueError, match="`implementation` must be None, 'pallas' or 'xla'"):
        paged_attention(q, kp, vp, tables, n, implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="needs an NVIDIA GPU.*implementation='xla'"):
            paged_attention(q, kp, vp, tables, n, implementation="pallas")
    _, _, kp, vp, tables = random_paged(63, B=2, Hk=2, D=64, capacity=8, page_size=4, dtype=jnp.bfloat16)
    q = rand(64, (2, 4, 1, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="page_size must be a multiple of 8; got 4"):
        paged_attention(q, kp, vp, tables, n, interpret=True)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    with pytest.raises(NotImplementedError, match="bfloat16/float16"):
        paged_attention(f32(q), f32(kp), f32(vp), tables, n, interpret=True)


def test_split_heuristic_and_combine():
    # Fill the 132 SMs of an H100: B=8 x 8 kv heads -> 2 splits; B=32 -> none; B=1 -> many.
    assert default_num_splits(64, 256, 132) == 2
    assert default_num_splits(256, 64, 132) == 1
    assert 8 <= default_num_splits(8, 1024, 132) <= 17
    assert default_num_splits(8, 4, 132) == 1  # too short to split
    # Combining split results by their LSEs equals attention over all keys at once.
    q, k, v = rand(70, (1, 2, 3, 4)), rand(71, (1, 2, 12, 4)), rand(72, (1, 2, 12, 4))
    from attnax.reference import attention_reference

    parts = [attention_reference(q, k[:, :, s], v[:, :, s], return_lse=True) for s in (slice(0, 5), slice(5, 12))]
    out = jnp.stack([p[0] for p in parts], axis=2)  # [1, 2, NS, 3, 4]
    lse = jnp.stack([p[1] for p in parts], axis=2)
    got = combine_splits(out, lse)
    assert_close(got, attention_reference(q, k, v, return_lse=True), atol=1e-12, lse_atol=1e-12)


# --- the Pallas kernel in GPU interpret mode (bfloat16; slow: small shapes) -------------------------------------

bf16 = jnp.bfloat16


def _pallas_case(seed, *, B, H, Hk, T, D, ps, cap, lengths, config, score_mod=None, mask_mod=None):
    lengths = jnp.asarray(lengths, jnp.int32)
    k, v, kp, vp, tables = random_paged(seed, B=B, Hk=Hk, D=D, capacity=cap, page_size=ps, dtype=bf16)
    tables = unused_pages_to_minus_one(tables, lengths, ps)
    q = rand(seed + 9, (B, H, T, D), bf16)
    got = paged_attention(q, kp, vp, tables, lengths, score_mod=score_mod, mask_mod=mask_mod, return_lse=True,
                          implementation="pallas", interpret=True, config=config)  # fmt: skip
    assert got[0].dtype == bf16 and got[0].shape == (B, H, T, D)
    assert_close(got, paged_oracle(q, k, v, lengths, score_mod=score_mod, mask_mod=mask_mod), atol=2e-2,
                 lse_atol=2e-3)  # fmt: skip


def test_pallas_decode_gqa_splits_small_pages_alibi_documents():
    """T=1, 2 query heads per kv head, 16-token pages (4 TMA copies per stage), 2 splits, ragged rows.

    ALiBi depends on the head (evaluated per head of the packed rows); the
    document mask indexes its ids by the (uniform) query position and hides an
    island of keys, so a split visits full blocks, then partial ones, through
    a 2-stage ring that refills.
    """
    ids = np.zeros((2, 448), np.int32)
    ids[0, 100:140] = 5
    _pallas_case(
        80, B=2, H=4, Hk=2, T=1, D=64, ps=16, cap=448, lengths=[400, 37],
        config=PagedAttentionConfig(block_kv=64, num_stages=2, num_splits=2),
        score_mod=compose_score_mods(alibi_mod(4), softcap_mod(5.0)), mask_mod=document_mask_mod(ids).mask_mod,
    )  # fmt: skip


def test_pallas_chunk_large_pages_sliding_window():
    """T=3 new tokens per row (causal among them), pages larger than a stage (sub-page copies), a window."""
    _pallas_case(
        90, B=2, H=2, Hk=1, T=3, D=64, ps=128, cap=256, lengths=[200, 3],
        config=PagedAttentionConfig(block_kv=64, num_splits=2), score_mod=sliding_window_mod(70),
    )  # fmt: skip


def test_pallas_contiguous_cache_many_rows():
    """A contiguous cache (trivial block table); 2 heads x 40 tokens = 80 rows: two row blocks per kv head.

    No mask mod: the blocks to visit follow from the lengths; 5 blocks stream
    through a 2-stage ring.
    """
    B, Hk, D, S, T = 1, 1, 64, 320, 40
    k, v = rand(100, (B, S, Hk, D), bf16), rand(101, (B, S, Hk, D), bf16)
    lengths = jnp.array([300], jnp.int32)
    q = rand(102, (B, 2, T, D), bf16)
    cache = KVCache(key=k, value=v, lengths=lengths)
    config = PagedAttentionConfig(block_kv=64, num_stages=2, num_splits=1)
    got = cache.attend(q, return_lse=True, implementation="pallas", interpret=True, page_size=64, config=config)
    assert_close(got, paged_oracle(q, k, v, lengths), atol=2e-2, lse_atol=2e-3)
    # A mod indexing an array leaf by q_idx cannot be served when rows mix tokens: a clear error at trace time.
    with pytest.raises(NotImplementedError, match="cannot index an array leaf by q_idx"):
        cache.attend(q, score_mod=document_mask_mod(jnp.zeros((S,), jnp.int32)), implementation="pallas",
                     interpret=True)  # fmt: skip


# --- compiled on the GPU machine (skipped without a GPU) --------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "ps, T, H, Hk, D, mod",
    [
        (16, 1, 32, 8, 128, None),
        (256, 1, 8, 2, 128, "alibi_window"),
        (16, 4, 8, 2, 64, "alibi_window"),
        (32, 40, 4, 2, 128, None),  # 80 rows: two row blocks
    ],
)
def test_pallas_compiled_matches_oracle(ps, T, H, Hk, D, mod):
    score_mod = compose_score_mods(alibi_mod(H), sliding_window_mod(300)) if mod else None
    B, cap = 3, 2048
    lengths = jnp.asarray([cap, 1 + T, 1000], jnp.int32)
    k, v, kp, vp, tables = random_paged(110 + ps + T, B=B, Hk=Hk, D=D, capacity=cap, page_size=ps, dtype=bf16)
    tables = unused_pages_to_minus_one(tables, lengths, ps)
    q = rand(120 + T, (B, H, T, D), bf16)
    got = jit_paged(score_mod=score_mod, implementation="pallas")(q, kp, vp, tables, lengths)
    assert_close(got, paged_oracle(q, k, v, lengths, score_mod=score_mod), atol=2e-2, lse_atol=2e-3)
