"""The conformance suite every attnax kernel runs (DESIGN.md §7).

A kernel's test class subclasses :class:`AttentionConformance` and sets
``kernel`` (a callable with the :class:`attnax.typing.AttentionFn` keywords,
BHSD layout), its tolerances, and capability flags. Every case compares the
kernel with :func:`attnax.reference.attention_reference` evaluated in float64
on the same fresh random inputs (never zeros), cast up from the kernel's input
dtype so that input rounding is not counted as kernel error.

A capability the kernel lacks is skipped explicitly, with a reason, never
silently passed::

    class TestMyKernel(AttentionConformance):
        kernel = staticmethod(my_attention)
        kernel_options = {"config": MyConfig(block_q=16, block_kv=16)}
        supports_dropout = False
        skip_reasons = {"dropout": "my_attention has no dropout yet"}

Kernels that need setup (a mesh, a cache) override :meth:`attend` instead.

Compilation dominates the cost of these tests on CPU, so related cases are
checked together: :meth:`AttentionConformance.check_cases` traces the kernel
and the oracle for several cases into one jitted program, and reports a
mismatch by case name. The class name has no ``Test`` prefix, so pytest only
collects subclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnax import _dropout
from attnax.block_mask import create_block_mask
from attnax.reference import attention_reference
from attnax.score_mods import (
    additive_bias_mod,
    alibi_mod,
    alibi_slopes,
    and_masks,
    causal_mod,
    compose_score_mods,
    document_mask_mod,
    mask_mod_to_score_mod,
    or_masks,
    prefix_lm_mod,
    sliding_window_mod,
    softcap_mod,
)

__all__ = [
    "AttentionConformance",
    "MOD_CASES",
    "TableMask",
    "fast_jit",
    "numpy_attention",
    "oracle",
    "random_like",
    "random_qkv",
    "to64",
]

F16, F32, F64, BF16 = jnp.float16, jnp.float32, jnp.float64, jnp.bfloat16

# Hypothesis runs a method's examples on the instance of each subclass: that is
# intended here (one property, several kernels), not a flaky executor.
_property = settings(suppress_health_check=[HealthCheck.differing_executors])


# --------------------------------------------------------------------------- helpers


def _fast_compile_options():
    # These tests check semantics, not speed, and XLA:CPU compilation dominates
    # their cost: its cheaper optimisation level halves it. Other backends
    # (compiled GPU runs) keep their defaults.
    try:
        cpu = jax.default_backend() == "cpu"
    except RuntimeError:
        cpu = False
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if cpu else None


def fast_jit(fn=None, **kwargs):
    """``jax.jit`` with the cheap compiler options on CPU (usable as a decorator)."""
    if fn is None:
        return functools.partial(fast_jit, **kwargs)
    return jax.jit(fn, compiler_options=_fast_compile_options(), **kwargs)


#: The oracle under jit (op-by-op dispatch is slow); mods and arrays are traced arguments.
oracle = fast_jit(attention_reference, static_argnames=("scale", "dropout_rate", "deterministic", "return_lse"))


def random_qkv(seed, B, H, Hk, T, S, D, Dv=None, dtype=F32):
    """Fresh normal ``q [B,H,T,D]``, ``k [B,Hk,S,D]``, ``v [B,Hk,S,Dv]`` (never zeros)."""
    rng = np.random.default_rng(seed)
    Dv = D if Dv is None else Dv
    q = jnp.asarray(rng.standard_normal((B, H, T, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, Hk, S, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, Hk, S, Dv)), dtype)
    return q, k, v


def to64(*xs):
    """The float64 oracle's view of the kernel's inputs (exactly representable)."""
    out = tuple(jnp.asarray(x).astype(F64) for x in xs)
    return out if len(out) > 1 else out[0]


def random_like(seed, x):
    """A random array (a cotangent) with the shape and dtype of ``x``."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(jnp.shape(x)), jnp.asarray(x).dtype)


def numpy_attention(q, k, v, mask=None, scale=None):
    """Plain float64 softmax attention in numpy (GQA by repeating kv heads): ``(out, lse)``.

    Independent of attnax; hidden rows give output 0 and LSE ``-inf``.
    """
    q, k, v = (np.asarray(jnp.asarray(x).astype(F64)) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    with np.errstate(divide="ignore"):
        lse = np.log(l[..., 0]) + m[..., 0]
    return np.einsum("bhts,bhsd->bhtd", p, v), lse


def assert_no_nan(tree, what=""):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert not np.any(np.isnan(np.asarray(jnp.asarray(leaf).astype(F64)))), f"NaN in {what}"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["table"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TableMask:
    """A mask mod that looks up an arbitrary boolean table ``[B|1, H|1, q_offset + T, S]``.

    The table is a pytree leaf (an operand, not a captured constant), indexed
    by absolute query position; size-1 leading dimensions broadcast.
    """

    table: Any

    def __call__(self, b, h, q_idx, kv_idx):
        t = self.table
        bb = b if t.shape[0] > 1 else 0
        hh = h if t.shape[1] > 1 else 0
        return t[bb, hh, q_idx, kv_idx]


def _doc_ids(rng, shape, n_docs=3):
    return jnp.asarray(np.sort(rng.integers(0, n_docs, size=shape), axis=-1), jnp.int32)


def _bias(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), F32)


# Every prebuilt mod alone and in compositions, in groups checked together:
# group -> (capabilities needed, {case name: factory}). A factory takes
# (B, H, T, S, rng) and returns the call's keyword arguments (the kernel and
# the oracle get the same ones); q_offset is 0 unless the case sets it.
MOD_CASES = {
    "masks": (
        (),
        {
            "causal": lambda B, H, T, S, rng: {"score_mod": causal_mod()},
            "causal_bottom_right": lambda B, H, T, S, rng: {"score_mod": causal_mod(), "q_offset": S - T},
            "causal_per_batch_offset": lambda B, H, T, S, rng: {
                "score_mod": causal_mod(),
                "q_offset": jnp.asarray([3, S - T], jnp.int32),
            },
            "prefix_lm_int": lambda B, H, T, S, rng: {"score_mod": prefix_lm_mod(7)},
            "prefix_lm_per_batch": lambda B, H, T, S, rng: {
                "score_mod": prefix_lm_mod(jnp.asarray([2, 11], jnp.int32))
            },
        },
    ),
    "windows": (
        (),
        {
            "window_int": lambda B, H, T, S, rng: {"score_mod": sliding_window_mod(5)},
            "window_left_right": lambda B, H, T, S, rng: {"score_mod": sliding_window_mod((3, 2)), "q_offset": 4},
            "window_unbounded_left": lambda B, H, T, S, rng: {"score_mod": sliding_window_mod((-1, 4))},
            "window_unbounded_right": lambda B, H, T, S, rng: {"score_mod": sliding_window_mod((4, -1))},
            "window_unbounded_both": lambda B, H, T, S, rng: {"score_mod": sliding_window_mod((-1, -1))},
            "window_diagonal_only": lambda B, H, T, S, rng: {"score_mod": sliding_window_mod((0, 0))},
        },
    ),
    "score_rewrites": (
        (),
        {
            "alibi": lambda B, H, T, S, rng: {"score_mod": alibi_mod(H), "q_offset": 3},
            "alibi_causal": lambda B, H, T, S, rng: {"score_mod": compose_score_mods(causal_mod(), alibi_mod(H))},
            "additive_bias": lambda B, H, T, S, rng: {"score_mod": additive_bias_mod(_bias(rng, (B, H, T, S)))},
            "additive_bias_broadcast": lambda B, H, T, S, rng: {
                "score_mod": additive_bias_mod(_bias(rng, (1, H, 1, S)))
            },
            "softcap_float": lambda B, H, T, S, rng: {"score_mod": softcap_mod(0.7)},
            "softcap_array": lambda B, H, T, S, rng: {"score_mod": softcap_mod(jnp.asarray(1.5, F32))},
            "plain_callable_score_mod": lambda B, H, T, S, rng: {"score_mod": lambda s, b, h, q, k: s * 1.5 - 0.1 * h},
        },
    ),
    "documents": (
        (),
        {
            "document_1d": lambda B, H, T, S, rng: {"score_mod": document_mask_mod(_doc_ids(rng, (S,)))},
            "document_2d": lambda B, H, T, S, rng: {"score_mod": document_mask_mod(_doc_ids(rng, (B, S)))},
            "document_kv_segments": lambda B, H, T, S, rng: {
                "score_mod": document_mask_mod(_doc_ids(rng, (B, T)), _doc_ids(rng, (B, S)))
            },
        },
    ),
    "compositions": (
        (),
        {
            "compose_causal_softcap_alibi": lambda B, H, T, S, rng: {
                "score_mod": compose_score_mods(causal_mod(), softcap_mod(1.0), alibi_mod(H))
            },
            "compose_window_bias": lambda B, H, T, S, rng: {
                "score_mod": compose_score_mods(sliding_window_mod((6, 1)), additive_bias_mod(_bias(rng, (B, H, T, S))))
            },
            "mask_mod_to_score_mod": lambda B, H, T, S, rng: {
                "score_mod": mask_mod_to_score_mod(lambda b, h, q, k: (q + k + h) % 3 != 0)
            },
            "mask_mod_and": lambda B, H, T, S, rng: {
                "mask_mod": and_masks(causal_mod().mask_mod, lambda b, h, q, k: (k % 2 == 0) | (k == q))
            },
            "mask_mod_or": lambda B, H, T, S, rng: {
                "mask_mod": or_masks(sliding_window_mod(3).mask_mod, lambda b, h, q, k: k < 2 + b)
            },
            "mask_mod_plus_score_mod": lambda B, H, T, S, rng: {
                "score_mod": compose_score_mods(softcap_mod(2.0), alibi_mod(H)),
                "mask_mod": prefix_lm_mod(5).mask_mod,
            },
            "mask_mod_and_mask_type_score_mod": lambda B, H, T, S, rng: {
                "score_mod": sliding_window_mod(8),
                "mask_mod": lambda b, h, q, k: (k + h) % 4 != 1,
            },
        },
    ),
    "dense_mask": (
        ("mask",),
        {
            "dense_mask_full": lambda B, H, T, S, rng: {"mask": jnp.asarray(rng.random((B, H, T, S)) < 0.6)},
            "dense_mask_broadcast_with_causal": lambda B, H, T, S, rng: {
                "mask": jnp.asarray(rng.random((T, S)) < 0.6),
                "score_mod": causal_mod(),
                "q_offset": S - T,
            },
            "dense_mask_batch_keys": lambda B, H, T, S, rng: {"mask": jnp.asarray(rng.random((B, 1, 1, S)) < 0.7)},
        },
    ),
    "block_mask": (
        ("block_mask",),
        {
            "block_mask_causal": lambda B, H, T, S, rng: {
                "block_mask": create_block_mask(causal_mod().mask_mod, None, None, T, S, block_size=(8, 16))
            },
            "block_mask_documents_with_score_mod": lambda B, H, T, S, rng: {
                "block_mask": create_block_mask(
                    document_mask_mod(_doc_ids(rng, (B, S))).mask_mod, B, None, T, S, block_size=(4, 8)
                ),
                "score_mod": softcap_mod(1.0),
            },
            "block_mask_with_offset_and_mask_mod": lambda B, H, T, S, rng: {
                "block_mask": create_block_mask(
                    sliding_window_mod(9).mask_mod, None, H, T, S, block_size=5, q_offset=6
                ),
                "q_offset": 6,
                "mask_mod": lambda b, h, q, k: (q - k) != 2,
            },
        },
    ),
}

# Learnable mod leaves: name -> (leaf factory(B, H, T, S, rng, dtype), mod from the leaf).
MOD_LEAF_CASES = {
    "additive_bias": (
        lambda B, H, T, S, rng, dt: jnp.asarray(rng.standard_normal((B, H, T, S)), dt),
        additive_bias_mod,
    ),
    "additive_bias_broadcast": (
        lambda B, H, T, S, rng, dt: jnp.asarray(rng.standard_normal((1, H, T, 1)), dt),
        lambda x: compose_score_mods(causal_mod(), additive_bias_mod(x)),
    ),
    "alibi_slopes": (
        lambda B, H, T, S, rng, dt: jnp.asarray(alibi_slopes(H) * 4.0, dt),
        lambda x: compose_score_mods(causal_mod(), alibi_mod(slopes=x)),
    ),
    "softcap_cap": (
        lambda B, H, T, S, rng, dt: jnp.asarray(0.8, dt),
        lambda x: compose_score_mods(sliding_window_mod((5, 5)), softcap_mod(x)),
    ),
}


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["out", "lse", "grads", "ref_out", "ref_lse", "ref_grads"],
    meta_fields=[],
)
@dataclasses.dataclass
class CaseResult:
    """The kernel's and the oracle's results for one case (gradients: ``(dq, dk, dv)`` or None)."""

    out: Any
    lse: Any
    grads: Any
    ref_out: Any
    ref_lse: Any
    ref_grads: Any


# --------------------------------------------------------------------------- the base class


class AttentionConformance:
    """The shared cases. Subclasses set ``kernel`` and override knobs and flags."""

    #: The kernel under test: ``kernel(q, k, v, **AttentionFn keywords)``.
    kernel: ClassVar[Any] = None
    #: Extra keywords passed on every call (block sizes, implementation=...).
    kernel_options: ClassVar[dict] = {}

    #: The dtype of the inputs of most cases (a bfloat16-only kernel sets BF16).
    input_dtype: ClassVar[Any] = F32
    #: Tolerances against the float64 oracle: float32 inputs (atol, rtol, grad_*),
    #: float64 inputs (*64) and bfloat16 inputs (bf16_*).
    atol: ClassVar[float] = 2e-5
    rtol: ClassVar[float] = 2e-5
    grad_atol: ClassVar[float] = 1e-4
    grad_rtol: ClassVar[float] = 1e-4
    atol64: ClassVar[float] = 1e-10
    grad_atol64: ClassVar[float] = 1e-9
    bf16_atol: ClassVar[float] = 3e-2
    bf16_grad_atol: ClassVar[float] = 1.5e-1
    #: float16 inputs (three more mantissa bits than bfloat16).
    f16_atol: ClassVar[float] = 5e-3
    f16_grad_atol: ClassVar[float] = 2e-2
    #: The dtype of test_grad_mod_leaves (None: float64 if supported, else
    #: ``input_dtype``). Leaf gradients sum the score cotangents over whole rows
    #: and columns, weighted by positions (ALiBi: ``|i - j|``); a flash kernel's
    #: ``delta = rowsum(dO * O)`` uses its rounded ``O``, so a bfloat16 kernel
    #: checks them in float16, where that rounding is 8x smaller.
    leaf_grad_dtype: ClassVar[Any] = None

    #: ``(B, H, Hk, T, S, D)``: GQA, MQA, T != S, lengths off any block grid.
    shapes: ClassVar[tuple] = (
        (2, 4, 2, 37, 53, 16),
        (1, 2, 2, 16, 16, 8),
        (2, 3, 1, 5, 64, 8),
        (1, 1, 1, 1, 7, 4),
    )
    #: The shape of the per-mod cases (B must be 2: some cases have per-batch arrays; S > T).
    mod_shape: ClassVar[tuple] = (2, 4, 2, 19, 27, 8)
    dropout_shape: ClassVar[tuple] = (2, 4, 2, 21, 37, 8)  # (B, H, Hk, T, S, D) of test_dropout_matches_oracle
    #: ``{group: [case names]}`` to run fewer cases of some ``MOD_CASES``
    #: groups (slow interpreted kernels); None runs every case.
    mod_case_subset: ClassVar[dict | None] = None

    supports_float64: ClassVar[bool] = True
    supports_bf16: ClassVar[bool] = True
    supports_dropout: ClassVar[bool] = True
    supports_mask: ClassVar[bool] = True
    supports_block_mask: ClassVar[bool] = True
    supports_grad_mod_leaves: ClassVar[bool] = True
    supports_vmap: ClassVar[bool] = True
    supports_lse_grad: ClassVar[bool] = True
    supports_value_head_dim: ClassVar[bool] = True  # Dv != D
    supports_eager: ClassVar[bool] = True  # callable outside jit
    #: Why a capability is missing, e.g. {"dropout": "..."}: shown in the skip.
    skip_reasons: ClassVar[dict] = {}

    # ------------------------------------------------------------------ plumbing

    def attend(self, query, key, value, **kwargs):
        """Calls the kernel under test (override for kernels needing setup, e.g. a mesh)."""
        fn = inspect.getattr_static(self, "kernel")
        fn = fn.__func__ if isinstance(fn, staticmethod) else fn
        if fn is None:
            raise TypeError(f"{type(self).__name__} must set `kernel` (or override `attend`).")
        return fn(query, key, value, **{**self.kernel_options, **kwargs})

    def qkv(self, seed, B, H, Hk, T, S, D, Dv=None, dtype=None):
        """Fresh random inputs in ``dtype`` (default: ``input_dtype``)."""
        return random_qkv(seed, B, H, Hk, T, S, D, Dv=Dv, dtype=self.input_dtype if dtype is None else dtype)

    def jit_attend(self, q, k, v, **kwargs):
        """The kernel under ``jax.jit`` (op-by-op dispatch is slow on CPU)."""
        return fast_jit(lambda q, k, v: self.attend(q, k, v, **kwargs))(q, k, v)

    def require(self, *capabilities):
        for c in capabilities:
            if not getattr(self, f"supports_{c}"):
                why = self.skip_reasons.get(c, "not supported by this kernel")
                pytest.skip(f"{type(self).__name__} has no {c}: {why}")

    def tol(self, dtype, grad=False):
        if dtype == F64:
            return (self.grad_atol64, 1e-9) if grad else (self.atol64, 1e-10)
        if dtype == BF16:
            return (self.bf16_grad_atol, 5e-2) if grad else (self.bf16_atol, 2e-2)
        if dtype == F16:
            return (self.f16_grad_atol, 1e-2) if grad else (self.f16_atol, 5e-3)
        return (self.grad_atol, self.grad_rtol) if grad else (self.atol, self.rtol)

    def assert_close(self, actual, expected, dtype, grad=False, what=""):
        atol, rtol = self.tol(dtype, grad)
        actual = np.asarray(jnp.asarray(actual).astype(F64))
        expected = np.asarray(jnp.asarray(expected).astype(F64))
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=what)

    def grad_dtype(self):
        return F64 if self.supports_float64 else self.input_dtype

    def check_cases(self, cases, *, grads=True, lse=True, seed=0):
        """Checks each case against the float64 oracle: output, LSE and ``jax.vjp`` gradients.

        Args:
            cases: ``{name: ((q, k, v), kwargs)}``. Kernel and oracle for every
                case are traced into one jitted program (one compilation).
                ``kwargs`` may be a function returning them, called while
                tracing (so that building a block mask is traced too).
            grads: also compare ``(dq, dk, dv)`` for a random output cotangent.
            lse: also compare the LSE.

        Returns:
            ``{name: CaseResult}`` for further assertions.
        """
        names = list(cases)
        inputs = {n: cases[n][0] for n in names}
        cts = {}  # random output cotangents [B, H, T, Dv]
        for i, (n, (q, _, v)) in enumerate(inputs.items()):
            cts[n] = jnp.asarray(np.random.default_rng(seed + i).standard_normal(q.shape[:3] + v.shape[3:]), q.dtype)

        def run(inputs, cts):
            res = {}
            for n in names:
                kw = cases[n][1]
                kw = kw() if callable(kw) else kw

                def kern(q, k, v, kw=kw):
                    return self.attend(q, k, v, return_lse=True, **kw)

                def ref(q, k, v, kw=kw):
                    return attention_reference(q, k, v, return_lse=True, **kw)

                qkv, ct = inputs[n], cts[n]
                if grads:
                    out, vjp, l = jax.vjp(kern, *qkv, has_aux=True)
                    r_out, r_vjp, r_l = jax.vjp(ref, *to64(*qkv), has_aux=True)
                    g, r_g = vjp(ct.astype(out.dtype)), r_vjp(ct.astype(F64))
                else:
                    (out, l), (r_out, r_l) = kern(*qkv), ref(*to64(*qkv))
                    g = r_g = None
                res[n] = CaseResult(out, l, g, r_out, r_l, r_g)
            return res

        results = fast_jit(run)(inputs, cts)
        for n in names:
            r = results[n]
            q, k, v = inputs[n]
            dtype = q.dtype
            assert r.out.dtype == dtype, f"{n}: output dtype {r.out.dtype} != query dtype {dtype}"
            assert r.out.shape == q.shape[:3] + v.shape[3:], f"{n}: output shape {r.out.shape}"
            assert_no_nan((r.out, r.lse, r.grads), f"{n}: kernel results")
            self.assert_close(r.out, r.ref_out, dtype, what=f"{n}: out")
            if lse:
                assert r.lse.shape == q.shape[:3], f"{n}: lse shape {r.lse.shape}"
                assert r.lse.dtype == (F64 if dtype == F64 else F32), f"{n}: lse dtype {r.lse.dtype}"
                self.assert_close(r.lse, r.ref_lse, F32 if dtype == BF16 else dtype, what=f"{n}: lse")
            if grads:
                for name, a, e, x in zip("qkv", r.grads, r.ref_grads, (q, k, v)):
                    assert a.dtype == x.dtype and a.shape == x.shape, f"{n}: d{name} {a.dtype}{a.shape}"
                    self.assert_close(a, e, dtype, grad=True, what=f"{n}: d{name}")
        return results

    def check_vs_oracle(self, q, k, v, *, grads=True, lse=True, seed=0, **kwargs):
        """One case of :meth:`check_cases`; returns its :class:`CaseResult`."""
        return self.check_cases({"case": ((q, k, v), kwargs)}, grads=grads, lse=lse, seed=seed)["case"]

    # ------------------------------------------------------------------ forward, gradients, LSE

    @pytest.mark.parametrize("dtype", [None, F64], ids=["input_dtype", "f64"])
    def test_forward_and_grads(self, dtype):
        if dtype == F64:
            self.require("float64")
        dtype = self.input_dtype if dtype is None else dtype
        cases = {}
        for i, (B, H, Hk, T, S, D) in enumerate(self.shapes):
            cases[f"shape{(B, H, Hk, T, S, D)}"] = (self.qkv(i, B, H, Hk, T, S, D, dtype=dtype), {})
        scaled = {"scale": 0.9, "score_mod": causal_mod()}
        cases["scale=0.9,causal"] = (self.qkv(99, 1, 2, 2, 13, 21, 8, dtype=dtype), scaled)
        results = self.check_cases(cases)
        # LSE and output against a plain numpy softmax too (independent of the oracle).
        for n, ((q, k, v), kw) in cases.items():
            if not kw:
                expected_out, expected_lse = numpy_attention(q, k, v)
                self.assert_close(results[n].out, expected_out, dtype, what=f"{n}: out vs numpy")
                self.assert_close(results[n].lse, expected_lse, dtype, what=f"{n}: lse vs numpy")

    def test_forward_only(self):
        # The forward without a VJP (a custom_vjp kernel takes a different path).
        B, H, Hk, T, S, D = self.shapes[0]
        q, k, v = self.qkv(7, B, H, Hk, T, S, D)
        res = self.check_cases(
            {
                "plain": ((q, k, v), {}),
                "causal_offset": ((q, k, v), {"score_mod": causal_mod(), "q_offset": 16}),
                "scale": ((q, k, v), {"scale": 0.3, "score_mod": alibi_mod(H)}),
            },
            grads=False,
        )
        assert not np.allclose(res["plain"].out, res["causal_offset"].out, atol=1e-3)

    def test_value_head_dim(self):
        self.require("value_head_dim")
        q, k, v = self.qkv(9, 2, 2, 1, 11, 19, 8, Dv=12)
        self.check_vs_oracle(q, k, v, score_mod=sliding_window_mod(4))

    def test_lse_gradient(self):
        self.require("lse_grad")
        dt = self.grad_dtype()
        q, k, v = self.qkv(10, 2, 2, 1, 17, 23, 8, dtype=dt)
        kw = {"score_mod": compose_score_mods(causal_mod(), alibi_mod(2)), "q_offset": 6}
        cts = (random_like(1, q), random_like(2, q[..., 0]))

        def loss(fn, q, k, v, cts):
            out, lse = fn(q, k, v, return_lse=True, **kw)
            return jnp.sum(out * cts[0]) + jnp.sum(lse * cts[1])

        def both(q, k, v, cts):
            g = jax.grad(functools.partial(loss, self.attend), argnums=(0, 1, 2))(q, k, v, cts)
            r = jax.grad(functools.partial(loss, attention_reference), argnums=(0, 1, 2))(*to64(q, k, v), to64(*cts))
            return g, r

        g, r = fast_jit(both)(q, k, v, cts)
        for a, e, n in zip(g, r, "qkv"):
            self.assert_close(a, e, dt, grad=True, what=f"d{n} through lse")

    # ------------------------------------------------------------------ mods

    @pytest.mark.parametrize("group", list(MOD_CASES))
    def test_mods(self, group):
        needs, factories = MOD_CASES[group]
        self.require(*needs)
        if self.mod_case_subset is not None and group in self.mod_case_subset:
            factories = {n: factories[n] for n in self.mod_case_subset[group]}
        B, H, Hk, T, S, D = self.mod_shape
        seed = list(MOD_CASES).index(group)
        q, k, v = self.qkv(seed, B, H, Hk, T, S, D)
        rng = np.random.default_rng(seed)
        cases = {name: ((q, k, v), functools.partial(f, B, H, T, S, rng)) for name, f in factories.items()}
        results = self.check_cases(cases, seed=seed)
        plain = numpy_attention(q, k, v)[0]
        atol = self.tol(q.dtype)[0]
        for name, r in results.items():
            # Every case but the unbounded window changes the result: the mod is not ignored.
            change = np.max(np.abs(np.asarray(r.out.astype(F64)) - plain))
            if name == "window_unbounded_both":
                assert change <= atol, f"{name}: {change}"
            else:
                assert change > 4 * atol, f"{name}: the mod changes the output by only {change}"

    def test_grad_mod_leaves(self):
        self.require("grad_mod_leaves")
        dt = self.leaf_grad_dtype or self.grad_dtype()
        B, H, Hk, T, S, D = self.mod_shape
        rng = np.random.default_rng(20)
        leaves = {n: make(B, H, T, S, rng, dt) for n, (make, _) in MOD_LEAF_CASES.items()}
        q, k, v = self.qkv(21, B, H, Hk, T, S, D, dtype=dt)
        ct = random_like(22, q)

        def loss(fn, make_mod, q, k, v, leaf):
            return jnp.sum(fn(q, k, v, score_mod=make_mod(leaf)) * ct.astype(q.dtype))

        def run(q, k, v, leaves):
            out = {}
            for n, (_, make_mod) in MOD_LEAF_CASES.items():
                g = jax.grad(functools.partial(loss, self.attend, make_mod), argnums=(0, 3))(q, k, v, leaves[n])
                r = jax.grad(functools.partial(loss, attention_reference, make_mod), argnums=(0, 3))(
                    *to64(q, k, v, leaves[n])
                )
                out[n] = (g, r)
            return out

        for n, (g, r) in fast_jit(run)(q, k, v, leaves).items():
            assert g[1].shape == leaves[n].shape and g[1].dtype == leaves[n].dtype, n
            assert np.any(np.asarray(r[1]) != 0), n
            self.assert_close(g[1], r[1], dt, grad=True, what=f"d{n}")
            self.assert_close(g[0], r[0], dt, grad=True, what=f"{n}: dq")

    # ------------------------------------------------------------------ GQA, offsets, odd lengths

    def test_gqa_mqa(self):
        cases = {}
        for name, H, Hk in [("gqa", 6, 3), ("mqa", 4, 1), ("mha", 4, 4)]:
            # A head-dependent mod checks that `h` is the query head.
            mod = compose_score_mods(causal_mod(), alibi_mod(H), lambda s, b, h, qi, ki: s + 0.3 * h)
            cases[name] = (self.qkv(30 + H + Hk, 2, H, Hk, 13, 29, 8), {"score_mod": mod, "q_offset": 16})
        self.check_cases(cases)

    def test_q_offset(self):
        T, S = 11, 35
        q, k, v = self.qkv(40, 2, 2, 1, T, S, 8)
        offsets = {
            "0": 0,
            "5": 5,
            "S-T": S - T,
            "beyond_S": 40,
            "per_batch": jnp.asarray([0, S - T], jnp.int32),
            "per_batch_size_1": jnp.asarray([7], jnp.int32),
            "scalar_array": jnp.asarray(9, jnp.int32),
        }
        mod = compose_score_mods(sliding_window_mod((6, 2)), alibi_mod(2))
        res = self.check_cases({n: ((q, k, v), {"score_mod": mod, "q_offset": o}) for n, o in offsets.items()})
        assert not np.allclose(res["0"].out, res["5"].out, atol=1e-3)

    def test_odd_lengths(self):
        cases = {}
        for T, S in [(37, 53), (53, 37), (1, 1), (3, 61), (64, 5)]:
            kw = {"score_mod": causal_mod(), "q_offset": max(S - T, 0)}
            cases[f"T={T},S={S}"] = (self.qkv(50 + T, 1, 2, 1, T, S, 8), kw)
        self.check_cases(cases)

    # ------------------------------------------------------------------ fully masked rows

    def test_fully_masked_rows(self):
        B, H, Hk, T, S, D = 2, 2, 1, 13, 21, 8
        q, k, v = self.qkv(60, B, H, Hk, T, S, D)
        # Queries of document 9 find no key of document 9.
        ids_q = jnp.asarray(np.r_[[0] * 4, [9] * 5, [1] * 4], jnp.int32)
        ids_k = jnp.asarray(np.r_[[0] * 10, [1] * 11], jnp.int32)
        kws = {
            "mask_mod": {"mask_mod": lambda b, h, qi, ki: (ki <= qi) & (qi % 3 != 0) & (h + b < 2)},
            "documents": {"score_mod": document_mask_mod(ids_q, ids_k)},
            "everything": {"mask_mod": lambda b, h, qi, ki: ki < 0},
            "window_beyond_keys": {"score_mod": sliding_window_mod((2, 0)), "q_offset": S - 2},
        }
        if self.supports_mask:
            m = np.random.default_rng(0).random((B, 1, T, S)) < 0.5
            m[:, :, ::4] = False
            kws["dense_mask"] = {"mask": jnp.asarray(m)}
        results = self.check_cases({n: ((q, k, v), kw) for n, kw in kws.items()})
        for n, r in results.items():
            hidden = np.asarray(r.ref_lse) == -np.inf
            assert hidden.any() and not (n != "everything" and hidden.all()), f"{n}: bad case"
            out, lse = np.asarray(r.out), np.asarray(r.lse)
            dq, dk, dv = (np.asarray(g) for g in r.grads)
            assert np.all(out[hidden] == 0), f"{n}: fully masked rows must give 0"
            assert np.all(lse[hidden] == -np.inf), f"{n}: fully masked rows must give lse -inf"
            assert np.all(dq[hidden] == 0), f"{n}: fully masked rows must get zero dq"
            assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv)), n
            if n == "everything":
                assert np.all(dk == 0) and np.all(dv == 0)

    # ------------------------------------------------------------------ dropout

    @staticmethod
    def dropout_kw(key, rate=0.3):
        return {"dropout_rate": rate, "dropout_rng": key, "deterministic": False}

    def test_dropout_determinism(self):
        self.require("dropout")
        q, k, v = self.qkv(70, 2, 2, 1, 19, 26, 8)

        @fast_jit
        def f(q, k, v, key):
            on = self.attend(q, k, v, score_mod=causal_mod(), **self.dropout_kw(key))
            # deterministic=True switches dropout off whatever the rate and key.
            off = self.attend(q, k, v, score_mod=causal_mod(), dropout_rate=0.3, dropout_rng=key, deterministic=True)
            return on, off

        (a, off), (b, _), (c, _) = (
            f(q, k, v, jax.random.key(1)),
            f(q, k, v, jax.random.key(1)),
            f(q, k, v, jax.random.key(2)),
        )
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c, atol=1e-3), "a different key must drop different weights"
        no_drop = oracle(*to64(q, k, v), score_mod=causal_mod())
        assert not np.allclose(a, no_drop, atol=1e-3)
        self.assert_close(off, no_drop, self.input_dtype, what="deterministic=True")

    def test_dropout_matches_oracle(self):
        self.require("dropout")
        q, k, v = self.qkv(71, *self.dropout_shape)
        kw = {"score_mod": sliding_window_mod((9, 3)), "q_offset": 5}
        cases = {
            "typed_key": ((q, k, v), {**kw, **self.dropout_kw(jax.random.key(3))}),
            "rate_0.9": ((q, k, v), {"score_mod": causal_mod(), **self.dropout_kw(jax.random.key(4), 0.9)}),
        }
        if self.supports_float64:
            q64 = self.qkv(72, 1, 2, 2, 17, 23, 8, dtype=F64)
            cases["float64_alibi"] = (q64, {"score_mod": alibi_mod(2), **self.dropout_kw(jax.random.key(5), 0.5)})
        res = self.check_cases(cases)
        # jax.random.key(n) and PRNGKey(n) hold the same key data: the same mask (the
        # backward regenerates it from the same seed, so the forward is the check).
        raw = self.check_cases({"raw_key": ((q, k, v), {**kw, **self.dropout_kw(jax.random.PRNGKey(3))})}, grads=False)
        np.testing.assert_array_equal(res["typed_key"].out, raw["raw_key"].out)

    def test_dropout_statistics(self):
        self.require("dropout")
        # A near-zero scale makes attention uniform (p = 1/S); v = identity then
        # reads the keep mask back exactly: out[..., i, j] = keep_ij / ((1 - rate) S).
        B, H, T, S = 4, 4, 64, 16
        q, k, _ = self.qkv(73, B, H, H, T, S, S)
        v = jnp.broadcast_to(jnp.eye(S, dtype=q.dtype), (B, H, S, S))
        key = jax.random.key(5)
        rates = (0.1, 0.5)
        outs = fast_jit(lambda q, k, v: [self.attend(q, k, v, scale=1e-12, **self.dropout_kw(key, r)) for r in rates])(
            q, k, v
        )
        for rate, out in zip(rates, outs):
            keep = np.asarray(out, np.float64) * (1 - rate) * S
            np.testing.assert_allclose(keep, np.round(keep), atol=2e-2)  # 0 or 1 (up to the output's rounding)
            frac = keep.mean()
            assert abs(frac - (1 - rate)) < 0.02, f"kept fraction {frac} vs {1 - rate}"
            # The very same mask as the shared counter-based hash.
            ref_keep = _dropout.keep_mask(
                _dropout.key_to_seed(key), rate, jnp.arange(B)[:, None, None, None], jnp.arange(H)[None, :, None, None],
                jnp.arange(T)[None, None, :, None], jnp.arange(S)[None, None, None, :],
            )  # fmt: skip
            np.testing.assert_array_equal(np.round(keep).astype(bool), np.asarray(ref_keep))

    # ------------------------------------------------------------------ transformations

    def test_eager_matches_jit(self):
        self.require("eager")
        q, k, v = self.qkv(80, 1, 2, 1, 15, 22, 8)
        kw = {"score_mod": compose_score_mods(causal_mod(), softcap_mod(1.0)), "q_offset": 4}
        eager = self.attend(q, k, v, **kw)
        np.testing.assert_allclose(eager, self.jit_attend(q, k, v, **kw), atol=1e-6)
        self.assert_close(eager, oracle(*to64(q, k, v), **kw), self.input_dtype)

    def test_vmap(self):
        self.require("vmap")
        N, B, H, Hk, T, S, D = 3, 2, 2, 1, 9, 14, 8
        q, k, v = self.qkv(81, N * B, H, Hk, T, S, D)
        q, k, v = (x.reshape(N, B, *x.shape[1:]) for x in (q, k, v))
        slopes = jnp.asarray(np.random.default_rng(0).random((N, H)) + 0.1, F32)
        kw = {"score_mod": causal_mod(), "q_offset": 5}

        @fast_jit
        def run(q, k, v, slopes):
            over_inputs = jax.vmap(lambda q, k, v: self.attend(q, k, v, **kw))(q, k, v)
            over_leaves = jax.vmap(lambda s: self.attend(q[0], k[0], v[0], score_mod=alibi_mod(slopes=s)))(slopes)
            return over_inputs, over_leaves

        over_inputs, over_leaves = run(q, k, v, slopes)
        for n in range(N):
            self.assert_close(over_inputs[n], oracle(*to64(q[n], k[n], v[n]), **kw), self.input_dtype, what=f"{n}")
            expected = oracle(*to64(q[0], k[0], v[0]), score_mod=alibi_mod(slopes=slopes[n]))
            self.assert_close(over_leaves[n], expected, self.input_dtype, what=f"slopes {n}")

    def test_grad_composition(self):
        dt = self.grad_dtype()
        q, k, v = self.qkv(83, 2, 2, 1, 12, 17, 8, dtype=dt)
        kw = {"score_mod": compose_score_mods(sliding_window_mod(6), alibi_mod(2))}

        def loss(fn, q, k, v):
            return jnp.sum(jnp.sin(fn(q, k, v, **kw)))

        @fast_jit
        def run(q, k, v):
            g = jax.grad(functools.partial(loss, self.attend), argnums=(0, 1, 2))(q, k, v)
            r = jax.grad(functools.partial(loss, attention_reference), argnums=(0, 1, 2))(*to64(q, k, v))
            if not self.supports_vmap:
                return g, r, None, None
            # grad under vmap: per-example gradients over a leading axis.
            qs = jnp.stack([q, q * 0.5])
            gv = jax.vmap(jax.grad(functools.partial(loss, self.attend)), in_axes=(0, None, None))(qs, k, v)
            rv = jax.grad(functools.partial(loss, attention_reference))(*to64(q * 0.5, k, v))
            return g, r, gv, rv

        g, r, gv, rv = run(q, k, v)
        for a, e, n in zip(g, r, "qkv"):
            self.assert_close(a, e, dt, grad=True, what=f"jit(grad) d{n}")
        if gv is not None:
            self.assert_close(gv[0], r[0], dt, grad=True, what="vmap(grad)[0]")
            self.assert_close(gv[1], rv, dt, grad=True, what="vmap(grad)[1]")

    def test_no_retrace_when_values_change(self):
        B, H, T, S = 2, 2, 12, 16
        rng = np.random.default_rng(90)
        q, k, v = self.qkv(90, B, H, 1, T, S, 8)
        builders = {
            "alibi": lambda x: {"score_mod": alibi_mod(slopes=x)},
            "bias": lambda x: {"score_mod": additive_bias_mod(x)},
            "documents": lambda x: {"score_mod": document_mask_mod(x)},
            "prefix": lambda x: {"score_mod": prefix_lm_mod(x)},
            "softcap": lambda x: {"score_mod": softcap_mod(x)},
            "q_offset": lambda x: {"score_mod": causal_mod(), "q_offset": x},
        }
        values = {
            "alibi": [jnp.asarray(rng.random(H), F32) for _ in range(2)],
            "bias": [jnp.asarray(rng.standard_normal((1, H, T, S)), F32) for _ in range(2)],
            "documents": [jnp.asarray([0] * 6 + [1] * 10, jnp.int32), jnp.asarray([0] * 9 + [1] * 7, jnp.int32)],
            "prefix": [jnp.asarray([3, 5], jnp.int32), jnp.asarray([8, 1], jnp.int32)],
            "softcap": [jnp.asarray(0.5, F32), jnp.asarray(2.0, F32)],
            "q_offset": [jnp.asarray([0, 4], jnp.int32), jnp.asarray([2, 1], jnp.int32)],
        }
        if self.supports_dropout:
            builders["dropout"] = lambda x: self.dropout_kw(x, 0.4)
            values["dropout"] = [jax.random.key(0), jax.random.key(1)]
        traces = []

        @fast_jit
        def f(q, k, v, xs):
            traces.append(1)
            return {n: self.attend(q, k, v, **builders[n](x)) for n, x in xs.items()}

        @fast_jit
        def ref(q, k, v, xs):
            return {n: attention_reference(q, k, v, **builders[n](x)) for n, x in xs.items()}

        outs = [f(q, k, v, {n: vs[i] for n, vs in values.items()}) for i in range(2)]
        assert len(traces) == 1, f"retraced {len(traces)} times when mod values changed"
        for i in range(2):
            expected = ref(*to64(q, k, v), {n: vs[i] for n, vs in values.items()})
            for n in values:
                self.assert_close(outs[i][n], expected[n], self.input_dtype, what=f"{n} values #{i}")
        for n in values:
            assert not np.allclose(outs[0][n], outs[1][n], atol=1e-5), f"new {n} values must change the result"

    def test_no_retrace_grad_mod_leaves(self):
        self.require("grad_mod_leaves")
        q, k, v = self.qkv(91, 1, 2, 2, 10, 10, 8)
        traces = []

        @fast_jit
        def g(q, k, v, bias):
            traces.append(1)
            return jax.grad(lambda b: jnp.sum(self.attend(q, k, v, score_mod=additive_bias_mod(b)) ** 2))(bias)

        rng = np.random.default_rng(91)
        grads = [g(q, k, v, jnp.asarray(rng.standard_normal((1, 2, 10, 10)), F32)) for _ in range(3)]
        assert len(traces) == 1
        assert not np.allclose(grads[0], grads[1])

    def test_bitwise_identical_reruns(self):
        q, k, v = self.qkv(92, 2, 4, 2, 23, 31, 16)
        kw = {"score_mod": compose_score_mods(causal_mod(), alibi_mod(4)), "q_offset": 8}
        if self.supports_dropout:
            kw.update(self.dropout_kw(jax.random.key(9)))
        ct = random_like(93, q)

        @fast_jit
        def run(q, k, v):
            out, vjp, lse = jax.vjp(lambda q, k, v: self.attend(q, k, v, return_lse=True, **kw), q, k, v, has_aux=True)
            return out, lse, vjp(ct)

        a, b = run(q, k, v), run(q, k, v)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)

    def test_bfloat16(self):
        self.require("bf16")
        q, k, v = self.qkv(94, 2, 4, 2, 21, 30, 16, dtype=BF16)
        self.check_vs_oracle(q, k, v, score_mod=causal_mod(), q_offset=9)

    # ------------------------------------------------------------------ properties (hypothesis)

    def _fwd_pair(self):
        # One jitted (kernel, oracle) forward per test: examples with the same
        # shapes and static settings reuse its compilation; arrays are arguments.
        if not hasattr(self, "_fwd_pair_fn"):

            def run(q, k, v, kw):
                return (
                    self.attend(q, k, v, return_lse=True, **kw),
                    attention_reference(*to64(q, k, v), return_lse=True, **kw),
                )

            self._fwd_pair_fn = fast_jit(run)
        return self._fwd_pair_fn

    def _check_pair(self, q, k, v, **kw):
        (out, lse), (r_out, r_lse) = self._fwd_pair()(q, k, v, kw)
        assert_no_nan((out, lse))
        self.assert_close(out, r_out, q.dtype, what="out")
        self.assert_close(lse, r_lse, q.dtype, what="lse")

    @_property
    @given(data=st.data())
    def test_random_shapes_offsets_windows(self, data):
        B = data.draw(st.integers(1, 2), "B")
        Hk = data.draw(st.integers(1, 2), "Hk")
        G = data.draw(st.integers(1, 2), "G")
        T = data.draw(st.integers(1, 40), "T")
        S = data.draw(st.integers(1, 40), "S")
        D = data.draw(st.sampled_from([4, 8]), "D")
        q_offset = data.draw(st.integers(0, 20), "q_offset")
        left = data.draw(st.integers(-1, 8), "left")
        right = data.draw(st.integers(-1, 8), "right")
        q, k, v = self.qkv(T * 41 + S, B, Hk * G, Hk, T, S, D)
        window = sliding_window_mod((left, right))
        self._check_pair(q, k, v, score_mod=window, q_offset=jnp.asarray(q_offset, jnp.int32))

    @_property
    @given(data=st.data())
    def test_random_mask_tables(self, data):
        B = data.draw(st.integers(1, 2), "B")
        H = data.draw(st.integers(1, 2), "H")
        T = data.draw(st.sampled_from([1, 7, 24]), "T")
        S = data.draw(st.sampled_from([1, 9, 24]), "S")
        q_offset = data.draw(st.integers(0, 6), "q_offset")
        density = data.draw(st.sampled_from([0.1, 0.5, 0.9]), "density")
        per_bh = data.draw(st.booleans(), "per_batch_head")
        seed = data.draw(st.integers(0, 2**16), "seed")
        rng = np.random.default_rng(seed)
        # Rows cover absolute positions up to 6 + T: the shape does not depend on q_offset.
        shape = (B, H, 6 + T, S) if per_bh else (1, 1, 6 + T, S)
        table = TableMask(jnp.asarray(rng.random(shape) < density))
        q, k, v = self.qkv(seed, B, H, 1, T, S, 4)
        self._check_pair(q, k, v, mask_mod=table, q_offset=jnp.asarray(q_offset, jnp.int32))
