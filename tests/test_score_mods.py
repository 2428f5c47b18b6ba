"""Semantics of the prebuilt mods (DESIGN.md §3) against hand-written numpy masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax.kernels import score_mods as kernels_score_mods
from attnax.score_mods import (
    AttentionMod,
    additive_bias_mod,
    alibi_mod,
    alibi_slopes,
    and_masks,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    mask_mod_to_boolean_mask,
    mask_mod_to_score_mod,
    or_masks,
    prefix_lm_mod,
    sliding_window_mod,
    softcap_mod,
    split_score_mod,
)


def grid(T, S, q_offset=0):
    """Rank-2 ``(q_idx, kv_idx)`` index arrays with absolute query positions."""
    return jnp.arange(T)[:, None] + q_offset, jnp.arange(S)[None, :]


def np_grid(T, S, q_offset=0):
    return np.arange(T)[:, None] + q_offset, np.arange(S)[None, :]


def as_np(x):
    return np.asarray(x)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("q_offset", [0, 3, 9])
def test_causal(q_offset):
    T, S = 5, 12
    i, j = np_grid(T, S, q_offset)
    expected = j <= i
    np.testing.assert_array_equal(as_np(causal_mod().mask(0, 0, *grid(T, S, q_offset))), expected)
    dense = mask_mod_to_boolean_mask(causal_mod().mask_mod, None, None, T, S, q_offset=q_offset)
    np.testing.assert_array_equal(as_np(dense)[0, 0], expected)
    # As a score mod: -inf where hidden, the score untouched where visible.
    score = jnp.asarray(np.random.default_rng(0).standard_normal((T, S)))
    out = as_np(causal_mod()(score, 0, 0, *grid(T, S, q_offset)))
    np.testing.assert_array_equal(out, np.where(expected, as_np(score), -np.inf))


def test_causal_bottom_right_alignment():
    # q_offset = S - T: the last query sees every key (FlashAttention / decoding).
    T, S = 3, 7
    m = as_np(mask_mod_to_boolean_mask(causal_mod().mask_mod, None, None, T, S, q_offset=S - T))[0, 0]
    assert m[-1].all() and m.sum(axis=1).tolist() == [5, 6, 7]


@pytest.mark.parametrize(
    "window, expected_lr",
    [(1, (0, 0)), (4, (3, 0)), ((2, 3), (2, 3)), ((0, 0), (0, 0)), ((-1, 2), (-1, 2)), ((3, -1), (3, -1)),
     ((-1, -1), (-1, -1))],
)  # fmt: skip
@pytest.mark.parametrize("q_offset", [0, 4])
def test_sliding_window(window, expected_lr, q_offset):
    T, S = 8, 14
    left, right = expected_lr
    i, j = np_grid(T, S, q_offset)
    expected = np.ones((T, S), bool)
    if left >= 0:
        expected &= i - left <= j
    if right >= 0:
        expected &= j <= i + right
    mod = sliding_window_mod(window)
    assert (mod.left, mod.right) == expected_lr
    got = as_np(mask_mod_to_boolean_mask(mod.mask_mod, None, None, T, S, q_offset=q_offset))[0, 0]
    np.testing.assert_array_equal(got, expected)


def test_sliding_window_int_is_causal_window_inclusive():
    # W keys: the query's own position and the W - 1 before it.
    m = as_np(sliding_window_mod(3).mask(0, 0, *grid(6, 6)))
    assert m.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]
    assert m[5, 3] and m[5, 5] and not m[5, 2] and not m[4, 5]


@pytest.mark.parametrize("prefix", [0, 3, 6])
def test_prefix_lm(prefix):
    T, S = 6, 6
    i, j = np_grid(T, S)
    expected = (j < prefix) | (j <= i)
    np.testing.assert_array_equal(as_np(prefix_lm_mod(prefix).mask(0, 0, *grid(T, S))), expected)


def test_prefix_lm_per_batch():
    lengths = np.array([1, 4, 0])
    mod = prefix_lm_mod(jnp.asarray(lengths))
    got = as_np(mask_mod_to_boolean_mask(mod.mask_mod, 3, None, 5, 7, q_offset=2))
    i, j = np_grid(5, 7, 2)
    for b, p in enumerate(lengths):
        np.testing.assert_array_equal(got[b, 0], (j < p) | (j <= i))


def test_documents_1d_and_2d():
    ids = np.array([0, 0, 1, 1, 1, 2, 2])
    got = as_np(document_mask_mod(jnp.asarray(ids)).mask(0, 0, *grid(7, 7)))
    np.testing.assert_array_equal(got, ids[:, None] == ids[None, :])
    ids2 = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5, 6]])
    got2 = as_np(mask_mod_to_boolean_mask(document_mask_mod(jnp.asarray(ids2)).mask_mod, 2, 1, 7, 7))
    for b in range(2):
        np.testing.assert_array_equal(got2[b, 0], ids2[b][:, None] == ids2[b][None, :])
    assert got2[1, 0].sum() == 7  # all-different documents: only the diagonal


def test_documents_kv_segments_and_absolute_positions():
    q_ids = np.array([[5, 5, 7, 7, 9, 9]])  # covers absolute positions 0..5
    kv_ids = np.array([[5, 7, 7, 9]])
    mod = document_mask_mod(jnp.asarray(q_ids), jnp.asarray(kv_ids))
    # Queries at absolute positions 2..5 (q_offset 2) read ids q_ids[2:6].
    got = as_np(mask_mod_to_boolean_mask(mod.mask_mod, 1, None, 4, 4, q_offset=2))[0, 0]
    np.testing.assert_array_equal(got, q_ids[0, 2:6, None] == kv_ids[0][None, :])


# --------------------------------------------------------------------------- score rewrites


def standard_alibi_slopes(n):
    """The ALiBi paper's reference slopes (Press et al., 2022), written out independently."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + standard_alibi_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_8_heads():
    np.testing.assert_allclose(as_np(alibi_slopes(8)), [2.0**-i for i in range(1, 9)], rtol=1e-7)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 12, 16, 24, 40])
def test_alibi_slopes_match_standard_formula(n):
    got = as_np(alibi_slopes(n))
    assert got.shape == (n,) and got.dtype == np.float32
    np.testing.assert_allclose(got, standard_alibi_slopes(n), rtol=1e-6)


def test_alibi_slopes_non_power_of_two_values():
    # 6 heads: the 4-head slopes, then every other slope of 8 heads.
    np.testing.assert_allclose(as_np(alibi_slopes(6)), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3], rtol=1e-7)
    # 12 heads: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    expected = [2.0**-i for i in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]
    np.testing.assert_allclose(as_np(alibi_slopes(12)), expected, rtol=1e-6)


def test_alibi_mod():
    H, T, S = 4, 5, 9
    slopes = np.asarray(alibi_slopes(H))
    score = np.random.default_rng(1).standard_normal((H, T, S))
    h = jnp.arange(H)[:, None, None]
    i, j = np_grid(T, S, 3)
    out = as_np(alibi_mod(H)(jnp.asarray(score), 0, h, *(x[None] for x in grid(T, S, 3))))
    # The mod's documented form: -slope * |q - kv| everywhere...
    np.testing.assert_allclose(out, score - slopes[:, None, None] * np.abs(i - j)[None], rtol=1e-6)
    # ...which is the causal form of DESIGN.md §3, score + slope * (kv - q), where kv <= q.
    causal_form = score + slopes[:, None, None] * (j - i)[None]
    visible = np.broadcast_to((j <= i)[None], out.shape)
    np.testing.assert_allclose(out[visible], causal_form[visible], rtol=1e-6)
    assert alibi_mod(H).mask_mod is None
    np.testing.assert_array_equal(as_np(alibi_mod(slopes=jnp.asarray([0.5, 1.0])).slopes), [0.5, 1.0])


def test_additive_bias_broadcasts_size_1_dims():
    bias = np.random.default_rng(2).standard_normal((1, 3, 1, 6)).astype(np.float32)
    B, H, T, S = 2, 3, 4, 6
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    q_idx, kv_idx = jnp.arange(T)[None, None, :, None], jnp.arange(S)[None, None, None, :]
    score = jnp.zeros((B, H, T, S))
    out = as_np(additive_bias_mod(jnp.asarray(bias))(score, b, h, q_idx, kv_idx))
    np.testing.assert_allclose(out, np.broadcast_to(bias, (B, H, T, S)))


def test_softcap():
    s = np.array([-100.0, -1.0, 0.0, 0.5, 100.0])
    np.testing.assert_allclose(as_np(softcap_mod(3.0)(jnp.asarray(s), 0, 0, 0, 0)), 3.0 * np.tanh(s / 3.0))
    assert softcap_mod(3.0).mask_mod is None


class _FloatPositions:
    """What a kernel passes as ``positions``: ``kv_idx - q_idx`` as float32 (here from the index grids)."""

    def __init__(self, q_idx, kv_idx):
        self.q_idx, self.kv_idx = q_idx, kv_idx
        self.calls = 0

    def relative(self):
        self.calls += 1
        return (self.kv_idx - self.q_idx).astype(jnp.float32)


@pytest.mark.parametrize(
    "name",
    ["alibi", "alibi_causal", "softcap", "softcap_negative_cap", "softcap_array", "bias", "two_rewrites", "callable"],
)
@pytest.mark.parametrize("with_positions", [False, True])
def test_scaled_transform_matches_transform(name, with_positions):
    """``t * factor`` of the fused form equals the mod's transform of the scaled scores."""
    H, T, S, scale = 4, 7, 19, 0.125
    rng = np.random.default_rng(hash(name) % 2**32)
    raw = jnp.asarray(rng.normal(size=(T, S)) * 20.0, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, H, T, S)), jnp.float32)
    mod = {
        "alibi": alibi_mod(H),
        "alibi_causal": compose_score_mods(causal_mod(), alibi_mod(slopes=jnp.asarray(rng.uniform(0.1, 2.0, H)))),
        "softcap": softcap_mod(1.7),
        "softcap_negative_cap": softcap_mod(jnp.asarray(-1.7, jnp.float32)),  # the form keeps factor > 0
        "softcap_array": compose_score_mods(sliding_window_mod(4), softcap_mod(jnp.asarray(0.9, jnp.float32))),
        "bias": additive_bias_mod(bias),
        "two_rewrites": compose_score_mods(softcap_mod(2.0), alibi_mod(H)),
        "callable": compose_score_mods(lambda s, b, h, q, k: s * 1.5 + h),
    }[name]
    q_idx, kv_idx = grid(T, S, q_offset=5)
    positions = _FloatPositions(q_idx, kv_idx) if with_positions else None
    for h in range(H):
        want = as_np(mod.transform(raw * scale, 0, h, q_idx, kv_idx))
        t, factor = mod.scaled_transform(raw, scale, 0, h, q_idx, kv_idx, positions)
        assert np.all(np.asarray(factor) > 0)
        np.testing.assert_allclose(as_np(t) * np.asarray(factor), want, rtol=2e-6, atol=2e-5)
    if with_positions and name.startswith("alibi"):
        assert positions.calls == H  # ALiBi's distances came from the float positions
    # The fused form must be a real rewrite of the scores, not the identity:
    assert not np.allclose(want, as_np(raw * scale), atol=1e-3)


# --------------------------------------------------------------------------- composition


def add_one(s, b, h, q, k):
    return s + 1.0


def times_two(s, b, h, q, k):
    return s * 2.0


def test_composition_chains_scores_left_to_right():
    s = jnp.asarray([1.0, 2.0])
    np.testing.assert_allclose(as_np(compose_score_mods(add_one, times_two)(s, 0, 0, 0, 0)), [4.0, 6.0])
    np.testing.assert_allclose(as_np(compose_score_mods(times_two, add_one)(s, 0, 0, 0, 0)), [3.0, 5.0])


@pytest.mark.parametrize("order", ["mask_first", "mask_last"])
def test_masks_applied_after_every_transform(order):
    # softcap(-inf) would be -cap: the mask must be applied after the softcap.
    mods = [causal_mod(), softcap_mod(2.0)] if order == "mask_first" else [softcap_mod(2.0), causal_mod()]
    mod = compose_score_mods(*mods)
    out = as_np(mod(jnp.full((3, 3), 10.0), 0, 0, *grid(3, 3)))
    assert np.all(out[np.triu_indices(3, 1)] == -np.inf)
    np.testing.assert_allclose(out[np.tril_indices(3)], 2.0 * np.tanh(5.0), rtol=1e-6)
    transform, mask = split_score_mod(mod)
    np.testing.assert_allclose(as_np(transform(jnp.asarray(10.0), 0, 0, 0, 0)), 2.0 * np.tanh(5.0), rtol=1e-6)
    np.testing.assert_array_equal(as_np(mask(0, 0, *grid(3, 3))), np.tril(np.ones((3, 3), bool)))


def test_composed_masks_are_anded_and_nested_compositions_flatten():
    docs = document_mask_mod(jnp.asarray([0, 0, 0, 1, 1, 1]))
    mod = compose_score_mods(compose_score_mods(causal_mod(), None), compose_score_mods(docs, sliding_window_mod(2)))
    assert len(mod.mods) == 3  # flattened, None dropped
    i, j = np_grid(6, 6)
    ids = np.array([0, 0, 0, 1, 1, 1])
    expected = (j <= i) & (ids[:, None] == ids[None, :]) & (j >= i - 1)
    np.testing.assert_array_equal(as_np(mod.mask_mod(0, 0, *grid(6, 6))), expected)
    assert mod.has_mask and not mod.has_transform
    assert compose_score_mods(causal_mod()) == causal_mod()  # a single mod is returned as is


def test_mask_mod_property():
    assert not causal_mod().mask_mod(0, 0, 1, 2) and causal_mod().mask_mod(0, 0, 2, 2)
    assert softcap_mod(1.0).mask_mod is None
    assert compose_score_mods(softcap_mod(1.0), alibi_mod(2)).mask_mod is None
    m = compose_score_mods(softcap_mod(1.0), prefix_lm_mod(2)).mask_mod
    np.testing.assert_array_equal(as_np(m(0, 0, *grid(4, 4))), as_np(prefix_lm_mod(2).mask(0, 0, *grid(4, 4))))
    # The mask mod of a mod with arrays is a pytree holding them (jittable, no closure constants).
    ids = jnp.asarray([0, 1, 1])
    leaves = jax.tree_util.tree_leaves(document_mask_mod(ids).mask_mod)
    assert len(leaves) == 1 and leaves[0] is ids


def test_mask_mod_to_score_mod_and_boolean_masks():
    mm = lambda b, h, q, k: (q + k + b + h) % 2 == 0  # noqa: E731
    mod = mask_mod_to_score_mod(mm)
    assert mod.has_mask and not mod.has_transform
    score = jnp.ones((1, 1, 3, 3))
    b, h = jnp.zeros((1, 1, 1, 1), int), jnp.zeros((1, 1, 1, 1), int)
    q, k = jnp.arange(3)[None, None, :, None], jnp.arange(3)[None, None, None, :]
    out = as_np(mod(score, b, h, q, k))[0, 0]
    np.testing.assert_array_equal(out, np.where((np.arange(3)[:, None] + np.arange(3)) % 2 == 0, 1.0, -np.inf))
    # B/H None: size 1 there, index 0; B/H given: the full grid, b and h seen.
    small = as_np(mask_mod_to_boolean_mask(mm, None, None, 3, 4))
    assert small.shape == (1, 1, 3, 4)
    full = as_np(mask_mod_to_boolean_mask(mm, 2, 3, 3, 4))
    assert full.shape == (2, 3, 3, 4)
    bb, hh, qq, kk = np.meshgrid(np.arange(2), np.arange(3), np.arange(3), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(full, (qq + kk + bb + hh) % 2 == 0)
    np.testing.assert_array_equal(full[:1, :1], small)
    # A mask that ignores b and h still broadcasts to the full shape.
    assert as_np(mask_mod_to_boolean_mask(causal_mod().mask_mod, 2, 2, 3, 3)).shape == (2, 2, 3, 3)


def test_and_or_masks():
    a = lambda b, h, q, k: k <= q  # noqa: E731
    c = lambda b, h, q, k: k % 2 == 0  # noqa: E731
    i, j = np_grid(5, 5)
    np.testing.assert_array_equal(as_np(and_masks(a, c)(0, 0, *grid(5, 5))), (j <= i) & (j % 2 == 0))
    np.testing.assert_array_equal(as_np(or_masks(a, c)(0, 0, *grid(5, 5))), (j <= i) | (j % 2 == 0))
    # Nesting with attnax mask mods (pytrees).
    nested = or_masks(and_masks(a, c), sliding_window_mod((0, 1)).mask_mod)
    np.testing.assert_array_equal(
        as_np(nested(0, 0, *grid(5, 5))), ((j <= i) & (j % 2 == 0)) | ((j >= i) & (j <= i + 1))
    )


def test_split_score_mod_combines_mask_mod():
    transform, mask = split_score_mod(compose_score_mods(causal_mod(), softcap_mod(1.0)), lambda b, h, q, k: k > 0)
    i, j = np_grid(4, 4)
    np.testing.assert_array_equal(as_np(mask(0, 0, *grid(4, 4))), (j <= i) & (j > 0))
    assert transform is not None
    assert split_score_mod(None, None) == (None, None)
    t, m = split_score_mod(alibi_mod(2))
    assert t is not None and m is None
    t, m = split_score_mod(None, causal_mod().mask_mod)
    assert t is None and m is not None


# --------------------------------------------------------------------------- tiles, pytrees, retracing


PREBUILT = {
    "causal": lambda: causal_mod(),
    "window": lambda: sliding_window_mod((3, 1)),
    "alibi": lambda: alibi_mod(4),
    "prefix": lambda: prefix_lm_mod(jnp.asarray([2, 5])),
    "documents": lambda: document_mask_mod(jnp.asarray([[0] * 8 + [1] * 8, [0] * 3 + [1] * 13])),
    "bias": lambda: additive_bias_mod(jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, 16, 16)))),
    "softcap": lambda: softcap_mod(1.5),
}


@pytest.mark.parametrize("name", sorted(PREBUILT))
def test_tile_evaluation_matches_whole_grid(name):
    # A mod is written once: on the [B, H, T, S] grid (the reference) and on one
    # [block_q, block_kv] tile with scalar b and h (a Pallas kernel) it agrees.
    mod = PREBUILT[name]()
    B, H, T, S = 2, 4, 16, 16
    score = jnp.asarray(np.random.default_rng(4).standard_normal((B, H, T, S)))
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, :, None, None]
    q, k = jnp.arange(T)[None, None, :, None], jnp.arange(S)[None, None, None, :]
    whole = as_np(mod(score, b, h, q, k))
    for bi, hi, q0, k0 in [(0, 0, 0, 0), (1, 3, 4, 8), (1, 2, 12, 0)]:
        tile = score[bi, hi, q0 : q0 + 4, k0 : k0 + 8]
        qi, ki = jnp.arange(q0, q0 + 4)[:, None], jnp.arange(k0, k0 + 8)[None, :]
        got = as_np(mod(tile, jnp.int32(bi), jnp.int32(hi), qi, ki))
        np.testing.assert_allclose(got, whole[bi, hi, q0 : q0 + 4, k0 : k0 + 8], rtol=1e-12)


def test_mods_are_pytrees_with_array_leaves():
    slopes = jnp.asarray([0.5, 0.25])
    assert jax.tree_util.tree_leaves(alibi_mod(slopes=slopes)) == [slopes]
    ids, kv_ids = jnp.asarray([0, 1]), jnp.asarray([1, 1, 0])
    assert jax.tree_util.tree_leaves(document_mask_mod(ids, kv_ids)) == [ids, kv_ids]
    assert len(jax.tree_util.tree_leaves(document_mask_mod(ids))) == 1  # kv_segment_ids None: no leaf
    assert jax.tree_util.tree_leaves(sliding_window_mod(3)) == []  # window sizes are static
    assert jax.tree_util.tree_leaves(causal_mod()) == []
    bias = jnp.ones((1, 1, 2, 2))
    composed = compose_score_mods(causal_mod(), alibi_mod(slopes=slopes), additive_bias_mod(bias))
    assert jax.tree_util.tree_leaves(composed) == [slopes, bias]
    # Different static window sizes are different tree structures (a retrace, by design).
    assert jax.tree_util.tree_structure(sliding_window_mod(3)) != jax.tree_util.tree_structure(sliding_window_mod(4))
    # Round trip.
    flat, tree = jax.tree_util.tree_flatten(composed)
    rebuilt = jax.tree_util.tree_unflatten(tree, [x * 2 for x in flat])
    np.testing.assert_allclose(as_np(rebuilt.mods[1].slopes), [1.0, 0.5])
    for make in PREBUILT.values():
        assert isinstance(make(), AttentionMod)


def test_jit_with_new_mod_values_does_not_retrace():
    traces = []

    @jax.jit
    def apply(mod, score):
        traces.append(1)
        return mod(score, 0, jnp.arange(2)[:, None, None], *(x[None] for x in grid(3, 3)))

    score = jnp.ones((2, 3, 3))
    outs = []
    for slopes, cap in [([0.5, 0.25], 1.0), ([1.0, 2.0], 3.0), ([0.1, 0.2], 0.5)]:
        mod = compose_score_mods(causal_mod(), alibi_mod(slopes=jnp.asarray(slopes)), softcap_mod(jnp.asarray(cap)))
        outs.append(apply(mod, score))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])
    ids_traces = []

    @jax.jit
    def doc_mask(ids):
        ids_traces.append(1)
        return mask_mod_to_boolean_mask(document_mask_mod(ids).mask_mod, None, None, 4, 4)

    a = doc_mask(jnp.asarray([0, 0, 1, 1]))
    b = doc_mask(jnp.asarray([0, 1, 1, 1]))
    assert len(ids_traces) == 1 and not np.array_equal(a, b)


def test_gradients_reach_mod_leaves():
    score = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 3)))
    h = jnp.arange(2)[:, None, None]
    q, k = (x[None] for x in grid(3, 3))

    def f(slopes, cap):
        return jnp.sum(compose_score_mods(alibi_mod(slopes=slopes), softcap_mod(cap))(score, 0, h, q, k))

    g_slopes, g_cap = jax.grad(f, argnums=(0, 1))(jnp.asarray([0.3, 0.7]), jnp.asarray(2.0))
    dist = np.abs(np.arange(3)[:, None] - np.arange(3)[None, :])
    s = np.asarray(score) - np.array([0.3, 0.7])[:, None, None] * dist
    # d/dslope of cap * tanh((score - slope * dist) / cap) = -dist * (1 - tanh^2)
    np.testing.assert_allclose(as_np(g_slopes), np.sum(-dist * (1 - np.tanh(s / 2.0) ** 2), axis=(1, 2)), rtol=1e-10)
    t = np.tanh(s / 2.0)
    np.testing.assert_allclose(as_np(g_cap), np.sum(t - s / 2.0 * (1 - t**2)), rtol=1e-10)


def test_kernels_reexport_mods():
    from attnax.kernels.score_mods import alibi_mod as alibi_from_kernels

    assert alibi_from_kernels is alibi_mod
    assert kernels_score_mods.causal_mod is causal_mod
