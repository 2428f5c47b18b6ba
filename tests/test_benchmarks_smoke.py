"""The benchmark harness: counts, the numpy reference, and one ``--smoke`` run end to end (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from attnax.reference import attention_reference
from attnax.score_mods import mask_mod_to_boolean_mask
from benchmarks._cases import Case, reference_rows, row_intervals, suite_cases, visible_fraction
from benchmarks._timing import attention_flops, count, kv_bytes
from benchmarks.peers.attnax_kernels import score_mod_for

ROOT = Path(__file__).resolve().parent.parent

SMALL = [
    Case("t", "causal", B=1, H=2, Hk=2, T=48, S=48, D=8, causal=True),
    Case("t", "window", B=1, H=2, Hk=2, T=48, S=48, D=8, causal=True, window=(6, 0)),
    Case("t", "window2", B=1, H=2, Hk=2, T=40, S=48, D=8, window=(3, 5), q_offset=8),
    Case("t", "docs", B=1, H=2, Hk=2, T=50, S=50, D=8, causal=True, docs=3),
    Case("t", "alibi_cap", B=1, H=4, Hk=2, T=32, S=32, D=8, causal=True, alibi=True, softcap=1.5),
    Case("t", "decode", B=1, H=4, Hk=2, T=1, S=40, D=8, q_offset=39),
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_intervals_match_attnax_masks(case):
    mod = score_mod_for(case)
    if mod is None or not mod.has_mask:
        mask = np.ones((case.T, case.S), bool)
    else:
        mask = np.asarray(mask_mod_to_boolean_mask(mod.mask, 1, 1, case.T, case.S, q_offset=case.q_offset))[0, 0]
    lo, hi = row_intervals(case, np.arange(case.T))
    j = np.arange(case.S)[None, :]
    np.testing.assert_array_equal((j >= lo[:, None]) & (j < hi[:, None]), mask)
    assert visible_fraction(case) == pytest.approx(mask.mean())


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_reference_rows_match_the_oracle(case):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((case.B, case.H, case.T, case.D))
    k = rng.standard_normal((case.B, case.Hk, case.S, case.D))
    v = rng.standard_normal((case.B, case.Hk, case.S, case.D))
    want = np.asarray(
        attention_reference(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), score_mod=score_mod_for(case), q_offset=case.q_offset
        )
    )
    rows = np.arange(case.T)
    g = case.H // case.Hk
    for h in range(case.H):
        got = reference_rows(case, h, q[0, h], k[0, h // g], v[0, h // g], rows)
        np.testing.assert_allclose(got, want[0, h], atol=1e-9)


def test_counts():
    causal = next(c for c in suite_cases("dense", full=True) if c.causal)
    assert attention_flops(causal) == 4 * causal.B * causal.H * causal.S**2 * causal.D / 2
    assert count(causal, "fwd+bwd")["flops"] == 3.5 * attention_flops(causal)
    win = next(c for c in suite_cases("mods") if c.window)
    assert attention_flops(win) < 0.07 * 4 * win.H * win.S**2 * win.D
    dec = suite_cases("decode")[0]
    assert kv_bytes(dec) == 2 * dec.B * dec.Hk * dec.S * dec.D * 2
    assert count(dec, "fwd")["bytes"] == kv_bytes(dec)
    for s in ("dense", "mods", "decode"):
        for c in suite_cases(s, full=True):
            assert c.peers[0] == "attnax" and not set(c.peers) & {p for p, _ in c.na}


def test_smoke_run_end_to_end(tmp_path):
    cmd = [
        sys.executable, "-m", "benchmarks", "--smoke", "--suite", "dense,mods,decode",
        "--cases", "d32-*,softcap*,*page16", "--peers", "attnax,xla,torch_sdpa_flash",
        "--out", str(tmp_path), "--quiet", "--time-budget", "120",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    docs = {p.name.split("-")[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(docs) == {"dense", "mods", "decode"}
    for suite, doc in docs.items():
        assert len(list(tmp_path.glob(f"{suite}-*.md"))) == 1
        assert doc["environment"]["versions"]["jax"] and doc["environment"]["date"]
    res = {(r["suite"], r["case"], r["peer"], r["mode"]): r for d in docs.values() for r in d["results"]}
    for mode in ("fwd", "fwd+bwd"):
        for peer in ("attnax", "xla"):
            r = res[("dense", "d32-s128-b2", peer, mode)]
            assert r["status"] == "ok", r
            assert r["ms"] > 0 and r["tflops"] > 0
        assert res[("mods", "softcap2", "xla", mode)]["status"] == "n/a"
        assert res[("mods", "softcap2", "attnax", mode)]["status"] == "ok"
    for key, r in res.items():
        if r["status"] == "ok" and r["mode"] == "fwd":
            assert r["check_ok"], (key, r)
    assert res[("decode", "b2-s256-page16", "xla", "fwd")]["status"] == "ok"
    assert res[("decode", "b2-s256-page16", "xla", "fwd")]["tbps"] > 0
    # Not importable here (or no CUDA): reported, never fatal.
    assert res[("dense", "d32-s128-b2", "torch_sdpa_flash", "fwd")]["status"] in ("unavailable", "ok")
    md = next(tmp_path.glob("dense-*.md")).read_text()
    assert "| case | mode | attnax |" in md and "×xla" in md
