"""Shared pieces of the Mosaic GPU kernels: version shims and mods on tiles.

Mods are plain ``jnp`` code written against arrays. Inside a Mosaic GPU kernel
their array leaves live in global memory and positions are register tiles, so
each leaf is handed to the mod as a :class:`TileOperand`: indexing it by the
scalar ``b``/``h`` loads a scalar, and indexing a dimension by the very
``q_idx``/``kv_idx`` arrays the kernel passed to the mod loads the row,
column or tile that those positions cover. Nothing else about the mod changes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def interpret_params():
    """``InterpretGPUParams()``: public in newer jax, private in jax 0.10."""
    cls = getattr(plgpu, "InterpretGPUParams", None)
    if cls is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    return cls()


# plgpu.load takes the index as a separate argument in jax 0.10 and deprecates
# it in jax 0.11 (index the ref instead).
_LOAD_PARAMS = inspect.signature(plgpu.load).parameters
_LOAD_NEEDS_INDEX = "idx" in _LOAD_PARAMS and _LOAD_PARAMS["idx"].default is inspect.Parameter.empty


def _load(ref, layout):
    if _LOAD_NEEDS_INDEX:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def bhsd_dims(x, bshd: bool):
    """``(batch, heads, seq, dim)`` of a q/k/v-like array in the BHSD or BSHD layout."""
    B, a, c, D = x.shape
    return (B, c, a, D) if bshd else (B, a, c, D)


def layout_shape(B, H, S, D, bshd: bool):
    """The shape of a ``[B, H, S, D]`` array in the BHSD or BSHD layout."""
    return (B, S, H, D) if bshd else (B, H, S, D)


def slab(ref, b, h, rows, bshd: bool):
    """Rows ``rows`` of head ``h`` of batch row ``b``: a ``[rows, dim]`` view for TMA.

    In BSHD the rows are strided by ``heads * dim``; the TMA copy engine reads
    them in place, so neither layout needs a transpose copy.
    """
    return ref.at[b, rows, h] if bshd else ref.at[b, h, rows]


WGMMA = plgpu.Layout.WGMMA
_LOG2E = 1.4426950408889634
WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)
WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)


class Lowering:
    """Register-layout helpers that GPU interpret mode does not model.

    Compiled, arrays carry explicit wgmma layouts; interpreted, layouts do not
    exist (``layout_cast`` and ``plgpu.load`` have no interpret rules), so the
    same kernel code goes through these helpers.
    """

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)

    def vector_iota(self, n: int, axis: int):
        """``0..n-1`` as a vector along ``axis`` of a wgmma tile (its row or column layout)."""
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, (n,), 0)
        return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=WGMMA_ROW if axis == 0 else WGMMA_COL)

    def broadcast(self, v, shape, axis: int):
        """A vector along ``axis`` of a tile, repeated along the other axis."""
        return self.cast(lax.broadcast_in_dim(v, shape, [axis]), WGMMA)

    def load(self, ref, layout):
        return ref[...] if self.interpret else _load(ref, layout)

    # GPU interpret mode (jax 0.10) models wgmma only with both operands in
    # shared memory and B untransposed. Interpreted, the two products below are
    # plain dots of the same shared-memory tiles; barriers, TMA copies and the
    # warp-specialised schedule around them run unchanged.

    def matmul_nt(self, a_smem, b_smem, shape, during=None):
        """``a @ b.T`` of two shared-memory tiles, f32; ``during()`` runs while it computes."""
        if self.interpret:
            out = jnp.dot(a_smem[...], b_smem[...].T, preferred_element_type=jnp.float32)
            if during is not None:
                during()
            return out

        def body(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
            if during is not None:
                during()
            return acc_ref[...]

        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def matmul_acc(self, acc, a, b_smem):
        """``acc + a @ b`` accumulated in place in the wgmma registers (``acc`` f32)."""
        if self.interpret:
            return acc + jnp.dot(a, b_smem[...], preferred_element_type=jnp.float32)
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b_smem))(plgpu.ACC.init(acc))

    # Asynchronous accumulation. Compiled, accumulators are wgmma registers
    # (``plgpu.ACC``) that several matmuls write in flight, read with an explicit
    # ``wait_n``; interpreted, they are boxes holding a value, updated in program
    # order. Loops that keep accumulators across iterations carry
    # ``values(accs)`` (empty when compiled) and ``restore`` them in the body.

    def accumulators(self, fn, *shapes):
        """``fn(*accs)`` with zeroed float32 accumulators of ``shapes``; returns its result."""
        if self.interpret:
            return fn(*[_ValueAcc(shape) for shape in shapes])
        return pl.run_scoped(fn, *[plgpu.ACC(shape, jnp.float32) for shape in shapes])

    def T(self, ref):
        """A shared-memory tile, transposed, as a matmul operand."""
        return _Transposed(ref) if self.interpret else ref.transpose((1, 0))

    def mma(self, acc, a, b):
        """``acc += a @ b`` (``a`` in registers or shared memory, ``b`` a tile or ``T(tile)``)."""
        if not self.interpret:
            plgpu.wgmma(acc, a, b)
            return
        a_val = a if isinstance(a, jax.Array) else a[...]
        b_val = b.ref[...].T if isinstance(b, _Transposed) else b[...]
        acc.value = acc.value + jnp.dot(a_val, b_val, preferred_element_type=jnp.float32)

    def read(self, acc, wait_n: int | None = 0):
        """The accumulator's value once at most ``wait_n`` matmuls are still in flight
        (``None``: no wait; only for an accumulator no matmul in flight writes)."""
        if self.interpret:
            return acc.value
        return plgpu.wgmma_accumulator_load(acc, wait_n=wait_n)

    def store(self, acc, value):
        """Overwrites an accumulator with a register value (no matmul on it may be in flight)."""
        if self.interpret:
            acc.value = value
        else:
            acc[...] = value

    def wait(self, n: int = 0):
        """Waits until at most ``n`` matmuls are in flight."""
        if not self.interpret:
            plgpu.wgmma_wait(n)

    def walk(self, accs, walk, body, t0=None, carry=None):
        """``walk.consume`` of ``body(j, t, is_partial)`` with ``accs`` live across the tiles.

        Returns the visit count end, like ``TileWalk.consume``. With a
        ``carry`` (a pytree of register values), ``body(j, t, is_partial,
        carry)`` returns the new carry and this returns ``(t, carry)``.
        """

        def visit(j, t, is_partial, values):
            values, c = values
            self.restore(accs, values)
            if carry is None:
                body(j, t, is_partial)
            else:
                c = body(j, t, is_partial, c)
            return self.values(accs), c

        t, (values, c) = walk.consume(visit, (self.values(accs), carry), t0=t0)
        self.restore(accs, values)
        return t if carry is None else (t, c)

    def values(self, accs):
        return tuple(a.value for a in accs) if self.interpret else ()

    def restore(self, accs, values):
        if self.interpret:
            for a, v in zip(accs, values):
                a.value = v


class _ValueAcc:
    """An interpreted accumulator."""

    def __init__(self, shape):
        self.value = jnp.zeros(shape, jnp.float32)


class _Transposed:
    """An interpreted transposed shared-memory operand."""

    def __init__(self, ref):
        self.ref = ref


@dataclasses.dataclass
class TileContext:
    """Where the current score tile sits: its position arrays and slices.

    ``q_axis`` is 0 for a ``[queries, keys]`` tile (forward, dQ) and 1 for a
    transposed ``[keys, queries]`` tile (dK/dV). ``q_layout`` says where the
    query rows sit: ``"contiguous"`` (row ``r`` at ``q_start + r``),
    ``"uniform"`` (every row at ``q_start``: rows are heads of one decode
    token) or ``"packed"`` (rows mix heads and tokens: array leaves cannot be
    indexed by ``q_idx``).
    """

    q_idx: Any  # int32 tile of absolute query positions
    kv_idx: Any  # int32 tile of absolute key positions
    q_start: Any  # scalar: absolute position of the tile's first query
    kv_start: Any  # scalar: absolute position of the tile's first key
    shape: tuple[int, int]
    lowering: Lowering
    q_axis: int = 0
    q_layout: str = "contiguous"
    tape: LoadTape | None = None

    def relative(self):
        """``kv_idx - q_idx`` as a float32 tile, from one float vector per axis.

        One int-to-float conversion per row and per column instead of one per
        score (exact for positions below 2**24). Tiles whose rows are
        contiguous query positions only.
        """
        if self.q_layout != "contiguous":
            raise NotImplementedError("relative positions need contiguous query rows")
        low, qa = self.lowering, self.q_axis
        q = (self.q_start + low.vector_iota(self.shape[qa], qa)).astype(jnp.float32)
        kv = (self.kv_start + low.vector_iota(self.shape[1 - qa], 1 - qa)).astype(jnp.float32)
        return low.broadcast(kv, self.shape, 1 - qa) - low.broadcast(q, self.shape, qa)


class KernelTransform:
    """A score mod's rewrite inside a kernel: ``mod.transform`` as a callable, plus its fused form."""

    def __init__(self, mod):
        self.mod = mod

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.mod.transform(score, b, h, q_idx, kv_idx)

    def scaled(self, raw, scale, b, h, q_idx, kv_idx, positions=None):
        """``(t, factor)`` of :meth:`attnax.score_mods.AttentionMod.scaled_transform`."""
        return self.mod.scaled_transform(raw, scale, b, h, q_idx, kv_idx, positions)


class LoadTape:
    """Leaf loads of one mod call, recorded and then replayed.

    Mosaic GPU's loads from refs have no differentiation rules, and JAX's
    forward mode does not pass primitives that read refs through untouched.
    The backward kernels therefore call a score mod twice per tile: once
    recording the values its leaves load, then under ``jax.jvp`` replaying
    them (plain values, constants to the JVP). A mod is deterministic Python,
    so both calls index its leaves in the same order.
    """

    def __init__(self):
        self.values: list = []
        self.sites: list = []  # (leaf id, kind) of each recorded load: kind in LEAF_KINDS
        self.replaying = False
        self._next = 0

    def replay(self):
        self.replaying, self._next = True, 0

    def take(self):
        if self._next >= len(self.values):
            raise RuntimeError("a score mod indexed its array leaves differently in two calls on the same tile.")
        self._next += 1
        return self.values[self._next - 1]


_LEAF_INDEX_ERROR = (
    "inside a Pallas kernel a mod may index its array leaves only by scalars (b, h) and by the "
    "q_idx / kv_idx arrays it was given, unchanged; compute with the loaded values instead."
)


class TileOperand:
    """A mod's array leaf inside a kernel: a global-memory ref with a view.

    ``prefix`` holds scalar indices into the ref's leading axes that ``jax.vmap``
    added (see :func:`vmappable_call`): every load reads at them first, and
    ``shape`` leaves them out, so the mod sees its leaf as it wrote it.
    """

    def __init__(self, ref, ctx_getter, twin=None, prefix=(), leaf_id=None):
        self._ref = ref
        self.leaf_id = leaf_id  # the leaf's position among the flattened mods' leaves
        self._twin = twin  # the leaf with its last two axes swapped (transposed tiles), or None
        self._ctx = ctx_getter
        self._prefix = tuple(prefix)
        self.shape = tuple(ref.shape)[len(self._prefix) :]
        self.ndim = len(self.shape)
        self.dtype = ref.dtype

    def __getitem__(self, idx):
        ctx: TileContext = self._ctx()
        if ctx.tape is not None and ctx.tape.replaying:
            return ctx.tape.take()
        value, kind = self._load(ctx, idx)
        if ctx.tape is not None:
            ctx.tape.values.append(value)
            ctx.tape.sites.append((self.leaf_id, kind))
        return value

    def _load(self, ctx: TileContext, idx):
        if not isinstance(idx, tuple):
            idx = (idx,)
        if len(idx) != self.ndim:
            raise NotImplementedError(
                f"inside a Pallas kernel a mod must index its array leaf of shape {self.shape} with "
                f"{self.ndim} indices (scalars, q_idx or kv_idx); got {len(idx)}."
            )
        ref_idx, q_dim, kv_dim, kept = [], None, None, 0
        n_q, n_kv = (ctx.shape[0], ctx.shape[1]) if ctx.q_axis == 0 else (ctx.shape[1], ctx.shape[0])
        for i in idx:
            if i is ctx.q_idx and ctx.q_layout == "uniform":
                ref_idx.append(ctx.q_start)
            elif i is ctx.q_idx and ctx.q_layout == "packed":
                raise NotImplementedError(
                    "this kernel packs several query heads and tokens into the rows of one tile, so a mod cannot "
                    "index an array leaf by q_idx here (paged attention with T > 1); use implementation='xla'."
                )
            elif i is ctx.q_idx:
                ref_idx.append(pl.ds(ctx.q_start, n_q))
                q_dim = kept
                kept += 1
            elif i is ctx.kv_idx:
                ref_idx.append(pl.ds(ctx.kv_start, n_kv))
                kv_dim = kept
                kept += 1
            elif jnp.ndim(i) == 0:
                ref_idx.append(i)
            else:
                raise NotImplementedError(_LEAF_INDEX_ERROR)
        pre, ref_idx = self._prefix, tuple(ref_idx)
        low = ctx.lowering
        if q_dim is None and kv_dim is None:
            return self._ref[(*pre, *ref_idx)], "scalar"
        if q_dim is not None and kv_dim is not None:
            if q_dim > kv_dim:
                raise NotImplementedError("index a 2-D leaf as [..., q_idx, ..., kv_idx] (query dimension first).")
            if ctx.q_axis == 0:
                return low.load(self._ref.at[(*pre, *ref_idx)], WGMMA), "tile"
            # A [keys, queries] tile: read from the leaf's transposed twin, whose
            # kv axis comes first, so the load stays contiguous along the tile's
            # rows (Mosaic GPU cannot vectorise a transposed global-memory load).
            if self._twin is None or not (idx[-2] is ctx.q_idx and idx[-1] is ctx.kv_idx):
                raise NotImplementedError(
                    "in the Pallas backward, a mod that reads a tile of an array leaf must index its last two "
                    "axes by q_idx and kv_idx, as leaf[..., q_idx, kv_idx]."
                )
            return low.load(self._twin.at[(*pre, *ref_idx[:-2], ref_idx[-1], ref_idx[-2])], WGMMA), "tile"
        # A vector along one tile axis, broadcast along the other.
        axis = ctx.q_axis if q_dim is not None else 1 - ctx.q_axis
        v = low.load(self._ref.at[(*pre, *ref_idx)], WGMMA_ROW if axis == 0 else WGMMA_COL)
        return low.broadcast(v, ctx.shape, axis), "q" if q_dim is not None else "kv"


def tile_keep(keep_fn, b, h, ctx: TileContext):
    """The dropout keep mask of a score tile: ``keep_fn(b, h, q_positions, kv_idx, expand)``.

    The query positions come as a vector along the tile's query axis (hashed
    once per row), ``expand`` repeats a vector over the tile.
    """
    low = ctx.lowering
    q_vec = ctx.q_start + low.vector_iota(ctx.shape[ctx.q_axis], ctx.q_axis)
    return keep_fn(b, h, q_vec, ctx.kv_idx, lambda v: low.broadcast(v, ctx.shape, ctx.q_axis))


def online_softmax(s, m_i, l_i, acc):
    """:func:`softmax_step` of natural-log scores ``s`` that also rescales the
    ``[rows, dv]`` accumulator ``acc``: ``(p, m_new, l_new, acc rescaled)``."""
    p, m_new, l_new, alpha = softmax_step(s, m_i, l_i)
    return p, m_new, l_new, acc * lax.broadcast_in_dim(alpha, acc.shape, [0])


def softmax_step(s, m_i, l_i, scale: float = 1.0):
    """One score tile of the online softmax, in base 2: ``(p, m_new, l_new, alpha)``.

    ``s * scale`` holds natural-log scores ``[rows, keys]`` (``scale > 0``, a
    Python float or a scalar: a kernel without score transforms passes the raw
    ``Q K^T`` tile and its softmax scale, one with a transform the factor of the
    mod's fused form; either costs no multiply of its own: it folds into the
    exponent's single multiply-add); ``m_i`` the running row maxima in base 2,
    ``l_i`` the running row sums. The caller rescales its accumulator by
    ``alpha`` (the row factors taking sums relative to the old maxima to the
    new ones) before adding ``p @ v``.
    """
    c = scale * _LOG2E
    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
    # A row with nothing visible yet keeps m = -inf: shift by 0 so exp2 gives 0, never NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_i - m_use)
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_use, s.shape, [0]))
    return p, m_new, l_i * alpha + p.sum(axis=1), alpha


#: Shared memory under which a kernel that streams K/V past query tiles takes
#: two of them per CTA (:class:`QueryTiles`), with a separate output buffer.
PAIRED_SMEM = 200 * 1024


class QueryTiles:
    """The query tiles of the CTAs along a grid axis: the heaviest first.

    Unpaired, CTA ``c`` takes tile ``nq - 1 - c``. Paired, it takes the
    heaviest and the lightest of those left, ``nq - 1 - c`` then ``c`` (a
    lone middle tile when ``nq`` is odd): under a causal mask every CTA has
    the same work, the producer streams the second tile's K/V while the first
    finishes, its rows load during the first's epilogue, and half as many
    CTAs pay the fixed costs of a launch.
    """

    def __init__(self, nq: int, paired: bool):
        self.nq, self.paired = nq, paired and nq > 1
        self.n_ctas = -(-nq // 2) if self.paired else nq

    def count(self, cta):
        """How many tiles CTA ``cta`` takes (traced)."""
        if not self.paired:
            return jnp.int32(1)
        return jnp.where(self.nq - 1 - cta == cta, 1, 2).astype(jnp.int32)

    def tile(self, cta, i):
        """The ``i``-th query tile of CTA ``cta``."""
        heavy = self.nq - 1 - cta
        return jnp.where(i == 0, heavy, cta) if self.paired else heavy


def persistent_workers(interpret: bool) -> int:
    """CTAs of a persistent launch: the default device's SM count (two interpreted, so that small
    test shapes give a CTA several pairs of query tiles)."""
    if interpret:
        return 2
    n = getattr(jax.devices()[0], "core_count", None)
    return int(n) if n else 132


class GridTiles:
    """The query tiles of a ``(heads, query tiles, batch)`` grid (:class:`QueryTiles` along the middle axis)."""

    grid_names = ("heads", "q_seq", "batch")

    def __init__(self, tiles: QueryTiles, B: int, H: int):
        self.tiles = tiles
        self.grid = (H, tiles.n_ctas, B)

    def count(self):
        return self.tiles.count(lax.axis_index("q_seq"))

    def item(self, n):
        """``(b, h, qi)`` of this CTA's ``n``-th query tile."""
        return lax.axis_index("batch"), lax.axis_index("heads"), self.tiles.tile(lax.axis_index("q_seq"), n)


class PersistentTiles:
    """Every ``(b, h, query tile)`` dealt out to a fixed number of CTAs (a persistent grid).

    The tiles are ordered by head, then batch row, then the order of
    :class:`QueryTiles` (heaviest, lightest, next heaviest, ...), so that
    consecutive tiles share K/V (and CTAs running at the same time share the
    L2-resident K/V of a few heads); CTA ``c`` takes the pairs of consecutive
    tiles ``c, c + n_ctas, c + 2 n_ctas, ...``. Under a causal mask every pair
    but those split across two rows holds the same work.
    """

    grid_names = ("cta",)

    def __init__(self, B: int, H: int, nq: int, workers: int):
        self.B, self.nq = B, nq
        self.n_tiles = B * H * nq
        self.n_pairs = -(-self.n_tiles // 2)
        self.n_ctas = max(1, min(workers, self.n_pairs))
        self.grid = (self.n_ctas,)

    def count(self):
        """How many tiles this CTA takes (traced; at least one)."""
        i32 = jnp.int32
        c, g = lax.axis_index("cta").astype(i32), i32(self.n_ctas)
        pairs = lax.div(i32(self.n_pairs) - c + g - i32(1), g)
        lone_last = (self.n_tiles % 2 == 1) & (c + (pairs - i32(1)) * g == i32(self.n_pairs - 1))
        return i32(2) * pairs - lone_last.astype(i32)

    def item(self, n):
        """``(b, h, qi)`` of this CTA's ``n``-th tile."""
        i32 = jnp.int32
        c, g, n = lax.axis_index("cta").astype(i32), i32(self.n_ctas), jnp.asarray(n, i32)
        w = i32(2) * (c + lax.div(n, i32(2)) * g) + lax.rem(n, i32(2))
        hb, r = lax.div(w, i32(self.nq)), lax.rem(w, i32(self.nq))
        h, b = lax.div(hb, i32(self.B)), lax.rem(hb, i32(self.B))
        half = lax.div(r, i32(2))
        qi = jnp.where(lax.rem(r, i32(2)) == 0, i32(self.nq - 1) - half, half)
        return b, h, qi


EMPTY, PARTIAL, FULL = 0, 1, 2


class TileWalk:
    """The tiles one CTA visits along its row (or column) of the score matrix.

    Sparse walks read int32 tile classes and ``[lo, hi)`` bounds prepared by
    :func:`attnax.kernels._pallas.kernel_tiles`; dense walks visit every tile
    and treat only a ragged last tile as partial. Producer and consumers walk
    the same tiles in the same order, counting visits to pick ring slots.
    """

    def __init__(self, n_tiles: int, ragged_last: bool, classes_ref=None, bounds_ref=None, index=()):
        self.sparse = classes_ref is not None
        if self.sparse:
            bb = tuple(i if n > 1 else 0 for i, n in zip(index[:2], classes_ref.shape[:2]))
            self._row = (*bb, *index[2:])
            self._classes = classes_ref
            self.lo = bounds_ref[(*self._row, 0)]
            self.hi = bounds_ref[(*self._row, 1)]
            self.count = bounds_ref[(*self._row, 2)]
            self.n_full = bounds_ref[(*self._row, 3)]
            self.first_full = bounds_ref[(*self._row, 4)]
            self.first_partial = bounds_ref[(*self._row, 5)]
        else:
            self.lo, self.hi = jnp.int32(0), jnp.int32(n_tiles)
            self.count = jnp.int32(n_tiles)
            self.n_full = jnp.int32(n_tiles - 1 if ragged_last else n_tiles)
            self.first_full = jnp.int32(0 if n_tiles > int(ragged_last) else n_tiles)
            self.first_partial = jnp.int32(n_tiles - 1 if ragged_last else n_tiles)
        self._n, self._ragged = n_tiles, ragged_last

    def tile_class(self, j):
        if self.sparse:
            return self._classes[(*self._row, j)]
        if self._ragged:
            return jnp.where(j == self._n - 1, PARTIAL, FULL)
        return jnp.int32(FULL)

    def consume(self, body, carry, t0=None):
        """``body(j, t, is_partial, carry) -> carry`` for each visited tile ``j``
        (``t`` counts visits from ``t0``). Returns ``(visits_end, carry)``."""

        def step(j, c):
            cls = self.tile_class(j)

            def visit(c):
                t, carry = c
                return t + 1, body(j, t, cls == PARTIAL, carry)

            return lax.cond(cls != EMPTY, visit, lambda c: c, c) if self.sparse else visit(c)

        return lax.fori_loop(self.lo, self.hi, step, (jnp.int32(0) if t0 is None else t0, carry))

    def _next(self, j, cls):
        """The first tile at or after ``j`` of class ``cls`` (the caller knows one exists)."""
        if not self.sparse:  # full tiles are a prefix, the partial one the last
            return j
        return lax.while_loop(lambda j: self.tile_class(j) != cls, lambda j: j + 1, j)

    def consume_full_first(self, first, body, carry, t0, full_positions: bool = True):
        """The visited tiles for a software pipeline: the full tiles first, then
        the partial ones (each class in ascending order; the online softmax does
        not depend on the order). Pairs with :meth:`produce_full_first`.

        ``first(j, t, is_partial, carry) -> carry`` takes the first visited tile
        (a pipeline's first stage differs; ``carry`` is returned as is when
        nothing is visited), ``body(j, t, is_partial, carry) -> carry`` the
        others. ``is_partial`` is a Python bool: each class gets its own code
        and no branch on the tile class sits among a pipeline's in-flight
        matmuls. Each tile of a sparse walk is found by a scalar search past
        the others; with ``full_positions`` False the full tiles' positions
        are not needed (``j`` is None) and not searched. Returns
        ``(visits_end, carry, visited_any)``.
        """
        n_partial = self.count - self.n_full

        def run(c):
            t, carry = c
            has_full = self.n_full > 0
            j0 = jnp.where(has_full, self.first_full, self.first_partial)
            if self.sparse:  # a branch per class keeps the mask's own branch out of first
                carry = lax.cond(has_full, lambda c: first(j0, t, False, c), lambda c: first(j0, t, True, c), carry)
            else:  # full tiles, then a ragged last one
                carry = first(j0, t, self._n == 1 and self._ragged, carry)

            def phase(cls, j, start, stop, t, carry):
                find = cls == PARTIAL or full_positions

                def step(_, c):
                    t, j, carry = c
                    if not find:  # the body does not read j: no search
                        return t + 1, j, body(None, t, False, carry)
                    j = self._next(j, cls)
                    return t + 1, j + 1, body(j, t, cls == PARTIAL, carry)

                t, _, carry = lax.fori_loop(start, stop, step, (t, j, carry))
                return t, carry

            t, carry = phase(FULL, j0 + 1, jnp.int32(1), self.n_full, t + 1, carry)
            j_partial = jnp.where(has_full, self.first_partial, j0 + 1)
            return phase(PARTIAL, j_partial, jnp.where(has_full, 0, 1), n_partial, t, carry)

        if not self.sparse and self._n > 0:
            return (*run((t0, carry)), jnp.bool_(True))
        nonempty = self.count > 0
        return (*lax.cond(nonempty, run, lambda c: c, (t0, carry)), nonempty)

    def _fetch_from(self, lo, wanted, fetch, t):
        """``fetch(j, t)`` for each tile ``j`` in ``[lo, hi)`` whose class is ``wanted``; counts them on from ``t``."""

        def step(j, t):
            hit = wanted(self.tile_class(j))
            pl.when(hit)(lambda: fetch(j, t))
            return t + hit.astype(jnp.int32)

        return lax.fori_loop(jnp.minimum(lo, self.hi), self.hi, step, t)

    def produce_full_first(self, fetch, t0=None):
        """``fetch(j, t)`` in the order of :meth:`consume_full_first`; returns the visit count end."""
        t = self._fetch_from(self.first_full, lambda c: c == FULL, fetch, jnp.int32(0) if t0 is None else t0)
        return self._fetch_from(self.first_partial, lambda c: c == PARTIAL, fetch, t)

    def produce(self, fetch, t0=None):
        """``fetch(j, t)`` for each visited tile; returns the visit count end."""
        return self._fetch_from(self.lo, lambda c: c != EMPTY, fetch, jnp.int32(0) if t0 is None else t0)


def wait_slot_free(free_barriers, step, stages: int):
    """Producer side of a ``stages``-deep ring: before refilling a slot, wait
    until every consumer released the tile it held ``stages`` steps ago."""

    @pl.when(step >= stages)
    def _():
        slot = lax.rem(step, jnp.int32(stages))
        for bar in free_barriers:
            plgpu.barrier_wait(bar.at[slot])


def drain_ring(free_barriers, n_steps, stages: int):
    """Observes the releases of the last ``stages`` steps of a producer loop.

    On hardware this is a short wait at the end of the producer warpgroup; GPU
    interpret mode requires every completed barrier phase to be observed by a
    thread that waits on that barrier at all.
    """

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _(step):
        slot = lax.rem(step, jnp.int32(stages))
        for bar in free_barriers:
            plgpu.barrier_wait(bar.at[slot])


class _ProbeOperand:
    """A leaf during :func:`flatten_mods`' probe: records the axes indexed by positions."""

    def __init__(self, x, ctx, used: set):
        self.shape, self.ndim, self.dtype = x.shape, x.ndim, x.dtype
        self._ctx, self._used = ctx, used

    def __getitem__(self, idx):
        q_axis, kv_axis, _ = split_leaf_index(idx, self._ctx)
        positional = {a for a in (q_axis, kv_axis) if a is not None}
        self._used.update(positional)
        return jnp.zeros(self._ctx[0].shape if positional else (), self.dtype)


def split_leaf_index(idx, positions):
    """A mod's index into a leaf, outside a kernel: ``(q axis, kv axis, {axis: scalar index})``.

    ``positions`` is ``(q_idx, kv_idx)``; an axis indexed by neither must be
    indexed by a scalar (else ``NotImplementedError``, as in the kernels).
    """
    idx = idx if isinstance(idx, tuple) else (idx,)
    q_idx, kv_idx = positions
    q_axis = kv_axis = None
    scalars = {}
    for a, i in enumerate(idx):
        if i is q_idx:
            q_axis = a
        elif i is kv_idx:
            kv_axis = a
        elif jnp.ndim(i) == 0:
            scalars[a] = i
        else:
            raise NotImplementedError(_LEAF_INDEX_ERROR)
    return q_axis, kv_axis, scalars


def unit_score_derivative(score_mod) -> bool:
    """Whether ``d transform(s) / d s`` is identically 1 (additive mods: ALiBi, biases).

    Traces the mod's forward-mode derivative once, abstractly, and checks that
    the output tangent is the input tangent itself. Backward kernels then use
    the mod's value only, without a JVP on every tile.
    """
    leaves, treedef = jax.tree_util.tree_flatten(score_mod)
    arrays = [jnp.asarray(x) for x in leaves]

    def tangent(s, t, b, h, q_idx, kv_idx, *scalars):
        rest = iter(scalars)
        new = [next(rest) if x.ndim == 0 else _ProbeOperand(x, (q_idx, kv_idx), set()) for x in arrays]
        mod = jax.tree_util.tree_unflatten(treedef, new)
        return jax.jvp(lambda x: mod.transform(x, b, h, q_idx, kv_idx).astype(jnp.float32), (s,), (t,))[1]

    tile_f, tile_i = jax.ShapeDtypeStruct((8, 8), jnp.float32), jax.ShapeDtypeStruct((8, 8), jnp.int32)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    scalars = [jax.ShapeDtypeStruct((), x.dtype) for x in arrays if x.ndim == 0]
    closed = jax.make_jaxpr(tangent)(tile_f, tile_f, index, index, tile_i, tile_i, *scalars)
    return closed.jaxpr.outvars[0] is closed.jaxpr.invars[1]


def exercise_mods(mask_of):
    """A probe for :func:`flatten_mods` of ``(score mod or None, mask parts)`` pytrees."""

    def run(mods, b, h, q_idx, kv_idx):
        smod, parts = mods[:2]  # later entries (dropout) index leaves by scalars only
        outs = []
        if smod is not None:
            outs.append(smod.transform(jnp.zeros(q_idx.shape, jnp.float32), b, h, q_idx, kv_idx))
        mask_fn = mask_of(parts)
        if mask_fn is not None:
            outs.append(mask_fn(b, h, q_idx, kv_idx))
        return outs

    return run


def flatten_mods(mods, pad: int, probe=None):
    """Splits mod pytrees into kernel operands and a builder for the kernel side.

    Every array leaf becomes a kernel operand. ``probe(mods, b, h, q_idx,
    kv_idx)`` calls the mods once, abstractly, to find the axes of each leaf
    that are indexed by positions: those are padded by at least ``pad`` (to a
    multiple of 8, which keeps row strides aligned for vectorised tile loads)
    so that a tile overhanging the sequence end reads padding, not
    out-of-bounds memory; batch and head axes stay as they are. 0-d leaves
    are passed as shape ``(1,)`` and read as scalars.

    Returns:
        ``(operands, build)``: ``build(refs, ctx_getter, batch=None,
        prefixes=None, scalar_hook=None)`` returns the mods with their leaves
        replaced by :class:`TileOperand` s (or scalars: ``scalar_hook(leaf
        id, value)`` may replace those, for the backward's leaf gradients). Kernels that score transposed
        tiles pass ``operands + transposed_twins(operands)`` and hand all their
        refs to ``build``. Under ``jax.vmap``, ``prefixes`` has one batch
        prefix per ref (see :func:`vmappable_call`) and ``batch`` is the
        kernel's (folded) batch index.
    """
    leaves, treedef = jax.tree_util.tree_flatten(mods)
    arrays = [jnp.asarray(x) for x in leaves]
    arrays = [x.astype(jnp.int32) if x.dtype == jnp.bool_ else x for x in arrays]
    used = [set() for _ in arrays]
    if probe is not None:

        def run(b, h, q_idx, kv_idx):
            ctx = (q_idx, kv_idx)
            new = [x if x.ndim == 0 else _ProbeOperand(x, ctx, u) for x, u in zip(arrays, used)]
            return probe(jax.tree_util.tree_unflatten(treedef, new), b, h, q_idx, kv_idx)

        i32 = jax.ShapeDtypeStruct
        jax.eval_shape(run, i32((), jnp.int32), i32((), jnp.int32), i32((8, 8), jnp.int32), i32((8, 8), jnp.int32))
    operands, kinds = [], []
    for x, u in zip(arrays, used):
        if x.ndim == 0:
            operands.append(x.reshape(1))
            kinds.append("scalar")
        else:
            widths = [(0, -(-(n + pad) // 8) * 8 - n if d in u else 0) for d, n in enumerate(x.shape)]
            operands.append(jnp.pad(x, widths))
            kinds.append("array")

    has_twin = [_has_twin(op) for op in operands]  # static: build must not hold the (traced) operands

    def build(refs, ctx_getter, batch=None, prefixes=None, scalar_hook=None):
        refs = list(refs)
        pres = [batch_prefix_index(batch, p) for p in prefixes or ((),) * len(refs)]
        main, rest = refs[: len(kinds)], iter(refs[len(kinds) :])
        twins = [next(rest, None) if t else None for t in has_twin]
        hook = scalar_hook or (lambda i, x: x)
        new = [
            hook(i, ref[(*pre, 0)]) if kind == "scalar" else TileOperand(ref, ctx_getter, twin, pre, leaf_id=i)
            for i, (ref, kind, twin, pre) in enumerate(zip(main, kinds, twins, pres))
        ]
        return jax.tree_util.tree_unflatten(treedef, new)

    return operands, build


def _has_twin(operand) -> bool:
    return operand.ndim >= 2 and operand.shape[-1] > 1 and operand.shape[-2] > 1


def transposed_twins(operands):
    """Copies of the operands that may hold ``[..., q, kv]`` tiles, with the last two axes swapped.

    Backward kernels that score ``[keys, queries]`` tiles read 2-D tiles of a
    leaf from its twin, row-contiguous (an ``O(size)`` copy per backward,
    made only for leaves with two non-trivial trailing axes).
    """
    return [jnp.swapaxes(op, -1, -2) for op in operands if _has_twin(op)]


# -- jax.vmap: the mapped axis folds into the kernels' batch axis ------------------


def batch_prefix_index(batch, prefix):
    """Scalar indices into a batched leaf's leading axes: ``(batch // divisor) % size`` per level."""
    return tuple(lax.rem(lax.div(batch, jnp.array(d, batch.dtype)), jnp.array(n, batch.dtype)) for d, n in prefix)


def mod_batch_index(batch, num_batch: int, mod_batch: int):
    """The batch index mods see: the kernel's (folded) index ``batch`` within the user's ``mod_batch`` rows."""
    return batch if num_batch == mod_batch else lax.rem(batch, jnp.array(mod_batch, batch.dtype))


def vmappable_call(call, arrays, offsets, lists, operands, build_mods, prefixes=None):
    """``call(arrays, offsets, lists, operands, build)`` behind a ``jax.custom_vmap`` boundary.

    Mosaic GPU kernel calls have no batching rule. Under ``jax.vmap`` of size
    ``N`` this one folds the mapped axis into the kernel's batch axis, one
    launch: each of ``arrays`` (``[B, ...]``: q, k, v, ...) becomes
    ``[N*B, ...]``; ``offsets`` (int32 ``[2B]``: query offsets, then key
    offsets) becomes ``[2*N*B]`` in the same layout; tile ``lists``
    (``[Bm, ...]``, ``Bm`` 1 or ``B``; None for none) become ``[N*B, ...]``
    unless one row serves every batch row; the outputs ``[N*B, ...]`` are
    unfolded to ``[N, B, ...]``. A batched mod operand keeps its mapped axis
    in front and gains the batch prefix ``(B, N)`` (prefixes hold
    ``(divisor, size)`` pairs, outermost first): the kernel reads it at
    ``(b // B) % N`` through ``build = partial(build_mods, prefixes=...)``,
    and the mods get the batch index within the user's ``B`` rows
    (:func:`mod_batch_index`). The rule calls this function again, so nested
    ``vmap`` s fold level by level.
    """
    prefixes = tuple(prefixes or ((),) * len(operands))

    @jax.custom_batching.custom_vmap
    def kernel(arrays, offsets, lists, operands):
        return call(arrays, offsets, lists, operands, functools.partial(build_mods, prefixes=prefixes))

    @kernel.def_vmap
    def fold(n, in_batched, arrays, offsets, lists, operands):
        arrays_b, offsets_b, lists_b, operands_b = in_batched
        B = offsets.shape[-1] // 2

        def stacked(x, batched):  # [N, ...]
            return x if batched else jnp.broadcast_to(x, (n, *x.shape))

        def folded(x):  # [N, B, ...] -> [N*B, ...]
            return x.reshape(n * x.shape[1], *x.shape[2:])

        def fold_list(x, batched):
            if not batched and x.shape[0] == 1:
                return x  # one row for every batch row
            x = stacked(x, batched)
            return folded(jnp.broadcast_to(x, (n, B, *x.shape[2:])))

        offsets = stacked(offsets, offsets_b).reshape(n, 2, B).swapaxes(0, 1).reshape(2 * n * B)
        outs = vmappable_call(
            call,
            tuple(folded(stacked(x, bt)) for x, bt in zip(arrays, arrays_b)),
            offsets,
            tuple(fold_list(x, bt) for x, bt in zip(lists, lists_b)),
            operands,
            build_mods,
            tuple(((B, n), *p) if bt else p for p, bt in zip(prefixes, operands_b)),
        )
        outs = jax.tree.map(lambda y: y.reshape(n, B, *y.shape[1:]), outs)
        return outs, jax.tree.map(lambda _: True, outs)

    return kernel(tuple(arrays), offsets, tuple(lists or ()), list(operands))
