"""Every documented argument error (DESIGN.md §6), through every public kernel.

``ValueError`` for shapes and values, ``TypeError`` for dtypes and kinds of
object; each message names the argument. Checks run at trace time, before any
compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnax import attention_reference, create_block_mask
from attnax.kernels import (
    MemoryEfficientConfig,
    additive_bias_mod,
    alibi_mod,
    alibi_slopes,
    and_masks,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    flash_attention,
    mask_mod_to_score_mod,
    memory_efficient_attention,
    or_masks,
    prefix_lm_mod,
    sliding_window_mod,
    softcap_mod,
    standard_attention,
)

KERNELS = {
    "standard": standard_attention,
    "memory_efficient": memory_efficient_attention,
    "flash": flash_attention,
    "flash_xla": functools.partial(flash_attention, implementation="xla"),
    "flash_memory_efficient": functools.partial(flash_attention, implementation="memory_efficient"),
    "reference": attention_reference,
}

B, H, HK, T, S, D = 2, 4, 2, 8, 10, 16


def inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, H, T, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, HK, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, HK, S, D)), dtype)
    return q, k, v


def _with(**changes):
    """A case: replace some of (q, k, v) and add keyword arguments."""

    def make():
        q, k, v = inputs()
        arrays = {"q": q, "k": k, "v": v}
        kwargs = {}
        for name, value in changes.items():
            value = value(arrays) if callable(value) and name in arrays else value
            (arrays if name in arrays else kwargs)[name] = value
        return (arrays["q"], arrays["k"], arrays["v"]), kwargs

    return make


def _bm_for(T_, S_):
    return create_block_mask(causal_mod().mask_mod, None, None, T_, S_, block_size=4)


# name -> (case, exception, regex the message must match)
CASES = {
    # shapes
    "query_rank_3": (_with(q=lambda a: a["q"][0]), ValueError, r"`query` must have rank 4.*\(4, 8, 16\)"),
    "key_rank_5": (_with(k=lambda a: a["k"][None]), ValueError, r"`key` must have rank 4"),
    "value_rank_3": (_with(v=lambda a: a["v"][0]), ValueError, r"`value` must have rank 4"),
    "batch_mismatch": (
        _with(k=lambda a: jnp.concatenate([a["k"], a["k"][:1]]), v=lambda a: jnp.concatenate([a["v"], a["v"][:1]])),
        ValueError,
        r"batch size.*2, 3, 3",
    ),
    "head_dim_mismatch": (
        _with(k=lambda a: a["k"][..., :8]),
        ValueError,
        r"`query` and `key` must share head_dim.*16.*8",
    ),
    "kv_length_mismatch": (_with(v=lambda a: a["v"][:, :, :9]), ValueError, r"`key` and `value`"),
    "kv_heads_mismatch": (_with(v=lambda a: a["v"][:, :1]), ValueError, r"`key` and `value`"),
    "heads_not_multiple": (
        _with(
            q=lambda a: jnp.ones((B, 6, T, D)), k=lambda a: jnp.ones((B, 4, S, D)), v=lambda a: jnp.ones((B, 4, S, D))
        ),
        ValueError,
        r"`num_heads` \(6\) must be a multiple of `num_kv_heads` \(4\)",
    ),
    "empty_sequence": (_with(q=lambda a: a["q"][:, :, :0]), ValueError, r"non-empty"),
    # dtypes
    "dtype_mismatch": (_with(k=lambda a: a["k"].astype(jnp.float64)), TypeError, r"share one dtype.*float32.*float64"),
    "int_dtype": (
        _with(
            q=lambda a: a["q"].astype(jnp.int32),
            k=lambda a: a["k"].astype(jnp.int32),
            v=lambda a: a["v"].astype(jnp.int32),
        ),
        TypeError,
        r"`query` must be bfloat16, float16, float32 or float64; got int32",
    ),  # fmt: skip
    "not_an_array": (_with(q=lambda a: np.asarray(a["q"]).tolist()), TypeError, r"`query` must be an array"),
    # scale
    "scale_zero": (_with(scale=0.0), ValueError, r"`scale` must be > 0"),
    "scale_negative": (_with(scale=-0.5), ValueError, r"`scale` must be > 0.*-0.5"),
    "scale_nan": (_with(scale=float("nan")), ValueError, r"`scale`"),
    "scale_array": (_with(scale=jnp.asarray(0.5)), TypeError, r"`scale`"),
    # dropout
    "dropout_rate_one": (_with(dropout_rate=1.0), ValueError, r"`dropout_rate`.*1\.0"),
    "dropout_rate_negative": (_with(dropout_rate=-0.1), ValueError, r"`dropout_rate`"),
    "dropout_rate_not_a_number": (_with(dropout_rate="0.1"), TypeError, r"`dropout_rate`"),
    "dropout_without_key": (_with(dropout_rate=0.1, deterministic=False), ValueError, r"`dropout_rng` is None"),
    "dropout_bad_key": (
        _with(dropout_rate=0.1, deterministic=False, dropout_rng=jnp.zeros(2, jnp.float32)),
        TypeError,
        r"`dropout_rng`",
    ),
    # dense mask
    "mask_not_broadcastable": (_with(mask=jnp.ones((T, S + 1), bool)), ValueError, r"`mask` shape \(8, 11\)"),
    "mask_wrong_batch": (_with(mask=jnp.ones((3, 1, T, S), bool)), ValueError, r"`mask`.*dimension B"),
    "mask_rank_5": (_with(mask=jnp.ones((1, B, H, T, S), bool)), ValueError, r"`mask`.*rank 5"),
    "mask_not_bool": (_with(mask=jnp.ones((T, S), jnp.float32)), TypeError, r"`mask` must be boolean"),
    # q_offset
    "q_offset_negative": (_with(q_offset=-1), ValueError, r"`q_offset` must be >= 0.*-1"),
    "q_offset_wrong_shape": (_with(q_offset=jnp.asarray([0, 1, 2])), ValueError, r"`q_offset`.*\[2\].*\(3,\)"),
    "q_offset_2d": (_with(q_offset=jnp.zeros((B, 1), jnp.int32)), ValueError, r"`q_offset`"),
    "q_offset_float_array": (_with(q_offset=jnp.asarray([0.0, 1.0])), TypeError, r"`q_offset`.*integer"),
    "q_offset_float": (_with(q_offset=1.5), TypeError, r"`q_offset`"),
    "q_offset_bool": (_with(q_offset=True), TypeError, r"`q_offset`"),
    # mods and block masks
    "score_mod_not_callable": (_with(score_mod=3), TypeError, r"`score_mod` must be callable"),
    "mask_mod_not_callable": (_with(mask_mod="causal"), TypeError, r"`mask_mod` must be callable"),
    "block_mask_shape": (_with(block_mask=_bm_for(T + 1, S)), ValueError, r"`block_mask` was built for.*9, 10"),
    "block_mask_type": (
        _with(block_mask=jnp.ones((T, S), bool)),
        TypeError,
        r"`block_mask` must be an attnax BlockMask",
    ),
    # kernel options
    "unknown_option": (_with(not_an_option=1), TypeError, r"not_an_option"),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", list(CASES))
def test_argument_errors(case, kernel):
    make, exc, match = CASES[case]
    (q, k, v), kwargs = make()
    with pytest.raises(exc, match=match):
        KERNELS[kernel](q, k, v, **kwargs)


@pytest.mark.parametrize("kernel", ["standard", "memory_efficient", "reference"])
@pytest.mark.parametrize("case", ["heads_not_multiple", "dtype_mismatch", "mask_not_broadcastable", "scale_zero"])
def test_errors_raise_at_trace_time(case, kernel):
    make, exc, match = CASES[case]
    (q, k, v), kwargs = make()
    with pytest.raises(exc, match=match):
        jax.eval_shape(lambda q, k, v: KERNELS[kernel](q, k, v, **kwargs), q, k, v)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_valid_edge_cases_do_not_raise(kernel):
    q, k, v = inputs()
    fn = KERNELS[kernel]
    shapes = [
        # dropout configured but off: no key needed
        jax.eval_shape(lambda: fn(q, k, v, dropout_rate=0.5, deterministic=True)),
        jax.eval_shape(lambda: fn(q, k, v, dropout_rate=0.0, deterministic=False)),
        # broadcastable masks, per-batch offsets, size-1 batch block masks, raw keys
        jax.eval_shape(lambda: fn(q, k, v, mask=jnp.ones((1, H, 1, S), bool), q_offset=jnp.asarray([0, 3]))),
        jax.eval_shape(lambda: fn(q, k, v, block_mask=_bm_for(T, S), scale=1)),
        jax.eval_shape(lambda: fn(q, k, v, dropout_rate=0.2, dropout_rng=jax.random.PRNGKey(0), deterministic=False)),
    ]
    assert all(s.shape == (B, H, T, D) for s in shapes)


def test_kernel_option_errors():
    q, k, v = inputs()
    with pytest.raises(TypeError, match=r"`standard_attention` got unexpected keyword argument\(s\) \['config'\]"):
        standard_attention(q, k, v, config=MemoryEfficientConfig())
    with pytest.raises(TypeError, match=r"`config` must be a MemoryEfficientConfig"):
        memory_efficient_attention(q, k, v, config={"block_q": 8})
    for bad in ({"block_q": 0}, {"block_kv": -1}, {"block_q": 2.0}, {"block_kv": True}):
        with pytest.raises(ValueError, match=r"`MemoryEfficientConfig\.block_(q|kv)` must be a positive int"):
            MemoryEfficientConfig(**bad)
    for name in ("pallas_typo", "XLA", ""):
        with pytest.raises(ValueError, match=r"`implementation` must be one of"):
            flash_attention(q, k, v, implementation=name)


@pytest.mark.parametrize("window", [0, -3, (-2, 1), (1, -2), 1.5, "4", (1, 2, 3), (1.0, 2), True, None])
def test_bad_window_sizes(window):
    with pytest.raises(ValueError, match=r"`window_size`"):
        sliding_window_mod(window)


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: alibi_slopes(0), ValueError, r"`num_heads` must be a positive int; got 0"),
        (lambda: alibi_slopes(2.5), ValueError, r"`num_heads`"),
        (lambda: alibi_slopes(True), ValueError, r"`num_heads`"),
        (lambda: alibi_mod(), ValueError, r"exactly one of `num_heads` or `slopes="),
        (lambda: alibi_mod(4, slopes=jnp.ones(4)), ValueError, r"exactly one of"),
        (lambda: alibi_mod(slopes=jnp.ones((2, 4))), ValueError, r"`slopes` must have shape \[num_heads\]"),
        (lambda: prefix_lm_mod(1.5), ValueError, r"`prefix_length`"),
        (lambda: prefix_lm_mod(jnp.ones((2, 2), jnp.int32)), ValueError, r"`prefix_length`"),
        (lambda: document_mask_mod(jnp.ones(4)), ValueError, r"`segment_ids` must be an int array"),
        (lambda: document_mask_mod(jnp.ones(4, int), jnp.ones((1, 1, 4), int)), ValueError, r"`kv_segment_ids`"),
        (lambda: additive_bias_mod(jnp.ones((T, S))), ValueError, r"`bias` must be a float array of rank 4"),
        (lambda: additive_bias_mod(jnp.ones((1, 1, T, S), int)), ValueError, r"`bias`"),
        (lambda: softcap_mod(0.0), ValueError, r"`cap` must be > 0"),
        (lambda: softcap_mod(-1), ValueError, r"`cap`"),
        (lambda: and_masks(), ValueError, r"`and_masks` needs at least one"),
        (lambda: or_masks(), ValueError, r"`or_masks` needs at least one"),
        (lambda: and_masks(causal_mod().mask_mod, 3), TypeError, r"`mask_mod` must be callable"),
        (lambda: compose_score_mods(causal_mod(), "softcap"), TypeError, r"`score_mod` must be callable"),
        (lambda: mask_mod_to_score_mod(None), TypeError, r"`mask_mod` must be callable"),
    ],
)
def test_mod_constructor_errors(build, exc, match):
    with pytest.raises(exc, match=match):
        build()
