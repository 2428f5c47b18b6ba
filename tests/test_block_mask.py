"""``create_block_mask``: tile classes, index lists and the elementwise meaning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnax.block_mask import BlockMask, create_block_mask
from attnax.kernels import MemoryEfficientConfig, flash_attention, memory_efficient_attention, standard_attention
from attnax.score_mods import (
    and_masks,
    causal_mod,
    document_mask_mod,
    mask_mod_to_boolean_mask,
    or_masks,
    prefix_lm_mod,
    sliding_window_mod,
    softcap_mod,
)

try:
    from conformance import TableMask, fast_jit, oracle, random_qkv, to64
except ImportError:  # tests/ imported as a package
    from tests.conformance import TableMask, fast_jit, oracle, random_qkv, to64

EMPTY, PARTIAL, FULL = 0, 1, 2


def create_jit(mask_mod, B, H, T, S, *, block_size, q_offset=0, with_dense=False):
    """create_block_mask under jit, with the mod's arrays and q_offset traced.

    With ``with_dense``, also returns ``bm.to_dense()`` and the mod's own dense
    mask, from the same compiled program.
    """

    def run(mod, q_offset):
        bm = create_block_mask(mod, B, H, T, S, block_size=block_size, q_offset=q_offset)
        if not with_dense:
            return bm
        return bm, bm.to_dense(), mask_mod_to_boolean_mask(mod, B or 1, H or 1, T, S, q_offset=q_offset)

    leaves = jax.tree_util.tree_leaves(mask_mod)
    if len(leaves) == 1 and leaves[0] is mask_mod:  # a plain function: not a jit argument
        return fast_jit(lambda q_offset: run(mask_mod, q_offset))(q_offset)
    return fast_jit(run)(mask_mod, q_offset)


def numpy_classes(dense, bq, bkv):
    """Tile classes of a dense boolean ``[B, H, T, S]`` mask, computed independently."""
    B, H, T, S = dense.shape
    nq, nk = -(-T // bq), -(-S // bkv)
    out = np.zeros((B, H, nq, nk), np.int8)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * bq : (i + 1) * bq, j * bkv : (j + 1) * bkv]
            out[:, :, i, j] = np.where(tile.any(axis=(2, 3)), np.where(tile.all(axis=(2, 3)), FULL, PARTIAL), EMPTY)
    return out


def check_index_lists(bm: BlockMask):
    """Counts and index lists agree with ``block_classes``, in both views."""
    classes = np.asarray(bm.block_classes)
    B, H, nq, nk = classes.shape
    views = [
        (classes, bm.kv_num_blocks, bm.kv_indices, PARTIAL),
        (classes, bm.full_kv_num_blocks, bm.full_kv_indices, FULL),
        (np.swapaxes(classes, 2, 3), bm.q_num_blocks, bm.q_indices, PARTIAL),
        (np.swapaxes(classes, 2, 3), bm.full_q_num_blocks, bm.full_q_indices, FULL),
    ]
    for cls, counts, indices, kind in views:
        counts, indices = np.asarray(counts), np.asarray(indices)
        assert counts.dtype == np.int32 and indices.dtype == np.int32
        assert counts.shape == cls.shape[:3] and indices.shape == cls.shape
        for b in range(B):
            for h in range(H):
                for r in range(cls.shape[2]):
                    expected = np.flatnonzero(cls[b, h, r] == kind)  # ascending
                    n = counts[b, h, r]
                    assert n == len(expected)
                    np.testing.assert_array_equal(indices[b, h, r, :n], expected)
                    if n:  # past the count: the last valid index repeated
                        assert np.all(indices[b, h, r, n:] == expected[-1])


def check_block_mask(mask_mod, B, H, T, S, block_size, q_offset=0, exact=True, jit=False):
    bq, bkv = (block_size, block_size) if isinstance(block_size, int) else block_size
    Bn, Hn = B or 1, H or 1
    if jit:
        bm, meaning, dense = create_jit(mask_mod, B, H, T, S, block_size=block_size, q_offset=q_offset, with_dense=True)
    else:
        bm = create_block_mask(mask_mod, B, H, T, S, block_size=block_size, q_offset=q_offset)
        meaning = bm.to_dense()
        dense = mask_mod_to_boolean_mask(mask_mod, Bn, Hn, T, S, q_offset=q_offset)
    assert bm.block_size == (bq, bkv) and bm.seq_lengths == (T, S)
    assert bm.shape == (Bn, Hn, T, S)
    dense = np.asarray(dense)
    np.testing.assert_array_equal(np.asarray(meaning), dense)  # the elementwise meaning is the mod's
    classes, expected = np.asarray(bm.block_classes), numpy_classes(dense, bq, bkv)
    assert classes.shape == (Bn, Hn, -(-T // bq), -(-S // bkv))
    if exact:
        np.testing.assert_array_equal(classes, expected)
    else:  # sound: "empty" and "full" are never wrong, "partial" may be conservative
        assert np.all(expected[classes == EMPTY] == EMPTY)
        assert np.all(expected[classes == FULL] == FULL)
        assert np.all(classes[expected == PARTIAL] == PARTIAL)
    check_index_lists(bm)
    return bm


SORTED_IDS = np.array([[0] * 7 + [1] * 12 + [2] * 18, [0] * 20 + [1] * 3 + [3] * 14])

CASES = {
    "causal": (causal_mod().mask_mod, None, None, 37, 37, 8, 0),
    "causal_offset_pair": (causal_mod().mask_mod, None, None, 13, 29, (4, 8), 16),
    "causal_per_batch_offset": (causal_mod().mask_mod, 2, None, 13, 29, (4, 8), jnp.asarray([0, 9])),
    "window_left_right": (sliding_window_mod((3, 2)).mask_mod, None, None, 21, 21, 5, 0),
    "window_int": (sliding_window_mod(6).mask_mod, None, None, 20, 33, (7, 3), 10),
    "window_unbounded_left": (sliding_window_mod((-1, 0)).mask_mod, None, 2, 17, 17, 4, 0),
    "window_unbounded_right": (sliding_window_mod((0, -1)).mask_mod, None, None, 17, 23, (6, 5), 3),
    "prefix": (prefix_lm_mod(5).mask_mod, None, None, 19, 19, 4, 0),
    "prefix_per_batch": (prefix_lm_mod(jnp.asarray([3, 12])).mask_mod, 2, None, 19, 19, (5, 3), 0),
    "documents_1d": (document_mask_mod(jnp.asarray(SORTED_IDS[0])).mask_mod, None, None, 37, 37, 6, 0),
    "documents_2d": (document_mask_mod(jnp.asarray(SORTED_IDS)).mask_mod, 2, None, 37, 37, (8, 5), 0),
    "documents_kv_segments": (
        document_mask_mod(jnp.asarray(SORTED_IDS[:, :16]), jnp.asarray(SORTED_IDS[:, ::2])).mask_mod,
        2, None, 16, 19, 4, 0,
    ),
    "and_masks": (and_masks(causal_mod().mask_mod, sliding_window_mod(5).mask_mod), None, None, 30, 30, 4, 0),
    "or_masks": (or_masks(sliding_window_mod(2).mask_mod, prefix_lm_mod(3).mask_mod), None, None, 30, 30, 4, 0),
    "lambda_per_head": (lambda b, h, q, k: (k <= q) & ((k + h) % 3 != 0), None, 3, 25, 25, (8, 6), 0),
    "lambda_per_batch": (lambda b, h, q, k: k < 10 * (b + 1), 2, None, 9, 31, (4, 8), 0),
    "block_larger_than_lengths": (causal_mod().mask_mod, None, None, 5, 7, 64, 0),
    "block_size_one": (causal_mod().mask_mod, None, None, 6, 6, 1, 2),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_create_block_mask(case):
    mask_mod, B, H, T, S, bs, q_offset = CASES[case]
    check_block_mask(mask_mod, B, H, T, S, bs, q_offset, jit=True)


@pytest.mark.parametrize("case", ["causal_per_batch_offset", "lambda_per_head"])
def test_create_block_mask_eager(case):
    mask_mod, B, H, T, S, bs, q_offset = CASES[case]
    check_block_mask(mask_mod, B, H, T, S, bs, q_offset, jit=False)


def test_causal_sparsity():
    bm = create_block_mask(causal_mod().mask_mod, None, None, 64, 64, block_size=16)
    assert float(bm.sparsity) == pytest.approx(6 / 16)
    np.testing.assert_array_equal(bm.kv_num_blocks[0, 0], [1, 1, 1, 1])  # the diagonal
    np.testing.assert_array_equal(bm.full_kv_num_blocks[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(bm.full_q_num_blocks[0, 0], [3, 2, 1, 0])


def test_unsorted_documents_are_sound():
    ids = np.random.default_rng(0).integers(0, 3, size=(2, 24))
    check_block_mask(document_mask_mod(jnp.asarray(ids)).mask_mod, 2, None, 24, 24, (4, 6), exact=False, jit=True)


def test_broadcast_batch_and_heads():
    bm = create_jit(causal_mod().mask_mod, None, None, 8, 8, block_size=4)
    assert bm.block_classes.shape == (1, 1, 2, 2) and bm.to_dense().shape == (1, 1, 8, 8)
    bm = create_jit(causal_mod().mask_mod, 3, 2, 8, 8, block_size=4)
    assert bm.block_classes.shape == (3, 2, 2, 2)
    assert np.all(np.asarray(bm.block_classes) == np.asarray(bm.block_classes)[:1, :1])


@given(
    B=st.sampled_from([None, 2]),
    H=st.sampled_from([None, 2]),
    T=st.integers(1, 30),
    S=st.integers(1, 30),
    bq=st.integers(1, 12),
    bkv=st.integers(1, 12),
    q_offset=st.integers(0, 5),
    density=st.sampled_from([0.05, 0.5, 0.95, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_mask_tables(B, H, T, S, bq, bkv, q_offset, density, seed):
    rng = np.random.default_rng(seed)
    table = rng.random((B or 1, H or 1, 5 + T, S)) < density
    if density == 1.0:  # whole tiles hidden and visible: empty and full blocks occur
        table[..., : S // 2] = False
    bm = check_block_mask(TableMask(jnp.asarray(table)), B, H, T, S, (bq, bkv), jnp.asarray(q_offset), jit=True)
    assert np.any(np.asarray(bm.block_classes) != PARTIAL) or bq * bkv > 1 or table.all() or not table.any()


def test_jit_with_traced_document_ids_does_not_recompile():
    traces = []

    @jax.jit
    def build(ids):
        traces.append(1)
        return create_block_mask(document_mask_mod(ids).mask_mod, 2, None, 32, 32, block_size=8)

    a_ids = jnp.asarray(np.repeat([[0, 1, 2, 3]], 2, axis=0).repeat(8, axis=1))
    b_ids = jnp.asarray(np.array([[0] * 16 + [1] * 16, [0] * 32]))
    a, b = build(a_ids), build(b_ids)
    assert len(traces) == 1
    assert not np.array_equal(a.block_classes, b.block_classes)
    np.testing.assert_array_equal(b.full_kv_num_blocks[1, 0], [4, 4, 4, 4])  # one document: all full
    for ids, bm in ((a_ids, a), (b_ids, b)):
        dense = np.asarray(mask_mod_to_boolean_mask(document_mask_mod(ids).mask_mod, 2, 1, 32, 32))
        np.testing.assert_array_equal(bm.block_classes, numpy_classes(dense, 8, 8))
        check_index_lists(bm)


def test_block_mask_is_a_pytree_through_jit():
    bm = create_block_mask(prefix_lm_mod(jnp.asarray([2, 6])).mask_mod, 2, None, 12, 12, block_size=4)
    leaves, tree = jax.tree_util.tree_flatten(bm)
    assert any(x is bm.block_classes for x in leaves) and any(x is bm.kv_indices for x in leaves)
    rebuilt = jax.tree_util.tree_unflatten(tree, leaves)
    assert rebuilt.block_size == (4, 4) and rebuilt.seq_lengths == (12, 12)
    dense = jax.jit(lambda m: m.to_dense())(bm)
    np.testing.assert_array_equal(dense, bm.to_dense())


KERNELS = {
    "standard": standard_attention,
    "memory_efficient": lambda *a, **k: memory_efficient_attention(*a, config=MemoryEfficientConfig(8, 16), **k),
    "flash_attention": flash_attention,
}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_with_block_mask_match_oracle(kernel):
    B, H, T, S = 2, 2, 29, 37
    q, k, v = random_qkv(3, B, H, 1, T, S, 8)
    ids = jnp.asarray(np.sort(np.random.default_rng(4).integers(0, 3, size=(B, S))), jnp.int32)
    docs = document_mask_mod(ids)
    doc_blocks = create_jit(docs.mask_mod, B, None, T, S, block_size=(8, 8))
    cases = {
        "documents": ({"block_mask": doc_blocks}, docs.mask_mod),
        "window_offset": (
            {
                "block_mask": create_jit(
                    sliding_window_mod(7).mask_mod, None, None, T, S, block_size=(5, 9), q_offset=8
                ),
                "q_offset": 8,
                "score_mod": softcap_mod(1.0),
            },
            sliding_window_mod(7).mask_mod,
        ),
    }
    fn = KERNELS[kernel]
    run = fast_jit(lambda q, k, v: {n: fn(q, k, v, **kw) for n, (kw, _) in cases.items()})
    outs = run(q, k, v)
    for n, (kw, equivalent) in cases.items():
        expected = oracle(*to64(q, k, v), **kw)
        np.testing.assert_allclose(outs[n], expected, atol=2e-5, rtol=2e-5, err_msg=n)
        # The block mask means exactly its mask mod.
        same = oracle(*to64(q, k, v), mask_mod=equivalent, **{x: y for x, y in kw.items() if x != "block_mask"})
        np.testing.assert_allclose(expected, same, atol=1e-12, err_msg=n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 0}, "`block_size`"),
        ({"block_size": (4, 0)}, "`block_size`"),
        ({"block_size": (4, 4, 4)}, "`block_size`"),
        ({"block_size": 2.5}, "`block_size`"),
        ({"T": 0}, "`T`"),
        ({"S": -1}, "`S`"),
        ({"B": 0}, "`B`"),
        ({"H": 1.5}, "`H`"),
        ({"q_offset": -1}, "`q_offset`"),
        ({"q_offset": jnp.asarray([1, 2, 3])}, "`q_offset`"),
    ],
)
def test_create_block_mask_errors(kwargs, match):
    args = {"B": 2, "H": None, "T": 8, "S": 8, "block_size": 4, "q_offset": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        create_block_mask(causal_mod().mask_mod, args["B"], args["H"], args["T"], args["S"],
                          block_size=args["block_size"], q_offset=args["q_offset"])  # fmt: skip
