"""attnax.nn: MultiHeadAttention, RoPE, decode mode, the Flax adapter, and the tiny LM.

Oracles: Flax's own ``nnx.MultiHeadAttention`` with the same parameters, the
module's projections around :func:`attnax.attention_reference`, and the full
(non-cached) causal forward for decode mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnax
from attnax import kernels
from attnax.kernels import MemoryEfficientConfig, memory_efficient_attention, standard_attention
from attnax.nn import AttentionType, MultiHeadAttention, RoPE, apply_rope, as_flax_attention_fn
from attnax.reference import attention_reference
from attnax.score_mods import (
    additive_bias_mod,
    alibi_mod,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    sliding_window_mod,
    softcap_mod,
)

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 parameters and inputs
F = 16  # features


def _x(seed, shape, dtype=np.float32):
    # NumPy draws: eager jax.random compiles a sampler per shape, seconds each on a busy CPU.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _mask(seed, shape, p=0.7):
    """Random boolean mask with key 0 always visible (no empty rows: Flax and attnax differ there)."""
    m = np.random.default_rng(seed).random(shape) < p
    m[..., 0] = True
    return jnp.asarray(m)


@functools.partial(nnx.jit, static_argnames=("is_causal",))
def _run(module, *args, is_causal=False, **kwargs):
    """``module(*args, **kwargs)`` jitted: one compilation beats op-by-op eager dispatch on a tiny CPU."""
    if is_causal:
        kwargs["is_causal"] = True
    return module(*args, **kwargs)


def _flax_mha(num_heads, num_kv_heads=None, in_features=F, seed=0, **kw):
    return nnx.MultiHeadAttention(
        num_heads, in_features, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(seed), **kw
    )


def _ours_like(flax_mha, **kw):
    """An attnax module with ``flax_mha``'s configuration and parameters (different init seed first)."""
    ours = MultiHeadAttention(
        nnx.Rngs(123), num_heads=flax_mha.num_heads, num_kv_heads=flax_mha.num_kv_heads,
        in_features=flax_mha.in_features, in_kv_features=flax_mha.in_kv_features,
        qkv_features=flax_mha.qkv_features, out_features=flax_mha.out_features, **kw,
    )  # fmt: skip
    nnx.update(ours, nnx.state(flax_mha, nnx.Param))
    return ours


def _oracle(attn, x_q, x_kv=None, *, score_mod=None, mask_mod=None, q_offset=0, rope_positions=None, **kw):
    """The module's own projections around the dense reference: the oracle for everything else it does."""
    x_kv = x_q if x_kv is None else x_kv
    q, k, v = attn.query(x_q), attn.key(x_kv), attn.value(x_kv)
    if rope_positions is not None:
        q = apply_rope(q, rope_positions[0])
        k = apply_rope(k, rope_positions[1])
    t = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
    out = attention_reference(t(q), t(k), t(v), score_mod=score_mod, mask_mod=mask_mod, q_offset=q_offset, **kw)
    return attn.out(t(out))


# --- equality with Flax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_self_attention_matches_flax(num_heads, num_kv_heads):
    ref = _flax_mha(num_heads, num_kv_heads)
    ours = _ours_like(ref, attention_fn=standard_attention)
    x = _x(1, (2, 7, F))
    np.testing.assert_allclose(_run(ours, x), _run(ref, x), **TOL)
    # causal: Flax's is_causal vs the constructor's mod, and vs a per-call mod
    causal = _ours_like(ref, score_mod=causal_mod())
    want = _run(ref, x, is_causal=True)
    np.testing.assert_allclose(_run(causal, x), want, **TOL)
    np.testing.assert_allclose(_run(ours, x, score_mod=causal_mod()), want, **TOL)


def test_cross_attention_with_mask_matches_flax():
    ref = nnx.MultiHeadAttention(
        4, F, qkv_features=24, out_features=12, num_kv_heads=2, in_kv_features=10, decode=False, rngs=nnx.Rngs(3)
    )
    ours = _ours_like(ref)  # attention_fn=None: flash_attention
    x_q, x_kv = _x(4, (2, 5, F)), _x(5, (2, 9, 10))
    mask = _mask(6, (2, 1, 5, 9))  # no empty rows
    np.testing.assert_allclose(_run(ours, x_q, x_kv, mask=mask), _run(ref, x_q, x_kv, mask=mask), **TOL)


@pytest.mark.parametrize(
    "kernel",
    [
        standard_attention,
        AttentionType.MEMORY_EFFICIENT,
        functools.partial(memory_efficient_attention, config=MemoryEfficientConfig(block_q=2, block_kv=3)),
        None,
    ],
    ids=["standard", "enum", "partial", "default"],
)
def test_adapter_in_flax_module_matches_flax(kernel):
    x = _x(7, (2, 6, F))
    mask = _mask(8, (2, 1, 6, 6))
    ref = _flax_mha(4, 2, seed=2)
    ours = _flax_mha(4, 2, seed=2, attention_fn=as_flax_attention_fn(kernel))
    np.testing.assert_allclose(_run(ours, x, mask=mask, is_causal=True), _run(ref, x, mask=mask, is_causal=True), **TOL)
    np.testing.assert_allclose(_run(ours, x), _run(ref, x), **TOL)


def test_adapter_direct_call_matches_flax_dot_product_attention():
    fn = as_flax_attention_fn(standard_attention)
    q, k, v = _x(9, (2, 3, 5, 4, 8)), _x(10, (2, 3, 7, 2, 8)), _x(11, (2, 3, 7, 2, 8))  # two batch dims, GQA
    bias = _x(12, (2, 3, 1, 5, 7))
    mask = _mask(13, (2, 3, 4, 5, 7)).astype(jnp.float32)
    want = jax.jit(nnx.dot_product_attention)(q, k, v, bias=bias, mask=mask)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, bias=bias, mask=mask), want, **TOL)
    # unbatched [T, N, D]
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), jax.jit(nnx.dot_product_attention)(q, k, v), **TOL)


def test_adapter_in_flax_decode_mode_matches_flax():
    x = _x(14, (2, 5, F))
    mods = [
        nnx.MultiHeadAttention(4, F, num_kv_heads=2, decode=True, rngs=nnx.Rngs(4), attention_fn=fn)
        for fn in (nnx.dot_product_attention, as_flax_attention_fn(standard_attention))
    ]
    for m in mods:
        m.init_cache(x[:, :1].shape)
    for t in range(5):
        np.testing.assert_allclose(mods[1](x[:, t : t + 1]), mods[0](x[:, t : t + 1]), **TOL)


def test_adapter_rejects_what_kernels_cannot_serve():
    q = _x(15, (1, 4, 2, 8))
    fn = as_flax_attention_fn(standard_attention)
    with pytest.raises(NotImplementedError, match="broadcast_dropout"):
        fn(q, q, q, dropout_rate=0.1, dropout_rng=jax.random.key(0), deterministic=False, broadcast_dropout=True)
    with pytest.raises(NotImplementedError, match="sow"):
        fn(q, q, q, module=object())
    out = fn(q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(0), deterministic=False, broadcast_dropout=False)
    want = jnp.swapaxes(
        attention_reference(*(jnp.swapaxes(a, 1, 2) for a in (q, q, q)), dropout_rate=0.5,
                            dropout_rng=jax.random.key(0), deterministic=False), 1, 2
    )  # fmt: skip
    np.testing.assert_allclose(out, want, **TOL)


# --- attention_fn choices, score mods ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "attention_fn",
    [
        AttentionType.STANDARD,
        "memory_efficient",
        functools.partial(kernels.flash_attention, implementation="memory_efficient"),
        functools.partial(memory_efficient_attention, config=MemoryEfficientConfig(block_q=3, block_kv=2)),
    ],
    ids=["enum", "name", "flash-partial", "mem-eff-partial"],
)
def test_attention_fn_choices_match_reference(attention_fn):
    attn = MultiHeadAttention(nnx.Rngs(0), num_heads=4, num_kv_heads=2, in_features=F, attention_fn=attention_fn)
    x = _x(16, (2, 7, F))
    mod = compose_score_mods(causal_mod(), alibi_mod(4))
    np.testing.assert_allclose(_run(attn, x, score_mod=mod), _oracle(attn, x, score_mod=mod), **TOL)


def test_attention_type_members_resolve_or_say_why():
    assert AttentionType.STANDARD.kernel is attnax.standard_attention
    assert AttentionType.FLASH.kernel is attnax.flash_attention
    for member in AttentionType:
        name = f"{member.value}_attention"
        if hasattr(kernels, name):
            assert member.kernel is getattr(kernels, name)
        else:
            with pytest.raises(NotImplementedError, match=name):
                _ = member.kernel


def test_per_call_score_mod_composes_after_constructor_mod():
    bias = additive_bias_mod(3.0 * _x(17, (1, 4, 6, 6)))
    cap = softcap_mod(0.5)
    attn = MultiHeadAttention(nnx.Rngs(1), num_heads=4, in_features=F, score_mod=bias)
    x = _x(18, (2, 6, F))
    got = attn(x, score_mod=cap)
    np.testing.assert_allclose(got, _oracle(attn, x, score_mod=compose_score_mods(bias, cap)), **TOL)
    wrong_order = _oracle(attn, x, score_mod=compose_score_mods(cap, bias))
    assert not np.allclose(got, wrong_order, atol=1e-3)
    # masks AND: causal (constructor) + window (call)
    attn_c = MultiHeadAttention(nnx.Rngs(1), num_heads=4, in_features=F, score_mod=causal_mod())
    want = _oracle(attn_c, x, score_mod=compose_score_mods(causal_mod(), sliding_window_mod(2)))
    np.testing.assert_allclose(attn_c(x, score_mod=sliding_window_mod(2)), want, **TOL)


def test_plain_callable_mods_under_jit():
    double = lambda s, b, h, q, k: 2.0 * s  # noqa: E731
    attn = MultiHeadAttention(nnx.Rngs(1), num_heads=4, in_features=F, score_mod=double)
    x = _x(33, (2, 6, F))
    got = nnx.jit(lambda m, a: m(a, score_mod=lambda s, b, h, q, k: jnp.where(k <= q, s, -jnp.inf)))(attn, x)
    np.testing.assert_allclose(got, _oracle(attn, x, score_mod=compose_score_mods(double, causal_mod())), **TOL)


def test_documents_are_independent():
    attn = MultiHeadAttention(
        nnx.Rngs(2), num_heads=4, num_kv_heads=2, in_features=F, score_mod=causal_mod(), rope=True
    )
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    x = _x(19, (2, 8, F))
    x2 = x.at[0, 3:7].set(_x(20, (4, F))).at[1, 0:5].set(_x(21, (5, F)))  # change doc 1 of row 0, doc 0 of row 1
    call = nnx.jit(lambda m, a, s: m(a, score_mod=document_mask_mod(s)))
    out, out2 = (call(attn, a, seg) for a in (x, x2))
    same = np.array([[1, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 1, 1, 1]], bool)
    np.testing.assert_allclose(out[same], out2[same], **TOL)
    assert np.all(np.abs(out[~same] - out2[~same]).max(axis=-1) > 1e-3)
    # and each document alone gives the same outputs as in the pack (RoPE is relative)
    alone = nnx.jit(lambda m, a: m(a))(attn, x[:1, 3:7])
    np.testing.assert_allclose(out[:1, 3:7], alone, **TOL)


def test_dropout_on_and_off():
    attn = MultiHeadAttention(nnx.Rngs(3), num_heads=4, in_features=F, dropout_rate=0.5, score_mod=causal_mod())
    x = _x(22, (2, 6, F))
    no_drop = _oracle(attn, x, score_mod=causal_mod())
    np.testing.assert_allclose(attn(x, deterministic=True), no_drop, **TOL)
    key = nnx.Rngs(dropout=7).dropout()  # the key the call below draws
    got = attn(x, rngs=nnx.Rngs(dropout=7))
    want = _oracle(attn, x, score_mod=causal_mod(), dropout_rate=0.5, dropout_rng=key, deterministic=False)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_array_equal(got, attn(x, rngs=nnx.Rngs(dropout=7)))  # same key, same output
    np.testing.assert_array_equal(got, attn(x, rngs=key))  # a key works too
    assert not np.allclose(attn(x), attn(x), atol=1e-3)  # the kept stream advances
    attn.eval()
    np.testing.assert_allclose(attn(x), no_drop, **TOL)


def test_jit_and_grad_match_flax():
    ref = _flax_mha(4, 2, seed=5)
    ours = _ours_like(ref, score_mod=causal_mod())
    x = _x(23, (2, 6, F))
    np.testing.assert_allclose(nnx.jit(lambda m, a: m(a))(ours, x), ref(x, is_causal=True), **TOL)
    cot = _x(24, (2, 6, F))

    def loss_ours(m):
        return jnp.sum(m(x) * cot)

    def loss_ref(m):
        return jnp.sum(m(x, is_causal=True) * cot)

    g_ours = nnx.jit(nnx.grad(loss_ours))(ours)
    g_ref = nnx.grad(loss_ref)(ref)
    flat_ours, flat_ref = (dict(jax.tree_util.tree_leaves_with_path(g)) for g in (g_ours, g_ref))
    assert flat_ours.keys() == flat_ref.keys() and len(flat_ref) == 8  # kernels and biases of q, k, v, out
    for path, a in flat_ours.items():
        np.testing.assert_allclose(a, flat_ref[path], err_msg=str(path), **TOL)


def test_short_optax_loop_loss_falls():
    from attnax._tiny_lm import TinyLM, train

    model = TinyLM(vocab_size=16, d_model=32, num_heads=2, num_kv_heads=1, num_layers=1, rngs=nnx.Rngs(0))
    losses = train(model, 12, log=None, batch_size=8, seq_len=32, learning_rate=2e-2)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


# --- RoPE ----------------------------------------------------------------------------------------------------------


def test_apply_rope_matches_complex_rotation():
    x = _x(25, (2, 5, 3, 8), np.float64)
    pos = jnp.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    xn = np.asarray(x)
    z = xn[..., :4] + 1j * xn[..., 4:]
    theta = np.asarray(pos)[..., None, None] * 10000.0 ** (-np.arange(4) / 4)
    zr = z * np.exp(1j * theta)
    want = np.concatenate([zr.real, zr.imag], axis=-1)
    np.testing.assert_allclose(apply_rope(x, pos), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(RoPE(base=10000.0)(x, pos), want, rtol=1e-12, atol=1e-12)


def test_rope_module_matches_oracle():
    attn = MultiHeadAttention(nnx.Rngs(4), num_heads=2, in_features=F, score_mod=causal_mod(), rope=RoPE())
    x = _x(26, (2, 6, F))
    ar = jnp.arange(6)
    np.testing.assert_allclose(attn(x), _oracle(attn, x, score_mod=causal_mod(), rope_positions=(ar, ar)), **TOL)


# --- decode mode ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_kv_heads,rope,extra_mod,attention_fn",
    [
        (4, False, None, None),
        (4, True, None, None),
        (2, True, None, None),  # GQA
        (1, True, sliding_window_mod(3), None),  # MQA + window
        (2, False, alibi_mod(4), AttentionType.MEMORY_EFFICIENT),
    ],
    ids=["plain", "rope", "gqa-rope", "mqa-window", "alibi-memeff"],
)
def test_decode_matches_full_causal_forward(num_kv_heads, rope, extra_mod, attention_fn):
    mod = compose_score_mods(causal_mod(), extra_mod)
    attn = MultiHeadAttention(
        nnx.Rngs(5), num_heads=4, num_kv_heads=num_kv_heads, in_features=F, score_mod=mod, rope=rope,
        attention_fn=attention_fn,
    )  # fmt: skip
    x = _x(27, (2, 8, F))
    full = attn(x)
    traces = []

    @nnx.jit
    def step(m, tokens):
        traces.append(tokens.shape)
        return m(tokens, decode=True)

    attn.init_cache(batch_size=2, max_length=10)
    outs = [step(attn, x[:, :3])] + [step(attn, x[:, t : t + 1]) for t in range(3, 8)]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)
    assert traces == [(2, 3, F), (2, 1, F)]  # one trace for the prefill, one for all single steps
    assert int(attn.cache.position) == 8


def test_decode_constructor_flag():
    attn = MultiHeadAttention(nnx.Rngs(6), num_heads=2, in_features=F, score_mod=causal_mod(), rope=True, decode=True)
    x = _x(28, (1, 4, F))
    call = nnx.jit(lambda m, a: m(a))
    full = nnx.jit(lambda m, a: m(a, decode=False))(attn, x)
    attn.init_cache(1, 4)
    outs = [call(attn, x[:, t : t + 1]) for t in range(4)]
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


def test_tiny_lm_decode_matches_full_forward():
    from attnax._tiny_lm import TinyLM

    model = TinyLM(vocab_size=16, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(29).integers(0, 16, (2, 7)), jnp.int32)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    model.init_cache(2, 7)
    step = nnx.jit(lambda m, t: m(t, decode=True))
    steps = [step(model, tokens[:, :4])] + [step(model, tokens[:, t : t + 1]) for t in (4, 5, 6)]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_errors_wrong_feature_size():
    attn = MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=F, in_kv_features=6)
    with pytest.raises(ValueError, match=r"`inputs_q` has 12 features .* in_features=16"):
        attn(_x(0, (1, 3, 12)))
    with pytest.raises(ValueError, match=r"`inputs_kv` has 16 features .* in_kv_features=6"):
        attn(_x(0, (1, 3, F)), _x(1, (1, 4, F)))
    with pytest.raises(ValueError, match=r"\[batch, length, features\]"):
        attn(_x(0, (3, F)))


def test_errors_heads_not_dividing():
    with pytest.raises(ValueError, match=r"`num_heads` \(6\) must be a multiple of `num_kv_heads` \(4\)"):
        MultiHeadAttention(nnx.Rngs(0), num_heads=6, num_kv_heads=4, in_features=24)
    with pytest.raises(ValueError, match=r"`qkv_features` \(16\) must be divisible by `num_heads` \(3\)"):
        MultiHeadAttention(nnx.Rngs(0), num_heads=3, in_features=16)
    with pytest.raises(ValueError, match="head dim must be even"):
        MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=6, rope=True)
    with pytest.raises(NotImplementedError, match="broadcast_dropout"):
        MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, dropout_rate=0.1, broadcast_dropout=True)
    with pytest.raises(TypeError, match="attention_fn"):
        MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, attention_fn=3)
    with pytest.raises(ValueError, match="names no attnax kernel"):
        MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, attention_fn="fast")


def test_errors_decode():
    attn = MultiHeadAttention(nnx.Rngs(0), num_heads=2, in_features=8, score_mod=causal_mod())
    x = _x(30, (1, 3, 8))
    with pytest.raises(ValueError, match="init_cache"):
        attn(x, decode=True)
    attn.init_cache(1, 4)
    with pytest.raises(ValueError, match="inputs_kv"):
        attn(x, x, decode=True)
    with pytest.raises(ValueError, match="batch_size=2"):
        attn(_x(31, (2, 1, 8)), decode=True)
    with pytest.raises(ValueError, match="cache overflow: 5 new tokens"):
        attn(_x(32, (1, 5, 8)), decode=True)
    attn(x, decode=True)
    attn(x[:, :1], decode=True)  # 4 of 4
    with pytest.raises(ValueError, match=r"cache overflow: the KV cache holds 4 of max_length=4"):
        attn(x[:, :1], decode=True)
    # under jit the position is traced: the overflowing step returns NaN instead of a wrong answer
    attn.init_cache(1, 2)
    step = nnx.jit(lambda m, a: m(a, decode=True))
    assert np.all(np.isfinite(step(attn, x[:, :1]))) and np.all(np.isfinite(step(attn, x[:, :1])))
    assert np.all(np.isnan(step(attn, x[:, :1])))
    with pytest.raises(ValueError, match="max_length"):
        attn.init_cache(1, 0)
