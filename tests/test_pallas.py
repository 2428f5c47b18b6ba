"""The Pallas flash kernel runs the conformance suite.

On CPU the Mosaic GPU kernels run in GPU interpret mode (barriers, TMA
copies and the warp-specialised schedule are simulated; wgmma is a plain dot).
The same class runs compiled on a GPU (marked ``gpu``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.block_mask import create_block_mask
from attnax.kernels import (
    additive_bias_mod,
    alibi_mod,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    sliding_window_mod,
    softcap_mod,
)
from attnax.kernels._pallas import pallas_flash_attention
from attnax.nn._layout import attend_btnh
from attnax.reference import attention_reference

try:
    from conformance import BF16, AttentionConformance, fast_jit, oracle, random_qkv, to64
except ImportError:  # tests/ imported as a package
    from tests.conformance import BF16, AttentionConformance, fast_jit, oracle, random_qkv, to64

_REASONS = {
    "float64": "the Mosaic GPU kernel computes in bfloat16/float16",
}


class _PallasCases(AttentionConformance):
    input_dtype = BF16
    bf16_atol = 2e-2
    bf16_grad_atol = 6e-2
    shapes = ((2, 4, 2, 37, 53, 16), (1, 2, 1, 5, 140, 8))
    supports_float64 = False
    leaf_grad_dtype = jnp.float16
    supports_vmap = True
    skip_reasons = _REASONS


# GPU interpret mode costs about a minute per conformance test on a 2-core CPU,
# too much for CI's 20 minutes in full. CI runs forward + gradients on the
# GQA/ragged shapes, every mod group (with q_offset, per-batch arrays, block
# masks), fully-masked rows, dropout against the oracle and vmap (over inputs
# and over a mod leaf); ATTNAX_PALLAS_FULL=1 runs every conformance test in
# interpret mode, and the GPU class below runs all of them compiled.
_CI_SUBSET = {
    "test_forward_and_grads", "test_mods", "test_fully_masked_rows", "test_dropout_matches_oracle", "test_vmap",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _interpret_subset(request):
    if (
        isinstance(request.instance, TestPallasInterpret)
        and request.function.__name__ not in _CI_SUBSET
        and not os.environ.get("ATTNAX_PALLAS_FULL")
    ):
        pytest.skip("slow in GPU interpret mode; runs compiled on GPU (gpu marker) or with ATTNAX_PALLAS_FULL=1")


# One or two cases per mod group in CI (about 25 s each interpreted): per-batch
# offsets and prefix lengths, a two-sided window with an offset, a 1-D leaf
# (ALiBi slopes), a 2-D leaf (a full bias: the backward's transposed twin),
# per-batch document ids for queries and keys, plain-callable masks combined,
# a block mask with a mask mod, and a [T, S] dense mask with causal and an offset.
# The GPU class and ATTNAX_PALLAS_FULL=1 run all.
_CI_MOD_CASES = {
    "masks": ["causal_per_batch_offset", "prefix_lm_per_batch"],
    "windows": ["window_left_right"],
    "score_rewrites": ["alibi", "additive_bias"],
    "documents": ["document_kv_segments"],
    "compositions": ["mask_mod_or", "mask_mod_plus_score_mod"],
    "block_mask": ["block_mask_with_offset_and_mask_mod"],
    "dense_mask": ["dense_mask_broadcast_with_causal"],
}


class TestPallasInterpret(_PallasCases):
    kernel = staticmethod(pallas_flash_attention)
    kernel_options = {"interpret": True}
    mod_shape = (2, 2, 1, 19, 27, 8)  # B = 2 for the per-batch cases; fewer heads to interpret
    shapes = ((2, 2, 1, 37, 53, 16), (1, 2, 1, 5, 140, 8))  # GQA and ragged tails, half the heads of the GPU's
    dropout_shape = (2, 2, 1, 21, 37, 8)
    mod_case_subset = None if os.environ.get("ATTNAX_PALLAS_FULL") else _CI_MOD_CASES


@pytest.mark.gpu
class TestPallasGPU(_PallasCases):
    kernel = staticmethod(pallas_flash_attention)
    shapes = ((2, 4, 2, 300, 700, 64), (1, 2, 1, 129, 1000, 128), (1, 8, 8, 256, 256, 128))


def test_empty_tiles_are_never_read():
    """Keys of tiles the mask hides entirely hold NaN: a kernel that loads them returns NaN."""
    T = S = 384
    q, k, v = random_qkv(0, 1, 1, 1, T, S, 64, dtype=jnp.bfloat16)
    # Queries at 256..383 with a 100-key window see keys >= 157: the first kv
    # tile (keys 0..127) is empty for them.
    hidden = jnp.arange(S) < 128
    k = jnp.where(hidden[:, None], jnp.nan, k)
    v = jnp.where(hidden[:, None], jnp.nan, v)
    mod = sliding_window_mod(100)
    out = pallas_flash_attention(q[:, :, 256:], k, v, score_mod=mod, q_offset=256, interpret=True)
    assert not bool(jnp.isnan(out).any())
    ref = oracle(*to64(q[:, :, 256:], jnp.nan_to_num(k), jnp.nan_to_num(v)), score_mod=mod, q_offset=256)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)


def test_block_mask_argument():
    """A user BlockMask (documents) with the kernel's tiles, forward and backward."""
    T = S = 256
    q, k, v = random_qkv(1, 2, 2, 1, T, S, 32, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.repeat([0, 1, 2], [70, 120, 66]))
    bm = create_block_mask(document_mask_mod(ids).mask_mod, None, None, T, S, block_size=(128, 128))
    f = lambda q, k, v: pallas_flash_attention(q, k, v, block_mask=bm, score_mod=causal_mod(), interpret=True)
    g = lambda q, k, v: attention_reference(q, k, v, block_mask=bm, score_mod=causal_mod())
    out, vjp = jax.vjp(f, q, k, v)
    ref, rvjp = jax.vjp(g, *to64(q, k, v))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape), jnp.bfloat16)
    for a, b in zip(vjp(ct), rvjp(to64(ct))):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, atol=8e-2)


def test_block_mask_of_other_tiles():
    """A BlockMask with tiles unlike the kernel's is reclassified from its mask mod."""
    q, k, v = random_qkv(1, 1, 2, 1, 150, 200, 32, dtype=jnp.bfloat16)
    bm = create_block_mask(sliding_window_mod((20, 5)).mask_mod, None, None, 150, 200, block_size=(32, 16), q_offset=7)
    out = pallas_flash_attention(q, k, v, block_mask=bm, q_offset=7, interpret=True)
    ref = oracle(*to64(q, k, v), block_mask=bm, q_offset=7)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)
    import dataclasses

    with pytest.raises(ValueError, match="block_size"):
        pallas_flash_attention(q, k, v, block_mask=dataclasses.replace(bm, mask_mod=None), interpret=True)


def test_float32_inputs_raise():
    q, k, v = random_qkv(1, 1, 1, 1, 64, 64, 32, dtype=jnp.float32)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        pallas_flash_attention(q, k, v, interpret=True)


def test_long_unmasked_d64_uses_256_key_tiles():
    """D <= 64 without masks over >= 2048 keys takes 256-key tiles; forward and grads still match."""
    from attnax.kernels._pallas import default_config

    assert default_config(64, kv_len=2048, masked=False).block_kv == 256
    assert default_config(64, kv_len=2048, masked=True).block_kv == 128
    assert default_config(64, kv_len=1024, masked=False).block_kv == 128
    assert default_config(128, kv_len=8192, masked=False).block_kv == 128
    assert default_config(64, kv_len=4096, masked=True, causal_only=True).block_kv == 256
    assert default_config(64, kv_len=2048, masked=True, causal_only=True).block_kv == 128
    assert default_config(128, kv_len=8192, masked=True, causal_only=True).block_kv == 128
    q, k, v = random_qkv(3, 1, 2, 1, 64, 2100, 64, dtype=jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: pallas_flash_attention(q, k, v, interpret=True), q, k, v)
    ref, rvjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v), *to64(q, k, v))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)
    ct = jnp.asarray(np.random.default_rng(4).standard_normal(out.shape), jnp.bfloat16)
    for a, b in zip(vjp(ct), rvjp(to64(ct))):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, atol=5e-2)


def test_long_causal_d64_uses_256_key_tiles(monkeypatch):
    """A plain causal mask (nothing else) over >= 4096 keys at D <= 64 takes 256-key tiles."""
    from attnax.kernels import _pallas
    from attnax.score_mods import alibi_mod, causal_mod, compose_score_mods, sliding_window_mod

    causal = causal_mod()
    assert _pallas._causal_only(causal, None, None, False)
    assert _pallas._causal_only(compose_score_mods(causal, causal_mod()), None, None, False)
    assert not _pallas._causal_only(causal, None, None, True)  # dropout
    assert not _pallas._causal_only(compose_score_mods(causal, alibi_mod(2)), None, None, False)
    assert not _pallas._causal_only(sliding_window_mod((100, 0)), None, None, False)
    assert not _pallas._causal_only(causal, lambda b, h, q, k: k >= 0, None, False)
    assert not _pallas._causal_only(None, None, None, False)
    chosen = []
    default = _pallas.default_config
    monkeypatch.setattr(_pallas, "default_config", lambda *a, **kw: chosen.append(default(*a, **kw)) or chosen[-1])
    q, k, v = random_qkv(5, 1, 2, 1, 70, 4200, 64, dtype=jnp.bfloat16)
    for mod, bkv in ((causal, 256), (sliding_window_mod((1000, 0)), 128)):
        fn = lambda q, k, v, mod=mod: pallas_flash_attention(q, k, v, score_mod=mod, q_offset=4130, interpret=True)
        jax.eval_shape(fn, q, k, v)
        assert chosen[-1].block_kv == bkv
    _check_causal_256_key_tiles(interpret=True)


@pytest.mark.gpu
def test_causal_256_key_tiles_compiled():
    """The same numbers compiled on the GPU (256-key forward tiles, a partial last tile, the backward)."""
    _check_causal_256_key_tiles(interpret=False)


def _check_causal_256_key_tiles(interpret: bool):
    """Causal with 256-key forward tiles and 300 keys: the dK/dV kernel's CTAs follow the true key length."""
    from attnax.kernels import PallasFlashConfig
    from attnax.score_mods import causal_mod

    causal = causal_mod()
    q, k, v = random_qkv(5, 1, 2, 1, 70, 300, 64, dtype=jnp.bfloat16)
    cfg = PallasFlashConfig(64, 256, 2)
    fn = lambda q, k, v: pallas_flash_attention(
        q, k, v, score_mod=causal, q_offset=230, block_sizes=cfg, interpret=interpret
    )
    out, vjp = jax.vjp(fn, q, k, v)
    ref, rvjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, score_mod=causal, q_offset=230), *to64(q, k, v))
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)
    ct = jnp.asarray(np.random.default_rng(6).standard_normal(out.shape), jnp.bfloat16)
    for a, b in zip(vjp(ct), rvjp(to64(ct))):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, atol=5e-2)


def _check_pipelined_forward(interpret: bool, shape):
    """The pipelined forward (P V of a tile in flight during the next softmax), with and without masked tiles."""
    B, H, Hk, T, S, D = shape
    q, k, v = random_qkv(11, B, H, Hk, T, S, D, dtype=jnp.bfloat16)
    drop = {"dropout_rate": 0.25, "dropout_rng": jax.random.key(5), "deterministic": False}
    cases = {
        "plain": {},
        "softcap": {"score_mod": softcap_mod(3.0)},
        "alibi": {"score_mod": alibi_mod(H)},
        "scale_and_dropout": {"scale": 0.3, **drop},
        # masked walks: full tiles first (positions searched for the transform), partial ones last
        "causal_alibi": {"score_mod": compose_score_mods(causal_mod(), alibi_mod(H)), "q_offset": 200},
        "window": {"score_mod": sliding_window_mod(300), "q_offset": 300},
    }
    for name, kw in cases.items():
        f = lambda q, k, v, kw=kw: pallas_flash_attention(q, k, v, interpret=interpret, return_lse=True, **kw)  # noqa: E731
        (out, lse), vjp = jax.vjp(f, q, k, v)
        (ref, ref_lse), rvjp = jax.vjp(
            lambda q, k, v, kw=kw: attention_reference(q, k, v, return_lse=True, **kw), *to64(q, k, v)
        )
        np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2, err_msg=name)
        np.testing.assert_allclose(np.asarray(lse, np.float64), ref_lse, atol=2e-2, err_msg=name)
        if interpret and name != "plain":  # the backward kernels are the serial ones; in CI, one check of them
            continue
        ct = jnp.asarray(np.random.default_rng(12).standard_normal(out.shape), jnp.bfloat16)
        zero = jnp.zeros_like(lse)
        for g, r, n in zip(vjp((ct, zero)), rvjp((to64(ct), to64(zero))), "qkv"):
            np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=6e-2, err_msg=f"{name} d{n}")


def test_pipelined_forward():
    """The pipelined forward with a transform, ALiBi, dropout, and masks (full tiles first, partial ones last).

    D=128: masked walks with at most 64 value columns take the serial walk.
    """
    _check_pipelined_forward(True, (1, 2, 1, 70, 384, 128))


@pytest.mark.gpu
def test_pipelined_forward_compiled():
    _check_pipelined_forward(False, (2, 4, 2, 300, 1024, 128))


def test_block_sparse_mask_without_mask_mod_skips_empty_tiles():
    """A BlockMask of full and empty tiles only (mask_mod None): the walk jumps over empty tiles in its range."""
    import dataclasses

    T, S = 200, 640
    q, k, v = random_qkv(13, 1, 2, 1, T, S, 32, dtype=jnp.bfloat16)

    def every_other(b, h, q_idx, kv_idx):  # key tiles 0, 2, 4 (and query rows see all of them)
        return (kv_idx // 128) % 2 == 0

    bm = dataclasses.replace(create_block_mask(every_other, None, None, T, S, block_size=(128, 128)), mask_mod=None)
    hidden = (jnp.arange(S) // 128) % 2 == 1
    k = jnp.where(hidden[:, None], jnp.nan, k)  # empty tiles are never read
    v = jnp.where(hidden[:, None], jnp.nan, v)
    out = pallas_flash_attention(q, k, v, block_mask=bm, interpret=True)
    ref = attention_reference(*to64(q, jnp.nan_to_num(k), jnp.nan_to_num(v)), mask_mod=every_other)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)


def test_unit_score_derivative_detects_additive_mods():
    """Additive mods skip the per-tile JVP in the backward; others keep it."""
    from attnax.kernels import additive_bias_mod, alibi_mod, compose_score_mods, softcap_mod
    from attnax.kernels._pallas_mgpu_common import unit_score_derivative

    assert unit_score_derivative(alibi_mod(4))
    assert unit_score_derivative(compose_score_mods(causal_mod(), alibi_mod(4)))
    assert unit_score_derivative(additive_bias_mod(jnp.ones((1, 1, 8, 8))))
    assert not unit_score_derivative(softcap_mod(20.0))
    assert not unit_score_derivative(compose_score_mods(alibi_mod(4), softcap_mod(20.0)))


def test_dense_mask_rows_need_a_static_q_offset():
    """A dense mask with a row per query is indexed at absolute positions: a traced q_offset raises."""
    q, k, v = random_qkv(5, 1, 1, 1, 16, 32, 16, dtype=jnp.bfloat16)
    rows = jnp.asarray(np.random.default_rng(5).random((16, 32)) < 0.5)
    f = jax.jit(lambda q, k, v, off: pallas_flash_attention(q, k, v, mask=rows, q_offset=off, interpret=True))
    with pytest.raises(NotImplementedError, match="static Python int `q_offset`"):
        f(q, k, v, jnp.int32(3))


def _check_bshd_layout(interpret: bool, shape):
    B, H, Hk, T, S, D = shape
    q, k, v = random_qkv(7, B, H, Hk, T, S, D, dtype=jnp.bfloat16)
    kw = {"score_mod": causal_mod(), "q_offset": 16, "dropout_rate": 0.2, "dropout_rng": jax.random.key(3),
          "deterministic": False}  # fmt: skip
    bshd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    f = lambda q, k, v: pallas_flash_attention(q, k, v, layout="BSHD", interpret=interpret, **kw)  # noqa: E731
    out, vjp = jax.vjp(jax.jit(f), *map(bshd, (q, k, v)))
    assert out.shape == (B, T, H, D)
    ref, rvjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), *to64(q, k, v))
    np.testing.assert_allclose(np.asarray(bshd(out), np.float64), ref, atol=2e-2)
    ct = jax.random.normal(jax.random.key(8), ref.shape, jnp.float32)
    for g, r, n in zip(vjp(bshd(ct).astype(out.dtype)), rvjp(ct.astype(jnp.float64)), "qkv"):
        np.testing.assert_allclose(np.asarray(bshd(g), np.float64), r, atol=6e-2, err_msg=f"d{n}")
    # attnax.nn hands its [B, T, H, D] projections to the kernel as they are.
    btnh = attend_btnh(pallas_flash_attention, *map(bshd, (q, k, v)), interpret=interpret, **kw)
    np.testing.assert_array_equal(np.asarray(btnh, np.float32), np.asarray(out, np.float32))
    with pytest.raises(ValueError, match="layout"):
        pallas_flash_attention(q, k, v, layout="BTHD", interpret=interpret)


def test_bshd_layout_reads_and_writes_in_place():
    """layout='BSHD': [B, S, H, D] in and out (gradients too), GQA, ragged lengths, dropout."""
    _check_bshd_layout(True, (2, 2, 1, 37, 53, 16))


@pytest.mark.gpu
def test_bshd_layout_compiled():
    _check_bshd_layout(False, (2, 4, 2, 300, 700, 64))


def test_nested_vmap_of_grad_over_per_example_mod_leaves():
    """vmap(vmap(vjp)): per-example offsets and document ids inside, ALiBi slopes outside.

    Each kernel (forward, dQ, dK/dV) is one launch over the folded batch; the
    mods see the user's batch index and read their leaves at the example's row.
    """
    M, N, B, H, Hk, T, S, D = 2, 2, 2, 1, 1, 21, 37, 16  # one head: the interpreted kernels' time
    rng = np.random.default_rng(7)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
    q, ct = bf16(M, N, B, H, T, D), bf16(M, N, B, H, T, D)
    k, v = bf16(N, B, Hk, S, D), bf16(N, B, Hk, S, D)  # shared by the outer axis
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (N, B, S)), axis=-1), jnp.int32)  # at absolute positions
    offsets = jnp.asarray([[S - T, 5], [0, 9]], jnp.int32)  # [N, B]
    slopes = jnp.asarray(rng.random((M, H)) + 0.1, jnp.float32)

    def one(attend, q, k, v, ids, off, s, ct):
        mod = compose_score_mods(causal_mod(), document_mask_mod(ids), alibi_mod(slopes=s))
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, score_mod=mod, q_offset=off), q, k, v)
        return out, vjp(ct.astype(out.dtype))

    kernel = lambda *a, **kw: pallas_flash_attention(*a, interpret=True, **kw)  # noqa: E731
    inner = jax.vmap(lambda *a: one(kernel, *a), in_axes=(0, 0, 0, 0, 0, None, 0))
    run = jax.vmap(inner, in_axes=(0, None, None, None, None, 0, 0))
    args = (q, k, v, ids, offsets, slopes, ct)
    # Each kernel call sits behind a custom_vmap boundary, batched by folding: three calls in all.
    calls = [e for e in jax.make_jaxpr(run)(*args).jaxpr.eqns if e.primitive.name == "custom_vmap_call"]
    assert [e.outvars[0].aval.shape[0] for e in calls] == [M * N * B] * 3, "one launch per kernel, batch folded"
    out, (dq, dk, dv) = jax.jit(run)(*args)
    reference = fast_jit(lambda *a: one(attention_reference, *a))  # the float64 oracle, example by example
    for m in range(M):
        for n in range(N):
            r_out, r_grads = reference(*to64(q[m, n], k[n], v[n]), ids[n], offsets[n], slopes[m], to64(ct[m, n]))
            where = f"example ({m}, {n})"
            np.testing.assert_allclose(np.asarray(out[m, n], np.float64), r_out, atol=2e-2, err_msg=where)
            for name, a, b in zip("qkv", (dq, dk, dv), r_grads):
                np.testing.assert_allclose(np.asarray(a[m, n], np.float64), b, atol=6e-2, err_msg=f"d{name} {where}")


def _leaf_grad_case(B, H, Hk, T, S, D, q_off, window, seed):
    """float16 inputs and one leaf of every kind the backward kernels reduce.

    ALiBi slopes (read at ``[h]``), a 0-d softcap, a per-head query bias
    ``[1, H, q_off + T, 1]`` (dQ rows), a per-batch key bias ``[B, 1, 1, S]``
    (dK/dV rows) and a ``[1, 1, q_off + T, S]`` bias (dQ tiles), under a
    sliding window whose empty tiles the kernels skip.
    """
    rng = np.random.default_rng(seed)
    f16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float16)  # noqa: E731
    q, k, v, ct = f16(B, H, T, D), f16(B, Hk, S, D), f16(B, Hk, S, D), f16(B, H, T, D)
    leaves = {
        "slopes": jnp.asarray(rng.random(H) + 0.05, jnp.float16),
        "cap": jnp.asarray(3.0, jnp.float16),
        "q_bias": f16(1, H, q_off + T, 1),
        "kv_bias": f16(B, 1, 1, S),
        "tile_bias": f16(1, 1, q_off + T, S),
    }

    def loss(attend, q, k, v, lv):
        mod = compose_score_mods(
            sliding_window_mod(window), alibi_mod(slopes=lv["slopes"]), additive_bias_mod(lv["q_bias"]),
            additive_bias_mod(lv["kv_bias"]), additive_bias_mod(lv["tile_bias"]), softcap_mod(lv["cap"]),
        )  # fmt: skip
        out = attend(q, k, v, score_mod=mod, q_offset=q_off)
        return jnp.sum(out.astype(jnp.float32 if out.dtype != jnp.float64 else out.dtype) * ct.astype(out.dtype))

    return (q, k, v, leaves), loss


def _check_leaf_grads(got, want, atol):
    for name in want[3]:
        assert got[3][name].shape == want[3][name].shape and got[3][name].dtype == jnp.float16, name
        assert np.any(np.asarray(want[3][name]) != 0), name
        np.testing.assert_allclose(np.asarray(got[3][name], np.float64), want[3][name], atol=atol, rtol=2e-2,
                                   err_msg=f"d{name}")  # fmt: skip
    for name, g, w in zip("qkv", got[:3], want[:3]):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=atol, err_msg=f"d{name}")


def _leaf_grads_vs_oracle(shape, atol):
    args, loss = _leaf_grad_case(*shape)
    interpret = jax.default_backend() != "gpu"
    kernel = lambda *a, **kw: pallas_flash_attention(*a, interpret=interpret, **kw)  # noqa: E731
    got = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3)))(*args)
    want = fast_jit(jax.grad(lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2, 3)))(
        *jax.tree.map(lambda x: x.astype(jnp.float64), args)
    )
    _check_leaf_grads(got, want, atol)
    if interpret:  # the check below runs compiled (gpu tests): a second interpreted backward costs a minute
        return
    # Leaves nobody differentiates cost nothing: the kernels' outputs are the same.
    plain = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))(*args)
    for a, b in zip(plain, got[:3]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_leaf_gradients_of_every_kind():
    """Gradients to score-mod leaves, computed in the dQ and dK/dV kernels, against the float64 oracle."""
    # (B, H, Hk, T, S, D, q_offset, window, seed): 2 x 4 dQ tiles, a window that empties some.
    _leaf_grads_vs_oracle((2, 2, 1, 140, 200, 16, 24, 40, 3), atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 256])
def test_leaf_gradients_of_every_kind_compiled(D):
    _leaf_grads_vs_oracle((2, 4, 2, 300, 700, D, 100, 256, 4), atol=5e-2)


def test_vmap_of_leaf_gradients():
    """Per-example slopes and key biases under vmap: the probe and the kernels fold the mapped axis."""
    M, B, H, Hk, T, S, D = 2, 1, 2, 1, 19, 27, 8
    rng = np.random.default_rng(11)
    f16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float16)  # noqa: E731
    q, k, v, ct = f16(B, H, T, D), f16(B, Hk, S, D), f16(B, Hk, S, D), f16(B, H, T, D)
    slopes, kv_bias = jnp.asarray(rng.random((M, H)) + 0.1, jnp.float16), f16(M, B, 1, 1, S)

    def grads(attend, q, k, v, s, kb):
        def loss(s, kb):
            mod = compose_score_mods(causal_mod(), alibi_mod(slopes=s), additive_bias_mod(kb))
            out = attend(q, k, v, score_mod=mod, q_offset=S - T)
            return jnp.sum(out.astype(jnp.float64 if out.dtype == jnp.float64 else jnp.float32) * ct.astype(out.dtype))

        return jax.grad(loss, argnums=(0, 1))(s, kb)

    kernel = lambda *a, **kw: pallas_flash_attention(*a, interpret=True, **kw)  # noqa: E731
    got = jax.jit(jax.vmap(lambda s, kb: grads(kernel, q, k, v, s, kb)))(slopes, kv_bias)
    for m in range(M):
        want = fast_jit(lambda *a: grads(attention_reference, *a))(*to64(q, k, v, slopes[m], kv_bias[m]))
        for name, g, w in zip(("slopes", "kv_bias"), got, want):
            np.testing.assert_allclose(np.asarray(g[m], np.float64), w, atol=2e-2, rtol=2e-2, err_msg=f"d{name} #{m}")


def test_leaf_gradients_without_masks():
    """No mask: the dQ kernel walks every key tile, and key padding past S must add nothing to the sums."""
    rng = np.random.default_rng(12)
    f16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float16)  # noqa: E731
    q, k, v, ct = f16(1, 2, 19, 8), f16(1, 2, 27, 8), f16(1, 2, 27, 8), f16(1, 2, 19, 8)
    slopes = jnp.asarray([0.3, 0.05], jnp.float16)

    def loss(attend, q, s):
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), score_mod=alibi_mod(slopes=s))
        return jnp.sum(out.astype(jnp.float64 if out.dtype == jnp.float64 else jnp.float32) * ct.astype(out.dtype))

    kernel = lambda *a, **kw: pallas_flash_attention(*a, interpret=True, **kw)  # noqa: E731
    got = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1)))(q, slopes)
    want = jax.grad(lambda *a: loss(attention_reference, *a), argnums=(0, 1))(*to64(q, slopes))
    np.testing.assert_allclose(np.asarray(got[1], np.float64), want[1], atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(got[0], np.float64), want[0], atol=2e-2)


def _wide_heads_vs_oracle(B, H, Hk, T, S, D, interpret):
    """Head dims above 128: dK and dV run as two launches, with one-stage rings of 64-row tiles."""
    rng = np.random.default_rng(D)
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
    q, k, v, ct = bf16(B, H, T, D), bf16(B, Hk, S, D), bf16(B, Hk, S, D), bf16(B, H, T, D)
    causal_alibi = {"score_mod": compose_score_mods(causal_mod(), alibi_mod(H)), "q_offset": S - T}
    cases = {"plain": {}, "causal_alibi": causal_alibi}
    for name, kw in cases.items():

        def run(attend, q, k, v, kw=kw):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, **kw), q, k, v)
            return out, vjp(ct.astype(out.dtype))

        out, grads = jax.jit(lambda *a: run(lambda *b, **c: pallas_flash_attention(*b, interpret=interpret, **c), *a))(
            q, k, v
        )
        r_out, r_grads = fast_jit(lambda *a: run(attention_reference, *a))(*to64(q, k, v))
        np.testing.assert_allclose(np.asarray(out, np.float64), r_out, atol=2e-2, err_msg=name)
        for n, g, r in zip("qkv", grads, r_grads):
            np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=6e-2, err_msg=f"{name}: d{n}")


@pytest.mark.skipif(
    not os.environ.get("ATTNAX_PALLAS_FULL"),
    reason="GPU interpret mode can stall on this kernel on a 2-core host (its simulated warpgroups block the CPU "
    "thread pool); runs compiled on GPU (gpu marker) or with ATTNAX_PALLAS_FULL=1",
)
def test_head_dim_256_backward():
    _wide_heads_vs_oracle(1, 2, 1, 40, 100, 256, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [192, 256])
def test_head_dim_256_backward_compiled(D):
    _wide_heads_vs_oracle(2, 4, 2, 300, 700, D, interpret=False)


def test_persistent_tiles_deal_every_query_tile_once():
    """A persistent grid's CTAs take every (batch row, head, query tile) exactly once, in heavy/light pairs."""
    from attnax.kernels._pallas_mgpu_common import PersistentTiles

    for B, H, nq, workers in ((1, 1, 1, 132), (2, 3, 5, 4), (1, 16, 128, 132), (3, 1, 7, 2), (1, 2, 6, 5)):
        tiles = PersistentTiles(B, H, nq, workers)
        ctas = jnp.arange(tiles.n_ctas)
        counts = np.asarray(jax.vmap(lambda c, t=tiles: t.count(), axis_name="cta")(ctas))
        most = int(counts.max())
        items = jax.vmap(lambda c, t=tiles, m=most: [t.item(n) for n in range(m)], axis_name="cta")(ctas)
        seen = [
            tuple(int(x[c]) for x in items[n]) for c in range(tiles.n_ctas) for n in range(int(counts[c]))
        ]
        want = [(b, h, qi) for b in range(B) for h in range(H) for qi in range(nq)]
        assert sorted(seen) == want, (B, H, nq, workers)
        assert counts.min() >= 1 and tiles.n_ctas <= workers
        if nq % 2 == 0:  # pairs stay within a row: the heaviest with the lightest
            for c in range(tiles.n_ctas):
                for n in range(0, int(counts[c]) - 1, 2):
                    assert int(items[n][2][c]) + int(items[n + 1][2][c]) == nq - 1


def test_forward_walk_bound():
    """The static bound on a forward CTA's key tiles (it picks the persistent grid) holds for windows."""
    import types

    from attnax.kernels import _pallas
    from attnax.score_mods import and_masks, or_masks

    cfg = _pallas.PallasFlashConfig()  # 2 x 64 query rows, 128-key tiles
    dims = types.SimpleNamespace(S=16384)
    bound = lambda *parts: _pallas._forward_walk_bound(parts, dims, cfg)  # noqa: E731
    window = sliding_window_mod((1023, 0))
    assert bound(window, None, None) == 10
    assert bound(compose_score_mods(causal_mod(), window), None, None) == 10
    assert bound(None, and_masks(window, lambda b, h, q, k: k >= 0), None) == 10
    assert bound(causal_mod(), sliding_window_mod((100, 100)), None) == 4
    assert bound(causal_mod(), None, None) == 128
    assert bound(sliding_window_mod((1023, -1)), None, None) == 128
    assert bound(None, or_masks(window, lambda b, h, q, k: k == 0), None) == 128
    assert _pallas._forward_walk_bound((None, None, None), types.SimpleNamespace(S=1000), cfg) == 8
    # An upper bound on the tiles a CTA really visits, whatever the offset.
    rng = np.random.default_rng(3)
    for _ in range(12):
        left, right, q_offset = (int(x) for x in rng.integers(0, 700, 3))
        mod = sliding_window_mod((left, right))
        bm = create_block_mask(mod.mask_mod, None, None, 1024, 2048, block_size=(128, 128), q_offset=q_offset)
        visits = np.asarray(bm.to_dense()).reshape(1024 // 128, 128, 2048 // 128, 128).any(axis=(1, 3)).sum(-1)
        b = _pallas._forward_walk_bound((mod, None, None), types.SimpleNamespace(S=2048), cfg)
        assert visits.max() <= b, (left, right, q_offset, visits.max(), b)


def test_persistent_and_per_pair_grids_agree_with_the_oracle(monkeypatch):
    """The forward on the persistent grid and on the per-pair grid (forced both ways), against the float64
    oracle: packed documents (causal within each), and a query tile that sees no key at all."""
    from attnax.kernels import _pallas

    B, H, T, D = 2, 1, 300, 128  # six query tiles: three pairs, two CTAs interpreted (one takes two pairs)
    q, k, v = random_qkv(21, B, H, 1, T, T, D, dtype=jnp.bfloat16)
    ids = jnp.asarray(np.repeat(np.arange(3), 100), jnp.int32)

    def gaps(b, h, q_idx, kv_idx):  # query rows 128-255 (one CTA's tile) see nothing
        return jnp.logical_and(kv_idx <= q_idx, (q_idx < 128) | (q_idx >= 256))

    cases = {
        "documents": {"score_mod": compose_score_mods(causal_mod(), document_mask_mod(ids))},
        "gaps": {"mask_mod": gaps},
    }
    for name, kw in cases.items():
        ref, ref_lse = attention_reference(*to64(q, k, v), return_lse=True, **kw)
        ref = np.nan_to_num(np.asarray(ref))
        for max_walk in (0, 10**6):  # per-pair grid, persistent grid
            monkeypatch.setattr(_pallas, "_PERSISTENT_MAX_WALK", max_walk)
            out, lse = pallas_flash_attention(q, k, v, interpret=True, return_lse=True, **kw)
            what = f"{name}, max walk {max_walk}"
            np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2, err_msg=what)
            np.testing.assert_array_equal(np.isinf(np.asarray(lse)), np.isinf(np.asarray(ref_lse)), err_msg=what)
            fin = np.isfinite(np.asarray(ref_lse))
            lse64, ref_lse = np.asarray(lse, np.float64), np.asarray(ref_lse)
            np.testing.assert_allclose(lse64[fin], ref_lse[fin], atol=2e-2, err_msg=what)
