"""Ring attention on 8 CPU devices, against the dense oracle (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attnax.kernels import (
    MemoryEfficientConfig,
    _memory_efficient,
    _ring,
    _ring_mesh,
    additive_bias_mod,
    alibi_mod,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    ring_attention,
    ring_attention_reference,
    ring_block_counts,
    sliding_window_mod,
    softcap_mod,
    zigzag_permutation,
    zigzag_shard,
    zigzag_unshard,
)
from attnax.reference import attention_reference

pytestmark = pytest.mark.xdist_group("ring")  # one worker compiles the 8-device programs

N = 8
SEQ = P(None, None, "sp")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N,), ("sp",))  # explicit axes (the jax default)


@pytest.fixture(scope="module")
def auto_mesh():
    return jax.make_mesh((N,), ("sp",), axis_types=(AxisType.Auto,))


def _qkv(seed, B=2, H=2, Hk=2, T=64, S=None, D=8):
    S = T if S is None else S
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, H, T, D), jnp.float64),
        jax.random.normal(kk, (B, Hk, S, D), jnp.float64),
        jax.random.normal(kv, (B, Hk, S, D), jnp.float64),
    )


def _with_grads(fn):
    """``(out, lse), grads``: the VJP of ``fn`` for cotangents ``cts``, in one jitted program."""

    def run(args, cts):
        (out, lse), vjp = jax.vjp(fn, *args)
        return (out, lse), vjp((cts[0], jnp.where(jnp.isfinite(lse), cts[1], 0.0)))

    return jax.jit(run)


def _compare(ring_fn, ref_fn, args, seed=0, atol=1e-9):
    """Forward (out, lse) and the VJP for random cotangents of both, ring vs oracle."""
    out_shape = jax.eval_shape(ref_fn, *args)
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    cts = tuple(jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip((k1, k2), out_shape))
    (out, lse), got = _with_grads(ring_fn)(args, cts)
    (out_r, lse_r), want = _with_grads(ref_fn)(args, cts)
    out, lse = np.asarray(out), np.asarray(lse)
    np.testing.assert_allclose(out, out_r, atol=atol, rtol=0)
    np.testing.assert_allclose(lse, lse_r, atol=atol, rtol=0)  # -inf rows must match too
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        if jnp.issubdtype(w.dtype, jnp.inexact):
            assert np.all(np.isfinite(g))
            np.testing.assert_allclose(g, w, atol=atol, rtol=0)
    return out, lse


def _on_shards(fn, mesh, layout, T, S, check_vma=True):
    """Calls ``fn(q, k, v, *rest)`` inside shard_map on natural-order global q/k/v (rest replicated)."""
    perm_q = zigzag_permutation(T, N) if layout == "zigzag" else np.arange(T)
    perm_k = zigzag_permutation(S, N) if layout == "zigzag" else np.arange(S)
    inv = np.argsort(perm_q)

    def wrapped(q, k, v, *rest):
        q, k, v = q[:, :, perm_q], k[:, :, perm_k], v[:, :, perm_k]
        out, lse = jax.shard_map(
            fn, mesh=mesh, in_specs=(SEQ, SEQ, SEQ) + (P(),) * len(rest), out_specs=(SEQ, SEQ), check_vma=check_vma
        )(q, k, v, *rest)
        return out[:, :, inv], lse[:, :, inv]

    return wrapped


def test_mesh_no_mask(mesh):
    q, k, v = _qkv(0)
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", return_lse=True)
    ref = lambda q, k, v: attention_reference(q, k, v, return_lse=True)
    _compare(ring, ref, (q, k, v))


def test_mesh_causal_auto_mesh(auto_mesh):
    q, k, v = _qkv(1)
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=auto_mesh, seq_axis="sp", score_mod=causal_mod(),
                                          return_lse=True)  # fmt: skip
    ref = lambda q, k, v: attention_reference(q, k, v, score_mod=causal_mod(), return_lse=True)
    _compare(ring, ref, (q, k, v))


def test_shard_map_sliding_window_multi_tile(auto_mesh):
    # Chunks of 8 positions with inner tiles of 4: the inner kernel loops too.
    T = 128
    q, k, v = _qkv(2, T=T)
    mod = sliding_window_mod((6, 2))
    cfg = MemoryEfficientConfig(block_q=4, block_kv=4)
    local = lambda q, k, v: ring_attention(q, k, v, axis_name="sp", score_mod=mod, return_lse=True, config=cfg)
    ref = lambda q, k, v: attention_reference(q, k, v, score_mod=mod, return_lse=True)
    _compare(_on_shards(local, auto_mesh, "zigzag", T, T), ref, (q, k, v))


def test_alibi_causal_gradient_reaches_slopes(mesh):
    q, k, v = _qkv(3, H=4)
    slopes = jax.random.uniform(jax.random.key(33), (4,), jnp.float64, 0.05, 0.5)
    mods = lambda s: compose_score_mods(causal_mod(), alibi_mod(slopes=s), softcap_mod(3.0))
    ring = lambda q, k, v, s: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", score_mod=mods(s), return_lse=True)
    ref = lambda q, k, v, s: attention_reference(q, k, v, score_mod=mods(s), return_lse=True)
    _compare(ring, ref, (q, k, v, slopes))


def _segment_ids(seed, B, T, n_docs=5):
    cuts = jnp.sort(jax.random.randint(jax.random.key(seed), (B, n_docs - 1), 1, T), axis=-1)
    return jnp.sum(jnp.arange(T)[None, None, :] >= cuts[:, :, None], axis=1).astype(jnp.int32)


def test_mesh_documents_causal(mesh):
    q, k, v = _qkv(4)
    ids = _segment_ids(44, 2, 64)
    mods = compose_score_mods(causal_mod(), document_mask_mod(ids))
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", score_mod=mods, return_lse=True)
    ref = lambda q, k, v: attention_reference(q, k, v, score_mod=mods, return_lse=True)
    _compare(ring, ref, (q, k, v))


def test_shard_map_gqa_causal_contiguous_custom_inner(auto_mesh):
    q, k, v = _qkv(5, H=4, Hk=2)
    local = lambda q, k, v: ring_attention(q, k, v, axis_name="sp", layout="contiguous", inner=_memory_efficient,
                                           score_mod=causal_mod(), return_lse=True)  # fmt: skip
    ref = lambda q, k, v: attention_reference(q, k, v, score_mod=causal_mod(), return_lse=True)
    _compare(_on_shards(local, auto_mesh, "contiguous", 64, 64), ref, (q, k, v))


@pytest.mark.parametrize(
    "T,S,causal",
    [(50, 50, True), (40, 72, False)],
    ids=["uneven-causal", "cross-uneven"],
)
def test_mesh_uneven_lengths_are_padded(mesh, T, S, causal):
    q, k, v = _qkv(6, T=T, S=S)
    off = S - T if causal else 0
    kw = dict(score_mod=causal_mod() if causal else None, q_offset=off, return_lse=True)
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", **kw)
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)
    out, _ = _compare(ring, ref, (q, k, v))
    assert out.shape == (2, 2, T, 8)


def test_shard_map_q_offset_cross_lengths(auto_mesh):
    q, k, v = _qkv(7, T=32, S=48)
    local = lambda q, k, v: ring_attention(q, k, v, axis_name="sp", score_mod=causal_mod(), q_offset=16,
                                           return_lse=True)  # fmt: skip
    ref = lambda q, k, v: attention_reference(q, k, v, score_mod=causal_mod(), q_offset=16, return_lse=True)
    _compare(_on_shards(local, auto_mesh, "zigzag", 32, 48), ref, (q, k, v))


def test_2d_mesh_batch_axis_per_batch_documents_and_q_offsets():
    mesh = jax.make_mesh((2, 4), ("dp", "sp"))
    q, k, v = _qkv(8, B=4, T=32, S=48)
    ids = _segment_ids(88, 4, 48, n_docs=3)  # differ per batch row: mods must see the global b
    mods = compose_score_mods(causal_mod(), document_mask_mod(ids))
    kw = dict(score_mod=mods, q_offset=jnp.array([0, 5, 9, 16], jnp.int32), return_lse=True)
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", batch_axis="dp", **kw)
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)
    _compare(ring, ref, (q, k, v))


def test_3d_mesh_batch_and_head_axes_alibi_gqa():
    mesh = jax.make_mesh((2, 2, 2), ("dp", "tp", "sp"))
    q, k, v = _qkv(9, B=2, H=4, Hk=2, T=32)
    slopes = jax.random.uniform(jax.random.key(99), (4,), jnp.float64, 0.05, 0.5)
    mods = lambda s: compose_score_mods(causal_mod(), alibi_mod(slopes=s))  # slopes[h]: global h needed
    ring = lambda q, k, v, s: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", batch_axis="dp", head_axis="tp",
                                             score_mod=mods(s), return_lse=True)  # fmt: skip
    ref = lambda q, k, v, s: attention_reference(q, k, v, score_mod=mods(s), return_lse=True)
    _compare(ring, ref, (q, k, v, slopes))


def test_shard_map_without_vma_checks_sums_bias_gradient_once(auto_mesh):
    q, k, v = _qkv(10, T=32)
    bias = jax.random.normal(jax.random.key(1010), (1, 2, 32, 32), jnp.float64)
    local = lambda q, k, v, b: ring_attention(q, k, v, axis_name="sp", layout="contiguous",
                                              score_mod=additive_bias_mod(b), return_lse=True)  # fmt: skip
    ref = lambda q, k, v, b: attention_reference(q, k, v, score_mod=additive_bias_mod(b), return_lse=True)
    _compare(_on_shards(local, auto_mesh, "contiguous", 32, 32, check_vma=False), ref, (q, k, v, bias))


def test_fully_masked_rows_give_zeros_not_nan(mesh):
    q, k, v = _qkv(11)
    mask_mod = lambda b, h, q_idx, kv_idx: (q_idx % 5 != 0) & (kv_idx <= q_idx)
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", mask_mod=mask_mod, return_lse=True)
    ref = lambda q, k, v: attention_reference(q, k, v, mask_mod=mask_mod, return_lse=True)
    out, lse = _compare(ring, ref, (q, k, v))
    assert np.all(out[:, :, ::5] == 0) and np.all(np.isneginf(lse[:, :, ::5]))


def test_dropout_matches_oracle(mesh):
    q, k, v = _qkv(12, T=32)
    kw = dict(score_mod=causal_mod(), dropout_rate=0.25, dropout_rng=jax.random.key(7), deterministic=False,
              return_lse=True)  # fmt: skip
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", **kw)
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)
    _compare(ring, ref, (q, k, v))


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
def test_low_precision_inputs(mesh, dtype, atol):
    q, k, v = (x.astype(dtype) for x in _qkv(13))
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh, seq_axis="sp", score_mod=causal_mod(), return_lse=True)
    out, lse = jax.jit(ring)(q, k, v)
    out_r, lse_r = attention_reference(
        *(x.astype(jnp.float64) for x in (q, k, v)), score_mod=causal_mod(), return_lse=True
    )
    assert out.dtype == dtype and lse.dtype == jnp.float32  # accumulation and merge in float32
    np.testing.assert_allclose(np.asarray(out, np.float64), out_r, atol=atol)
    np.testing.assert_allclose(lse, lse_r, atol=atol)


def test_causal_load_balance():
    zig = ring_block_counts(64, N, score_mod=causal_mod())
    contig = ring_block_counts(64, N, score_mod=causal_mod(), layout="contiguous")
    assert zig.tolist() == [2 * N + 1] * N
    assert contig.tolist() == [4 * i + 3 for i in range(N)]
    assert zig.sum() == contig.sum()  # the same work, spread evenly
    assert ring_block_counts(64, N).tolist() == [4 * N] * N  # no mask: nothing skipped
    # Two documents of 32 tokens: a chunk pair is computed only within a document.
    halves = document_mask_mod(jnp.repeat(jnp.arange(2, dtype=jnp.int32), 32))
    assert ring_block_counts(64, N, score_mod=halves).sum() == 2 * 8 * 8
    # A window of 4 over chunks of 4: each query chunk sees at most its own and the previous key chunk.
    assert ring_block_counts(64, N, score_mod=sliding_window_mod(4)).max() <= 4


def test_kernel_skips_the_blocks_it_reports(auto_mesh):
    q, k, v = _qkv(14, B=1, H=1, Hk=1, T=64)
    for layout in ("zigzag", "contiguous"):
        st = _ring._RingStatic("sp", layout, _memory_efficient, 0.5, 0.0, 512, 512)

        def count(q, k, v, st=st):
            extras = _ring_mesh.local_extras(causal_mod(), None, jnp.int32(0), None)
            return _ring._ring_forward(q, k, v, extras, st)[2][None]

        got = jax.jit(jax.shard_map(count, mesh=auto_mesh, in_specs=(SEQ,) * 3, out_specs=P("sp")))(q, k, v)
        assert got.tolist() == ring_block_counts(64, N, score_mod=causal_mod(), layout=layout).tolist()


def test_reference_both_styles(mesh, auto_mesh):
    q, k, v = _qkv(15, H=4, Hk=2)
    mod = compose_score_mods(causal_mod(), alibi_mod(4))
    want, want_lse = jax.jit(lambda q, k, v: attention_reference(q, k, v, score_mod=mod, return_lse=True))(q, k, v)
    on_mesh = jax.jit(lambda q, k, v: ring_attention_reference(q, k, v, mesh=mesh, seq_axis="sp", score_mod=mod))
    np.testing.assert_allclose(on_mesh(q, k, v), want, atol=1e-12)
    local = lambda q, k, v: ring_attention_reference(q, k, v, axis_name="sp", score_mod=mod, return_lse=True)
    out, lse = jax.jit(_on_shards(local, auto_mesh, "zigzag", 64, 64))(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)


def test_zigzag_shard_roundtrip(auto_mesh):
    x = jax.random.normal(jax.random.key(16), (1, 2, 64, 3))
    perm = zigzag_permutation(64, N)
    f = jax.shard_map(lambda x: zigzag_shard(x, "sp"), mesh=auto_mesh, in_specs=SEQ, out_specs=SEQ)
    g = jax.shard_map(lambda x: zigzag_unshard(x, "sp"), mesh=auto_mesh, in_specs=SEQ, out_specs=SEQ)
    np.testing.assert_array_equal(jax.jit(f)(x), x[:, :, perm])
    np.testing.assert_array_equal(jax.jit(lambda x: g(f(x)))(x), x)
    assert sorted(perm.tolist()) == list(range(64))


def test_errors(mesh):
    q, k, v = _qkv(17, T=32)
    with pytest.raises(NotImplementedError, match="mask_mod"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="sp", mask=jnp.ones((32, 32), bool))
    from attnax.block_mask import create_block_mask

    bm = create_block_mask(lambda b, h, i, j: j <= i, None, None, 32, 32, block_size=8)
    with pytest.raises(NotImplementedError, match="block_mask"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="sp", block_mask=bm)
    with pytest.raises(ValueError, match="exactly one"):
        ring_attention(q, k, v)
    with pytest.raises(ValueError, match="exactly one"):
        ring_attention(q, k, v, axis_name="sp", mesh=mesh, seq_axis="sp")
    with pytest.raises(ValueError, match="not one of"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="nope")
    with pytest.raises(ValueError, match="seq_axis"):
        ring_attention(q, k, v, mesh=mesh)
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="sp", layout="spiral")
    with pytest.raises(ValueError, match="inner"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="sp", inner="nope")
    with pytest.raises(TypeError, match="inner"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="sp", inner=object())
    with pytest.raises(TypeError, match="unexpected keyword"):
        ring_attention(q, k, v, mesh=mesh, seq_axis="sp", block_size=4)
    with pytest.raises(ValueError, match="must be even"):
        jax.shard_map(lambda q: ring_attention(q, q, q, axis_name="sp"), mesh=mesh, in_specs=SEQ, out_specs=SEQ)(
            jax.reshard(q[:, :, :24], NamedSharding(mesh, SEQ))
        )
    mesh2 = jax.make_mesh((2, 4), ("dp", "sp"))
    with pytest.raises(ValueError, match="batch"):
        ring_attention(q[:1], k[:1], v[:1], mesh=mesh2, seq_axis="sp", batch_axis="dp")
    with pytest.raises(NotImplementedError, match="dropout"):
        ring_attention(q, k, v, mesh=mesh2, seq_axis="sp", batch_axis="dp", dropout_rate=0.1,
                       dropout_rng=jax.random.key(0), deterministic=False)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of 2"):
        zigzag_permutation(60, N)


def test_pallas_inner_one_device():
    """The Pallas kernel as the inner kernel: blocks at absolute q/kv offsets, merged by the ring.

    One device: GPU interpret mode simulates one kernel at a time (concurrent
    kernels on several fake devices deadlock in its shared-memory simulation),
    and the GPU machine has one GPU. The zig-zag layout still splits the
    sequence into two chunks, so blocks run with nonzero key offsets and the
    ALiBi and document mods read their leaves at global positions.
    """
    from jax.sharding import Mesh

    mesh1 = Mesh(np.array(jax.devices()[:1]), ("sp",))
    interpret = jax.default_backend() != "gpu"
    B, H, T, D = 1, 2, 96, 16
    k0, k1, k2 = jax.random.split(jax.random.key(30), 3)
    q, k, v = (jax.random.normal(kk, (B, H, T, D), jnp.bfloat16) for kk in (k0, k1, k2))
    ids = jnp.asarray(np.repeat([0, 1, 2], [30, 40, 26]))
    mod = compose_score_mods(causal_mod(), alibi_mod(H), document_mask_mod(ids))
    opts = {"interpret": True} if interpret else {}
    ring = lambda q, k, v: ring_attention(q, k, v, mesh=mesh1, seq_axis="sp", score_mod=mod, inner="pallas",
                                          return_lse=True, **opts)  # fmt: skip
    ref = lambda q, k, v: attention_reference(q, k, v, score_mod=mod, return_lse=True)
    up = lambda x: x.astype(jnp.float64)
    (out, lse), vjp = jax.vjp(jax.jit(ring), q, k, v)
    (out_r, lse_r), vjp_r = jax.vjp(ref, *map(up, (q, k, v)))
    ct = jax.random.normal(jax.random.key(31), out.shape, jnp.float32)
    got = vjp((ct.astype(out.dtype), jnp.zeros_like(lse)))
    want = vjp_r((up(ct), jnp.zeros_like(lse_r)))
    np.testing.assert_allclose(up(out), out_r, atol=2e-2, rtol=0)
    np.testing.assert_allclose(lse, lse_r, atol=1e-3, rtol=0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(up(g), w, atol=6e-2, rtol=0)
    # Dropout: each block regenerates the keep mask at its global positions.
    drop = {"dropout_rate": 0.25, "dropout_rng": jax.random.key(32), "deterministic": False}
    out_d = jax.jit(lambda q, k, v: ring_attention(q, k, v, mesh=mesh1, seq_axis="sp", score_mod=mod, inner="pallas",
                                                   **drop, **opts))(q, k, v)  # fmt: skip
    want_d = attention_reference(*map(up, (q, k, v)), score_mod=mod, **drop)
    assert not np.allclose(up(out_d), out_r, atol=2e-2)
    np.testing.assert_allclose(up(out_d), want_d, atol=2e-2, rtol=0)
    # Gradients to mod leaves: each block's kernels add its share at global positions
    # (float16: a bfloat16 output's rounding would swamp the position-weighted sums).
    qh, kh, vh = (x.astype(jnp.float16) for x in (q, k, v))
    kv_bias = jax.random.normal(jax.random.key(33), (1, 1, 1, T), jnp.float16)
    slopes = jnp.asarray([0.3, 0.7], jnp.float16)

    def leaf_loss(attend, s, kb):
        m = compose_score_mods(causal_mod(), alibi_mod(slopes=s), additive_bias_mod(kb), document_mask_mod(ids))
        out = attend(*(x.astype(s.dtype) for x in (qh, kh, vh)), score_mod=m)
        return jnp.sum(out.astype(jnp.float64 if s.dtype == jnp.float64 else jnp.float32) * ct.astype(out.dtype))

    ring_attend = lambda q, k, v, **kw: ring_attention(q, k, v, mesh=mesh1, seq_axis="sp", inner="pallas", **kw,
                                                       **opts)  # fmt: skip
    got = jax.jit(jax.grad(lambda s, kb: leaf_loss(ring_attend, s, kb), argnums=(0, 1)))(slopes, kv_bias)
    want = jax.grad(lambda s, kb: leaf_loss(attention_reference, s, kb), argnums=(0, 1))(up(slopes), up(kv_bias))
    for g, w in zip(got, want):
        assert g.dtype == jnp.float16
        np.testing.assert_allclose(up(g), w, atol=3e-2, rtol=2e-2)
    # An explicit limit of the Pallas inner kernel: no vma-checked shard_map.
    with pytest.raises(NotImplementedError, match="check_vma=False"):
        jax.shard_map(lambda q: ring_attention(q, q, q, axis_name="sp", inner="pallas", **opts), mesh=mesh1,
                      in_specs=SEQ, out_specs=SEQ)(q)  # fmt: skip
    with pytest.raises(ValueError, match="interpret"):
        ring_attention(q, k, v, mesh=mesh1, seq_axis="sp", inner="memory_efficient", interpret=True)


def test_pallas_inner_on_cpu_needs_interpret(mesh):
    q = jnp.ones((1, 1, 32, 8), jnp.bfloat16)
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the Pallas inner kernel compiles")
    with pytest.raises(NotImplementedError, match="interpret=True"):
        ring_attention(q, q, q, mesh=mesh, seq_axis="sp", inner="pallas")
