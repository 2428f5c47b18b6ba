"""The XLA kernels run the conformance suite; the flash_attention dispatcher's choices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnax.kernels import (
    MemoryEfficientConfig,
    _dispatch,
    causal_mod,
    flash_attention,
    memory_efficient_attention,
    sliding_window_mod,
    standard_attention,
)
from attnax.reference import attention_reference

try:
    from conformance import AttentionConformance, fast_jit, oracle, random_qkv, to64
except ImportError:  # tests/ imported as a package
    from tests.conformance import AttentionConformance, fast_jit, oracle, random_qkv, to64


def me_jit(config, **kwargs):
    return fast_jit(lambda q, k, v: memory_efficient_attention(q, k, v, config=config, **kwargs))


class TestStandard(AttentionConformance):
    kernel = staticmethod(standard_attention)


class TestMemoryEfficient(AttentionConformance):
    kernel = staticmethod(memory_efficient_attention)
    # Small chunks so that every case runs the multi-chunk, padded paths.
    kernel_options = {"config": MemoryEfficientConfig(block_q=8, block_kv=16)}

    @given(
        block_q=st.integers(1, 20),
        block_kv=st.integers(1, 20),
        T=st.integers(1, 30),
        S=st.integers(1, 30),
        q_offset=st.integers(0, 10),
    )
    def test_random_block_sizes(self, block_q, block_kv, T, S, q_offset):
        q, k, v = random_qkv(T * 31 + S, 1, 2, 1, T, S, 4)
        kw = {"score_mod": sliding_window_mod((5, 1)), "q_offset": q_offset}
        cfg = MemoryEfficientConfig(block_q=block_q, block_kv=block_kv)
        out, lse = me_jit(cfg, return_lse=True, **kw)(q, k, v)
        r_out, r_lse = oracle(*to64(q, k, v), return_lse=True, **kw)
        np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(lse, r_lse, atol=2e-5, rtol=2e-5)

    def test_block_sizes_do_not_change_results(self):
        q, k, v = random_qkv(3, 2, 2, 1, 45, 50, 8, dtype=jnp.float64)
        kw = {"score_mod": causal_mod(), "q_offset": 5}
        outs = [
            me_jit(MemoryEfficientConfig(bq, bkv), **kw)(q, k, v) for bq, bkv in [(512, 512), (7, 9), (1, 50), (45, 1)]
        ]
        for o in outs[1:]:
            np.testing.assert_allclose(o, outs[0], atol=1e-12)

    def test_kv_offset(self):
        # A key shard starting at absolute position 20: the same as slicing the full computation.
        q, k, v = random_qkv(4, 1, 2, 2, 10, 40, 8)
        kw = {"score_mod": sliding_window_mod((25, 0)), "q_offset": 30}
        full = oracle(*to64(q, k, v), **kw)
        shard_k, shard_v = k[:, :, 20:], v[:, :, 20:]
        out = memory_efficient_attention(q, shard_k, shard_v, kv_offset=20, **kw, **self.kernel_options)
        # Window (25, 0) from positions 30..39 never reaches keys < 5, and keys 5..19 are
        # visible in `full` but missing in the shard: compare against the oracle on the
        # shard with the same absolute positions instead.
        mask = np.zeros((1, 1, 10, 40), bool)
        mask[..., 20:] = True
        expected = oracle(*to64(q, k, v), mask=jnp.asarray(mask), **kw)
        np.testing.assert_allclose(out, expected, atol=2e-5)
        assert not np.allclose(out, full, atol=1e-3)


class TestFlashDispatch:
    @pytest.mark.parametrize("implementation", ["xla", "memory_efficient", None])
    def test_each_implementation_matches_oracle(self, implementation):
        q, k, v = random_qkv(5, 2, 4, 2, 21, 34, 8)
        kw = {"score_mod": causal_mod(), "q_offset": 13}
        ct = jnp.asarray(np.random.default_rng(0).standard_normal(q.shape), jnp.float32)

        @fast_jit
        def run(q, k, v):
            out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, implementation=implementation, **kw), q, k, v)
            r_out, r_vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, **kw), *to64(q, k, v))
            return out, vjp(ct), r_out, r_vjp(to64(ct))

        out, grads, r_out, r_grads = run(q, k, v)
        np.testing.assert_allclose(out, r_out, atol=2e-5, rtol=2e-5)
        for a, e in zip(grads, r_grads):
            np.testing.assert_allclose(a, e, atol=1e-4, rtol=1e-4)

    def test_options_reach_the_kernel(self):
        q, k, v = random_qkv(6, 1, 2, 2, 20, 20, 8)
        out, lse = flash_attention(
            q, k, v, implementation="memory_efficient", config=MemoryEfficientConfig(4, 4), return_lse=True
        )
        r_out, r_lse = oracle(*to64(q, k, v), return_lse=True)
        np.testing.assert_allclose(out, r_out, atol=2e-5)
        np.testing.assert_allclose(lse, r_lse, atol=2e-5)

    @pytest.mark.parametrize("name", ["pallas_triton", "XLA", "", "cudnn_typo"])
    def test_unknown_implementation(self, name):
        q, k, v = random_qkv(7, 1, 1, 1, 4, 4, 4)
        with pytest.raises(ValueError, match="`implementation`"):
            flash_attention(q, k, v, implementation=name)

    def _spy(self, monkeypatch):
        calls = []
        impls = dict(_dispatch.IMPLEMENTATIONS)
        for name, fn in impls.items():
            impls[name] = lambda *a, _n=name, _f=fn, **kw: (calls.append(_n), _f(*a, **kw))[1]
        monkeypatch.setattr(_dispatch, "IMPLEMENTATIONS", impls)
        return calls

    @pytest.mark.parametrize("implementation", ["xla", "memory_efficient"])
    @pytest.mark.parametrize("T", [16, 4096])
    def test_explicit_choice_is_honoured(self, monkeypatch, implementation, T):
        calls = self._spy(monkeypatch)
        # Shapes only: eval_shape traces without computing the long case.
        q = jax.ShapeDtypeStruct((1, 1, T, 8), jnp.float32)
        out = jax.eval_shape(lambda q: flash_attention(q, q, q, implementation=implementation), q)
        assert out.shape == (1, 1, T, 8)
        assert calls == [implementation]

    @pytest.mark.parametrize("T,expected", [(16, "xla"), (2048, "xla"), (2049, "memory_efficient")])
    def test_auto_choice(self, monkeypatch, T, expected):
        calls = self._spy(monkeypatch)
        q = jax.ShapeDtypeStruct((1, 1, T, 8), jnp.float32)
        k = jax.ShapeDtypeStruct((1, 1, 2048, 8), jnp.float32)
        jax.eval_shape(lambda q, k: flash_attention(q, k, k), q, k)
        assert calls == [expected]

    def test_explicit_choice_never_falls_back(self, monkeypatch):
        # A kernel option the chosen implementation does not accept raises; the
        # dispatcher does not retry with another implementation that would accept it.
        calls = self._spy(monkeypatch)
        q, k, v = random_qkv(8, 1, 1, 1, 8, 8, 4)
        with pytest.raises(TypeError, match="config"):
            flash_attention(q, k, v, implementation="xla", config=MemoryEfficientConfig())
        assert calls == ["xla"]

        def broken(*args, **kwargs):
            raise NotImplementedError("this implementation cannot serve these arguments")

        monkeypatch.setitem(_dispatch.IMPLEMENTATIONS, "memory_efficient", broken)
        with pytest.raises(NotImplementedError):
            flash_attention(q, k, v, implementation="memory_efficient")
        assert calls == ["xla"]
