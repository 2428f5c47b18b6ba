"""``autotune_pallas_config`` and ``block_sizes='autotune'`` (CPU, GPU interpret mode).

Interpret-mode timings mean nothing, so most tests inject fake timings through
``_pallas_autotune._measure``; two run the real timer and kernel.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from attnax.block_mask import create_block_mask
from attnax.kernels import PallasFlashConfig, alibi_mod, autotune_pallas_config, causal_mod, pallas_flash_attention
from attnax.kernels import _pallas_autotune as at
from attnax.kernels import _pallas_mgpu_sm90 as sm90
from attnax.kernels._pallas import default_config

try:
    from conformance import oracle, random_qkv, to64
except ImportError:  # tests/ imported as a package
    from tests.conformance import oracle, random_qkv, to64

A, B, C = PallasFlashConfig(64, 128, 2), PallasFlashConfig(64, 64, 2), PallasFlashConfig(64, 64, 3)
OPTS = {"score_mod": causal_mod(), "interpret": True}


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(at.CACHE_ENV, raising=False)
    at._clear_cache()
    yield
    at._clear_cache()


@pytest.fixture
def qkv():
    return random_qkv(0, 1, 1, 1, 128, 128, 64, dtype=jax.numpy.bfloat16)


class FakeTimer:
    """Returns the given seconds (or raises the given exceptions) in call order, and counts calls."""

    def __init__(self, *results):
        self.results, self.calls = list(results), 0

    def __call__(self, run, repeats):
        result = self.results[self.calls % len(self.results)]
        self.calls += 1
        if isinstance(result, Exception):
            raise result
        return result


def test_fastest_candidate_is_chosen_and_cached(monkeypatch, qkv):
    timer = FakeTimer(3e-3, 1e-3, 2e-3)
    monkeypatch.setattr(at, "_measure", timer)
    assert autotune_pallas_config(*qkv, candidates=[A, B, C], **OPTS) == B
    assert timer.calls == 3
    assert autotune_pallas_config(*qkv, candidates=[A, B, C], **OPTS) == B  # from the cache
    assert timer.calls == 3
    # Another signature (grad) is timed anew; cache=False times and stores nothing.
    assert autotune_pallas_config(*qkv, candidates=[A, B, C], grad=True, **OPTS) == B
    assert timer.calls == 6
    assert autotune_pallas_config(*qkv, candidates=[A, C], cache=False, interpret=True) == C
    assert timer.calls == 8
    assert at._lookup(at.signature(*qkv, at._call_kwargs({"interpret": True}), grad=False)) is None


def test_default_candidates_are_timed(monkeypatch, qkv):
    defaults = at.default_candidates(qkv[0], qkv[2], kv_len=128, masked=True)
    timer = FakeTimer(*[1.0 + i for i in range(len(defaults))][::-1])  # the last one is fastest
    monkeypatch.setattr(at, "_measure", timer)
    assert autotune_pallas_config(*qkv, **OPTS) == defaults[-1]
    assert timer.calls == len(defaults) == 4


def test_default_candidates_fit_shared_memory():
    q64, q128, q256 = (jax.ShapeDtypeStruct((1, 1, 4096, d), jax.numpy.bfloat16) for d in (64, 128, 256))
    c64 = at.default_candidates(q64, q64, kv_len=4096, masked=False)
    assert c64[0] == default_config(64, kv_len=4096, masked=False) and len(c64) == 6
    causal64 = at.default_candidates(q64, q64, kv_len=4096, masked=True, causal_only=True)
    assert causal64[0] == default_config(64, kv_len=4096, masked=True, causal_only=True)  # the call's own default
    assert causal64[0].block_kv == 256
    c128 = at.default_candidates(q128, q128, kv_len=4096, masked=True)
    assert set(c128) == {A, B, C}  # 128-key tiles with 3 stages (224 KiB) and 256-key tiles do not fit
    assert at.default_candidates(q256, q256, kv_len=4096, masked=True) == [default_config(256)]
    short = at.default_candidates(q64, q64, kv_len=100, masked=True)
    assert max(c.block_kv for c in short) == 128  # no tiles longer than the padded keys


def test_failing_candidate_is_skipped_and_reported(monkeypatch, qkv):
    timer = FakeTimer(RuntimeError("RESOURCE_EXHAUSTED: shared memory"), 2e-3, 1e-3)
    monkeypatch.setattr(at, "_measure", timer)
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 of 3 candidates.*block_kv=128.*RESOURCE_EXHAUSTED"):
        assert autotune_pallas_config(*qkv, candidates=[A, B, C], **OPTS) == C


def test_candidate_the_kernel_rejects_is_skipped_real_timer(qkv):
    """Real timing: a block mask without a mask mod fits 128-key tiles only; 256-key tiles fail to trace."""
    bm = create_block_mask(causal_mod().mask_mod, None, None, 128, 128, block_size=(128, 128))
    bm = dataclasses.replace(bm, mask_mod=None)
    wide = PallasFlashConfig(64, 256, 2)
    with pytest.warns(UserWarning, match=r"block_kv=256.*ValueError.*block_size"):
        assert autotune_pallas_config(*qkv, candidates=[wide, A], repeats=1, block_mask=bm, interpret=True) == A


def test_all_candidates_failing_raises_with_reasons(monkeypatch, qkv):
    monkeypatch.setattr(at, "_measure", FakeTimer(RuntimeError("first reason"), ValueError("second reason")))
    with pytest.raises(RuntimeError, match=r"(?s)all 2 candidates failed.*first reason.*second reason"):
        autotune_pallas_config(*qkv, candidates=[A, B], **OPTS)
    assert not at._CACHE


def test_arguments_are_checked(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="candidates="):
        autotune_pallas_config(q, k, v, block_sizes=A, interpret=True)
    with pytest.raises(TypeError, match="`candidates`"):
        autotune_pallas_config(q, k, v, candidates=[A, (64, 64, 2)], interpret=True)
    with pytest.raises(ValueError, match="`repeats`"):
        autotune_pallas_config(q, k, v, repeats=0, interpret=True)
    with pytest.raises(NotImplementedError, match="bfloat16"):  # the kernel's own check, before any timing
        autotune_pallas_config(*(x.astype(np.float32) for x in qkv), interpret=True)
    with pytest.raises(ValueError, match="'autotune'"):
        pallas_flash_attention(q, k, v, block_sizes="auto", interpret=True)
    with pytest.raises(TypeError, match="PallasFlashConfig, 'autotune' or None"):
        pallas_flash_attention(q, k, v, block_sizes=(64, 128, 2), interpret=True)


def test_tracer_arguments_raise_type_error(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="`query` is a tracer"):
        jax.jit(lambda q: autotune_pallas_config(q, k, v, interpret=True))(q)
    with pytest.raises(TypeError, match="`score_mod` is a tracer"):
        jax.jit(lambda mod: autotune_pallas_config(q, k, v, score_mod=mod, interpret=True))(alibi_mod(1))


def test_autotune_inside_jit_uses_the_cached_config(monkeypatch, qkv):
    q, k, v = qkv
    attend = jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, block_sizes="autotune", **OPTS))
    with pytest.raises(ValueError, match=r"autotune_pallas_config\(query, key, value"):
        attend(q, k, v)
    monkeypatch.setattr(at, "_measure", FakeTimer(2.0, 1.0))
    assert autotune_pallas_config(*qkv, candidates=[A, C], **OPTS) == C
    used = []
    real = sm90.forward_kernel_call
    monkeypatch.setattr(sm90, "forward_kernel_call", lambda *a, **kw: used.append(a[-2]) or real(*a, **kw))
    out = attend(q, k, v)
    assert [(st.block_kv, st.num_stages) for st in used] == [(C.block_kv, C.num_stages)]
    ref = oracle(*to64(q, k, v), score_mod=causal_mod())
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2)


def test_autotune_prefers_a_config_tuned_for_training(monkeypatch, qkv):
    monkeypatch.setattr(at, "_measure", FakeTimer(2.0, 1.0))
    assert autotune_pallas_config(*qkv, candidates=[A, B], **OPTS) == B
    assert at.tuned_config(*qkv, dict(OPTS)) == B
    monkeypatch.setattr(at, "_measure", FakeTimer(1.0, 2.0))
    assert autotune_pallas_config(*qkv, candidates=[A, B], grad=True, **OPTS) == A
    assert at.tuned_config(*qkv, dict(OPTS)) == A


def test_json_cache_round_trip(monkeypatch, tmp_path, qkv):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(at.CACHE_ENV, str(path))
    monkeypatch.setattr(at, "_measure", FakeTimer(2.0, 1.0))
    assert autotune_pallas_config(*qkv, candidates=[A, C], **OPTS) == C
    (key, fields), *others = json.loads(path.read_text()).items()
    assert not others and "device=" in key and fields == dataclasses.asdict(C)

    at._clear_cache()  # a new process: only the file remembers
    monkeypatch.setattr(at, "_measure", FakeTimer(RuntimeError("must not time")))
    assert autotune_pallas_config(*qkv, candidates=[A, C], **OPTS) == C

    path.write_text("{not json")
    at._clear_cache()
    monkeypatch.setattr(at, "_measure", FakeTimer(1.0, 2.0))
    with pytest.warns(UserWarning, match="ignoring the autotune cache"):
        assert autotune_pallas_config(*qkv, candidates=[A, C], **OPTS) == A
    assert json.loads(path.read_text()) == {key: dataclasses.asdict(A)}
