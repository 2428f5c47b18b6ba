"""Benchmark cases: shapes, masks and score mods, and which peers can serve each.

A :class:`Case` is plain data (it crosses the process boundary as JSON). Its
mask is described, not coded: ``causal``, a ``window (left, right)``,
``docs`` equal-length packed documents, ``alibi`` and ``softcap`` score mods,
with the semantics of DESIGN.md §3. Every peer builds its own version of the
mask from that description, and :func:`reference_rows` (numpy, float64)
checks a few output rows of each against the same semantics.

This module imports numpy only: the parent process and the PyTorch children
use it too.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from benchmarks.peers import PEERS

__all__ = [
    "SUITES",
    "Case",
    "alibi_slopes",
    "document_ids",
    "reference_rows",
    "row_intervals",
    "suite_cases",
    "visible_fraction",
]

SUITES = ("dense", "mods", "decode")

#: The XLA peer materialises ``[B, H, T, S]`` scores; above this it is skipped.
XLA_MAX_S = 8192


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    Attributes:
        suite: ``'dense'``, ``'mods'`` or ``'decode'``.
        name: unique within the suite; ``--cases`` filters match it.
        B, H, Hk, T, S, D: batch, query heads, kv heads, query and kv lengths,
            head dim (``Dv = D``).
        causal: key ``j`` visible to query ``i`` iff ``j <= i + q_offset``.
        window: ``(left, right)`` sliding window, -1 = unbounded; ANDed with
            ``causal``.
        docs: number of packed documents of (almost) equal length; ids by
            absolute position, see :func:`document_ids`. 0 = none.
        alibi: add ``-slope[h] * |q_idx - kv_idx|`` (standard slopes).
        softcap: ``cap * tanh(score / cap)`` after ALiBi.
        q_offset: absolute position of the first query (decode: ``S - 1``).
        page: decode only: page size of the paged KV cache; None = contiguous.
        modes: ``'fwd'`` and/or ``'fwd+bwd'``.
        default: part of the default run (``--full`` runs every case).
        peers: the peers that can serve this case.
        na: ``(peer, reason)`` pairs for the peers that cannot.
    """

    suite: str
    name: str
    B: int
    H: int
    Hk: int
    T: int
    S: int
    D: int
    causal: bool = False
    window: tuple[int, int] | None = None
    docs: int = 0
    alibi: bool = False
    softcap: float | None = None
    q_offset: int = 0
    page: int | None = None
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    default: bool = True
    peers: tuple[str, ...] = ()
    na: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"

    @property
    def is_decode(self) -> bool:
        return self.suite == "decode"

    @property
    def has_mask(self) -> bool:
        return self.causal or self.window is not None or self.docs > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        d = dict(d)
        if d.get("window") is not None:
            d["window"] = tuple(d["window"])
        d["modes"] = tuple(d.get("modes", ()))
        d["peers"] = tuple(d.get("peers", ()))
        d["na"] = tuple(tuple(x) for x in d.get("na", ()))
        return cls(**d)

    def describe(self) -> str:
        """Short human description of the shape and mask."""
        bits = [f"B={self.B} H={self.H}" + (f"/{self.Hk}" if self.Hk != self.H else "")]
        bits.append(f"T={self.T} S={self.S} D={self.D}")
        if self.causal and not (self.window and self.window[1] == 0):
            bits.append("causal")
        if self.window:
            bits.append(f"window{self.window}")
        if self.docs:
            bits.append(f"{self.docs} docs")
        if self.alibi:
            bits.append("ALiBi")
        if self.softcap:
            bits.append(f"softcap {self.softcap:g}")
        if self.is_decode:
            bits.append("contiguous" if self.page is None else f"page {self.page}")
        return ", ".join(bits)


# -- which peer serves what ---------------------------------------------------


def na_reason(peer: str, c: Case) -> str | None:
    """Why ``peer`` cannot serve case ``c`` (None: it can)."""
    if peer == "attnax":
        return None
    if c.is_decode:
        if peer in ("jax_pallas", "xla"):
            return None
        if peer in ("cudnn", "torch_sdpa_flash", "torch_sdpa_cudnn"):
            return None if c.page is None else "no paged KV cache"
        return "no decode path benchmarked"
    if peer == "xla":
        if c.S > XLA_MAX_S:
            return f"dense XLA materialises [B,H,T,S] scores: skipped above S={XLA_MAX_S}"
        if c.softcap:
            return "jax.nn.dot_product_attention has no logits soft cap"
        return None  # ALiBi as a dense bias, documents as a dense mask: fine at S <= 8192
    if peer == "cudnn":
        if c.alibi:
            return "ALiBi only as a dense [B,H,T,S] bias"
        if c.softcap:
            return "jax.nn.dot_product_attention has no logits soft cap"
        if c.docs:
            return "packed documents need segment ids; jax.nn's cuDNN path takes only a dense mask"
        return None
    if peer == "jax_pallas":
        if c.window is not None:
            return "no sliding window in pallas.ops.gpu.attention.mha"
        if c.alibi or c.softcap:
            return "no score mods in pallas.ops.gpu.attention.mha"
        return None  # documents through segment_ids
    if peer in ("tokamax_mosaic", "tokamax_triton"):
        if c.alibi:
            return "ALiBi only as a dense [B,H,T,S] bias"
        if c.docs:
            return "packed documents only as a dense mask"
        return None
    if peer == "torch_flex":
        return None
    if peer in ("torch_sdpa_flash", "torch_sdpa_cudnn"):
        if c.window is not None or c.docs or c.alibi or c.softcap:
            return "SDPA takes only is_causal or a dense mask"
        return None
    return f"unknown peer {peer!r}"


def _finish(c: Case) -> Case:
    peers, na = [], []
    for p in PEERS:
        r = na_reason(p, c)
        if r is None:
            peers.append(p)
        else:
            na.append((p, r))
    return dataclasses.replace(c, peers=tuple(peers), na=tuple(na))


# -- the suites ---------------------------------------------------------------


def _dense(smoke: bool) -> list[Case]:
    if smoke:
        return [
            Case("dense", "d32-s128-b2", B=2, H=2, Hk=2, T=128, S=128, D=32),
            Case("dense", "d64-s256-b1-causal", B=1, H=2, Hk=2, T=256, S=256, D=64, causal=True),
        ]
    out = []
    for D in (128, 64):
        for S in (2048, 4096, 8192, 16384):
            for causal in (False, True):
                B = 16384 // S
                name = f"d{D}-s{S}-b{B}" + ("-causal" if causal else "")
                # The default run: the settings of ANCHORS.md (D=128; S=8192
                # non-causal, S=16384 causal). The rest: --full or --cases.
                default = D == 128 and ((S == 8192 and not causal) or (S == 16384 and causal))
                out.append(Case("dense", name, B=B, H=16, Hk=16, T=S, S=S, D=D, causal=causal, default=default))
    # Defaults first: under a time budget they run before the rest.
    return sorted(out, key=lambda c: not c.default)


def _mods(smoke: bool) -> list[Case]:
    if smoke:
        base = dict(B=1, H=4, Hk=4, T=256, S=256, D=32, causal=True)
        cap, win, docs = 2.0, 32, 4
    else:
        base = dict(B=1, H=16, Hk=16, T=16384, S=16384, D=128, causal=True)
        cap, win, docs = 50.0, 1024, 8
    return [
        Case("mods", "causal", **base),
        Case("mods", "alibi", alibi=True, **base),
        Case("mods", f"softcap{cap:g}", softcap=cap, **base),
        Case("mods", f"window{win}", window=(win - 1, 0), **base),
        Case("mods", f"docs{docs}", docs=docs, **base),
    ]


def _decode(smoke: bool) -> list[Case]:
    if smoke:
        shapes, pages, H, Hk, D = [(2, 256)], (None, 16, 64), 4, 2, 32
    else:
        shapes, pages, H, Hk, D = [(32, 8192), (8, 32768), (1, 131072)], (None, 16, 256), 32, 8, 128
    out = []
    for B, S in shapes:
        for page in pages:
            name = f"b{B}-s{S}-" + ("contig" if page is None else f"page{page}")
            out.append(Case("decode", name, B=B, H=H, Hk=Hk, T=1, S=S, D=D, q_offset=S - 1, page=page, modes=("fwd",)))
    return out


def suite_cases(suite: str, *, smoke: bool = False, full: bool = False) -> list[Case]:
    """The cases of one suite (``full``: also the non-default ones)."""
    make = {"dense": _dense, "mods": _mods, "decode": _decode}
    if suite not in make:
        raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")
    cases = [_finish(c) for c in make[suite](smoke)]
    return cases if (full or smoke) else [c for c in cases if c.default]


# -- mask semantics and the numpy reference -----------------------------------


def document_ids(case: Case) -> np.ndarray:
    """int32 ``[S]`` document id per absolute position: ``docs`` near-equal runs."""
    n = max(case.docs, 1)
    return ((np.arange(case.S, dtype=np.int64) * n) // case.S).astype(np.int32)


def row_intervals(case: Case, rows) -> tuple[np.ndarray, np.ndarray]:
    """Visible keys of each query row: ``lo <= j < hi`` (every mask here is an interval)."""
    p = np.asarray(rows, dtype=np.int64) + case.q_offset
    lo = np.zeros_like(p)
    hi = np.full_like(p, case.S)
    if case.causal:
        hi = np.minimum(hi, p + 1)
    if case.window is not None:
        left, right = case.window
        if left >= 0:
            lo = np.maximum(lo, p - left)
        if right >= 0:
            hi = np.minimum(hi, p + right + 1)
    if case.docs:
        ids = document_ids(case)
        d = ids[np.clip(p, 0, case.S - 1)]
        lo = np.maximum(lo, np.searchsorted(ids, d, side="left"))
        hi = np.minimum(hi, np.searchsorted(ids, d, side="right"))
    return lo, np.maximum(hi, lo)


def visible_fraction(case: Case) -> float:
    """Exact fraction of visible ``(query, key)`` pairs."""
    lo, hi = row_intervals(case, np.arange(case.T))
    return float(np.sum(hi - lo)) / (case.T * case.S)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The standard ALiBi slopes (geometric; non-powers of two interleaved)."""

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        c = 2 ** math.floor(math.log2(num_heads))
        s = pow2(c) + pow2(2 * c)[0::2][: num_heads - c]
    return np.asarray(s, dtype=np.float32)


def reference_rows(case: Case, h: int, q_rows, k, v, rows) -> np.ndarray:
    """Attention output for some query rows of one (batch, head), float64.

    Args:
        case: the case (mask and mods).
        h: the query head (for ALiBi).
        q_rows: ``[R, D]`` the queries of ``rows``.
        k, v: ``[S, D]`` the keys and values of the matching kv head.
        rows: ``[R]`` query indices (local; ``q_offset`` is added).
    """
    q_rows, k, v = (np.asarray(x, dtype=np.float64) for x in (q_rows, k, v))
    rows = np.asarray(rows, dtype=np.int64)
    s = (q_rows @ k.T) / math.sqrt(case.D)
    j = np.arange(case.S)[None, :]
    p = (rows + case.q_offset)[:, None]
    if case.alibi:
        s = s - float(alibi_slopes(case.H)[h]) * np.abs(p - j)
    if case.softcap:
        s = case.softcap * np.tanh(s / case.softcap)
    lo, hi = row_intervals(case, rows)
    visible = (j >= lo[:, None]) & (j < hi[:, None])
    s = np.where(visible, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(visible, np.exp(s - m), 0.0)
    den = np.sum(e, axis=-1, keepdims=True)
    return (e @ v) / np.where(den > 0, den, 1.0)


def check_points(case: Case, seed: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """``(b, h, rows)`` spot-check points: corners, the middle, random rows."""
    rng = np.random.default_rng(seed)
    pairs = sorted({(0, 0), (case.B - 1, case.H - 1), (case.B // 2, case.H // 2), (case.B - 1, 0)})
    if case.T == 1:
        return [(b, h, np.zeros(1, np.int64)) for b, h in pairs]
    fixed = [0, 1, case.T // 2, case.T - 1]
    out = []
    for b, h in pairs:
        rows = np.unique(np.concatenate([fixed, rng.integers(0, case.T, 12)]))
        out.append((b, h, rows.astype(np.int64)))
    return out


#: Spot-check tolerance on bf16 outputs (max |out - reference|).
CHECK_ATOL = 3e-2
