"""Hopper (sm90) backward kernels: dQ and dK/dV, warp-specialised, deterministic.

Both kernels recompute score tiles from Q, K and the forward's log-sum-exp,
apply the score mod (and its VJP) on register tiles, skip empty tiles from
the block lists, and write each gradient tile once (no atomics):

* dQ: a CTA owns ``2 * block_q`` query rows of one head (two compute
  warpgroups); K/V tiles stream through a shared-memory ring, like the forward.
* dK/dV: a CTA owns ``2 * block_kv`` key rows of one kv head and loops over
  the query heads of its GQA group and their query tiles; Q, dO, LSE and
  delta tiles stream through the ring. Transposed tiles (keys x queries) keep
  the per-key accumulators in registers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attnax.kernels import _pallas_mgpu_leaf_grads as leaf_grads
from attnax.kernels._pallas_mgpu_common import (
    PAIRED_SMEM,
    WGMMA_COL,
    WGMMA_ROW,
    LoadTape,
    Lowering,
    QueryTiles,
    TileContext,
    TileWalk,
    bhsd_dims,
    drain_ring,
    layout_shape,
    mod_batch_index,
    slab,
    tile_keep,
    wait_slot_free,
)

_LOG2E = math.log2(math.e)
# Registers per thread of the two compute warpgroups and the memory warpgroup
# (2 x 128 x 240 + 128 x 24 <= 64K). Measured on H100 against (232, 40): fewer
# spills in the compute warpgroups, backward 3-7% faster (causal, ALiBi, softcap).
_REGISTERS = (240, 24)
# Shared memory a kernel may plan for: the H100's 227 KiB, less what Mosaic GPU
# adds (barriers, reduction scratch: about 5 KiB measured).
_SMEM_BUDGET = 227 * 1024 - 8 * 1024


@dataclasses.dataclass(frozen=True)
class BwdStatic:
    """Static description of one backward launch."""

    block_q: int  # dQ: rows per compute warpgroup; dK/dV: query rows per streamed tile
    block_kv: int  # dQ: keys per streamed tile; dK/dV: key rows per compute warpgroup
    num_stages: int
    scale: float
    T: int
    S: int
    group: int
    has_transform: bool
    unit_derivative: bool  # the score mod's transform has d/ds == 1 (no JVP per tile)
    has_mask: bool
    sparse: bool
    interpret: bool
    dropout: float = 0.0  # the dropout rate (0: off)
    bshd: bool = False  # q, k, v, do and the gradients are [B, S, H, D] (lse, delta stay [B, H, S])
    mod_batch: int | None = None  # the user's batch size (vmap folds its axes into the batch); None: B
    leaf_sites: leaf_grads.LeafSites | None = None  # score-mod leaves to differentiate (None: none)
    part: str = "both"  # dK/dV kernel: "both", or "dk" / "dv" alone (head dims above 128: registers)


def _folds_scale(st: BwdStatic) -> bool:
    """Whether the softmax scale folds into the exponent (no score transform sees the scaled scores)."""
    return not st.has_transform and st.leaf_sites is None


def _scaled(st: BwdStatic, s):
    """The raw ``Q K^T`` tile as the mods and the exponent take it: times the scale unless it folds."""
    return s if _folds_scale(st) else s * st.scale


def _exp2_coef(st: BwdStatic) -> float:
    """The factor taking a tile from :func:`_scaled` to base-2 log-probabilities (before the row's LSE)."""
    return _LOG2E * st.scale if _folds_scale(st) else _LOG2E


def _tail_mask(mask_fn, kv_idx, S):
    """The mask of partial tiles: the mods' mask, and the key bound on a ragged end."""
    if S is None:
        return mask_fn

    def mask(b, h, q_idx, kv_idx_):
        tail = kv_idx_ < S
        return tail if mask_fn is None else jnp.logical_and(mask_fn(b, h, q_idx, kv_idx_), tail)

    return mask


def _tile_scores(st, raw, transform, mask_fn, need_mask, is_partial, b, h, q_idx, kv_idx, ctx_box, ctx, leaves=None):
    """Score-mod transform (with its VJP) and, on partial tiles, the mask: ``(s, c, vjp, derivatives)``.

    ``raw`` is the ``Q K^T`` tile; the probabilities are ``exp2(s * c - lse2)``
    (``c``: the base-2 exponent's factor, into which the softmax scale and a
    mod's fused-form factor fold). ``leaves``: ``(build_transform, LeafSites,
    wanted sites)`` when this kernel reduces leaf cotangents; ``derivatives``
    then maps each wanted site to its ``dt/dx`` tile (see
    :mod:`._pallas_mgpu_leaf_grads`).
    """
    ctx_box[0] = ctx
    vjp, derivs, c = None, {}, _exp2_coef(st)
    s, unit = _scaled(st, raw), st.unit_derivative
    if leaves is not None:
        build_transform, sites, wanted = leaves
        s, slope, derivs = leaf_grads.tile_scores(build_transform, s, (b, h, q_idx, kv_idx), ctx, sites, wanted, unit)
        if slope is not None:
            vjp = lambda ds: (ds * slope,)  # noqa: E731
    elif transform is not None and unit:
        # d transform / d s == 1: no VJP, so the mod's fused form serves
        # (AttentionMod.scaled_transform: its factor folds into the exponent).
        s, factor = transform.scaled(raw, st.scale, b, h, q_idx, kv_idx, positions=ctx)
        s, c = s.astype(jnp.float32), factor * _LOG2E
    elif transform is not None:
        # Score mods are elementwise in the score (the protocol), so their VJP is
        # a product with d transform / d score, which a forward-mode JVP gives.
        # The mod's leaf loads (no derivative rules in Mosaic GPU) are recorded
        # by a first call and replayed as constants inside the JVP; the first
        # call's arithmetic is dead code.
        ctx.tape = LoadTape()
        transform(s, b, h, q_idx, kv_idx)
        ctx.tape.replay()
        s, slope = jax.jvp(lambda x: transform(x, b, h, q_idx, kv_idx).astype(jnp.float32), (s,), (jnp.ones_like(s),))
        ctx.tape = None
        vjp = lambda ds: (ds * slope,)  # noqa: E731
    if need_mask and mask_fn is not None:
        s = lax.cond(is_partial, lambda s: jnp.where(mask_fn(b, h, q_idx, kv_idx), s, -jnp.inf), lambda s: s, s)
    return s, c, vjp, derivs


def _dropped(st: BwdStatic, keep, x):
    """``x * keep / (1 - rate)`` under dropout (``keep`` a boolean tile), else ``x``."""
    if not st.dropout:
        return x
    return jnp.where(keep, x * (1.0 / (1.0 - st.dropout)), 0.0)


def _accumulate_ds(low, acc, p, dp, delta, axis: int, vjp, b_smem):
    """``acc += dS @ b`` with ``dS = P * (dP - delta)`` (times the mod's derivative); waits for it.

    ``delta`` is a vector along ``axis`` of the tile: its query axis. Returns
    ``dS`` before the mod's derivative: the transformed scores' cotangent.
    """
    dt = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [axis]))
    ds = dt if vjp is None else vjp(dt)[0]
    low.mma(acc, ds.astype(b_smem.dtype), b_smem)
    low.wait(0)
    return dt


def _leaf_rows(row_sites, derivs, dt, rows):
    """Adds each row site's cotangent, summed along the tile's axis 1, to its vector in ``rows``."""
    return tuple(r + leaf_grads.cotangent(dt, derivs[m]).sum(axis=1) for r, m in zip(rows, row_sites))


def _leaf_plan(st: BwdStatic, kinds, build_mods, op_refs, ctx_getter, b):
    """``(row sites, tile sites, leaves argument of _tile_scores or None)`` of one kernel."""
    sites = st.leaf_sites
    if sites is None:
        return (), (), None
    rows = sites.where(kinds[0])
    tiles = sites.where(kinds[1])
    if not rows and not tiles:
        return (), (), None

    def build_transform(hook):
        return build_mods(op_refs, ctx_getter, b, scalar_hook=hook)[0]

    return rows, tiles, (build_transform, sites, rows + tiles)


def dq_kernel_call(q, k, v, do, lse2, delta, offsets, lists, mod_operands, build_mods: Callable, st: BwdStatic):
    """dQ. ``lse2`` is the LSE in base 2 (``+inf`` on rows with nothing visible).

    Shapes as in the forward (``Tp`` a multiple of ``2 * block_q``, ``Sp`` of
    ``block_kv``); ``lists`` are the forward's tile lists. Returns ``dq``
    ``[B, H, Tp, D]`` in the input dtype, already multiplied by ``scale``,
    then the cotangents of the leaf sites of kinds ``scalar`` and ``q``
    (``[B, H, Tp]`` float32 each, summed over keys) and ``tile`` (``[B, H,
    Tp, Sp]``; tiles that are not visited hold garbage), in site order.
    """
    B, H, Tp, D = bhsd_dims(q, st.bshd)
    _, Hk, Sp, Dv = bhsd_dims(v, st.bshd)
    bq, bkv, stages = st.block_q, st.block_kv, st.num_stages
    # Tiles past the last key hold only padding: a dense walk stops at the last one with a key.
    nq, nk = Tp // (2 * bq), -(-st.S // bkv)
    dtype = q.dtype
    n_ops = len(mod_operands)
    lists = () if lists is None else lists
    low = Lowering(st.interpret)
    sites = st.leaf_sites
    n_rows = len(sites.where(leaf_grads.DQ_ROWS)) if sites else 0
    n_tiles = len(sites.where(leaf_grads.DQ_TILES)) if sites else 0
    unpaired = (2 * bq * (D + Dv) + stages * bkv * (D + Dv)) * jnp.dtype(dtype).itemsize + 4 * bq * 4
    # Tile sites store their float32 cotangents through a [block_q, tile_cols]
    # buffer per warpgroup: narrower than the key tile when wide heads leave
    # too little shared memory (one store per column block).
    tile_cols = bkv
    while n_tiles and tile_cols > 16 and unpaired + 4 * 2 * bq * (n_rows + tile_cols) > _SMEM_BUDGET:
        tile_cols //= 2
    leaf_smem = 4 * 2 * bq * (n_rows + (tile_cols if n_tiles else 0))
    # Two query tiles per CTA when a separate dQ buffer fits (QueryTiles).
    smem = unpaired + 2 * bq * D * jnp.dtype(dtype).itemsize + leaf_smem
    tiles = QueryTiles(nq, smem <= PAIRED_SMEM)

    def kernel(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qoff_ref = refs[:7]
        n_in = 7 + len(lists) + n_ops
        list_refs = refs[7 : 7 + len(lists)]
        op_refs = refs[7 + len(lists) : n_in]
        dq_ref = refs[n_in]
        row_outs = refs[n_in + 1 : n_in + 1 + n_rows]
        tile_outs = refs[n_in + 1 + n_rows : n_in + 1 + n_rows + n_tiles]
        smems, row_bars, (k_bar, v_bar), (k_free, v_free) = refs[n_in + 1 + n_rows + n_tiles :]
        q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = smems[:6]
        extra = iter(smems[7 if tiles.paired else 6 :])
        rows_smem = next(extra) if n_rows else None
        leaf_tile_smem = next(extra) if n_tiles else None
        b = lax.axis_index("batch")
        b_mod = mod_batch_index(b, B, st.mod_batch or B)  # the batch row the mods see
        h = lax.axis_index("heads")
        cta = lax.axis_index("q_seq")
        n_items = tiles.count(cta)
        wg = lax.axis_index("wg")
        hk = lax.div(h, jnp.array(st.group, h.dtype))
        ragged = st.S % bkv != 0
        need_mask = st.has_mask or ragged

        def tile_walk(qi):
            return TileWalk(nk, ragged, *list_refs, index=(b, h, qi)) if st.sparse else TileWalk(nk, ragged)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(_REGISTERS[0], action="increase")
            kv_off = qoff_ref[B + b]
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            out_smem = smems[6].at[wg] if tiles.paired else q_smem
            ctx_box = [None]
            transform, mask_fn, keep_fn = build_mods(op_refs, lambda: ctx_box[0], b)
            row_sites, tile_sites, leaves = _leaf_plan(
                st, (leaf_grads.DQ_ROWS, leaf_grads.DQ_TILES), build_mods, op_refs, lambda: ctx_box[0], b
            )

            def load_rows(qi):
                rows = pl.ds(qi * (2 * bq) + wg * bq, bq)
                srcs = (slab(q_ref, b, h, rows, st.bshd), slab(do_ref, b, h, rows, st.bshd), lse_ref.at[b, h, rows],
                        delta_ref.at[b, h, rows])  # fmt: skip
                dsts = (q_smem, do_smem, lse_smem2.at[wg], delta_smem2.at[wg])
                for src, dst, bar in zip(srcs, dsts, row_bars):
                    plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])

            load_rows(tiles.tile(cta, 0))

            def item(i, t):
                qi = tiles.tile(cta, i)
                row0 = qi * (2 * bq) + wg * bq
                q_start = qoff_ref[b] + row0
                for bar in row_bars:
                    plgpu.barrier_wait(bar.at[wg])
                lse_row = low.load(lse_smem2.at[wg], WGMMA_ROW)
                delta_row = low.load(delta_smem2.at[wg], WGMMA_ROW)
                t, dq, rows = low.accumulators(
                    lambda acc: dq_tile(qi, row0, q_start, lse_row, delta_row, acc, t), (bq, D)
                )
                if tiles.paired:  # Q and dO are free: the next tile's rows load during this epilogue
                    pl.when(i + 1 < n_items)(lambda: load_rows(tiles.tile(cta, i + 1)))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
                out_smem[...] = (dq * st.scale).astype(dtype)
                for n, r in enumerate(rows):
                    rows_smem.at[n, wg][...] = r
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, slab(dq_ref, b, h, pl.ds(row0, bq), st.bshd))
                for n, o in enumerate(row_outs):
                    plgpu.copy_smem_to_gmem(rows_smem.at[n, wg], o.at[b, h, pl.ds(row0, bq)])
                return t

            def dq_tile(qi, row0, q_start, lse_row, delta_row, dq_acc, t0):
                """dQ of query tile ``qi``; returns the ring's visit count after it, dQ and the leaf rows."""

                def step_body(j, t, is_partial, dq_acc, rows):
                    slot = lax.rem(t, jnp.int32(stages))
                    kv_start = kv_off + j * bkv
                    k_slot, v_slot = k_smem.at[slot], v_smem.at[slot]

                    def tile(s_acc, dp_acc):
                        # S = Q K^T and dP = dO V^T go out together; the softmax of
                        # S overlaps dP.
                        plgpu.barrier_wait(k_bar.at[slot])
                        low.mma(s_acc, q_smem, low.T(k_slot))
                        plgpu.barrier_wait(v_bar.at[slot])
                        low.mma(dp_acc, do_smem, low.T(v_slot))
                        raw = low.read(s_acc, wait_n=1)
                        q_idx = q_start + low.iota((bq, bkv), 0)
                        kv_idx = kv_start + low.iota((bq, bkv), 1)
                        ctx = TileContext(q_idx, kv_idx, q_start, kv_start, (bq, bkv), low)
                        mask = _tail_mask(mask_fn, kv_idx, kv_off + st.S if ragged else None)
                        s, c, vjp, derivs = _tile_scores(
                            st, raw, transform, mask, need_mask, is_partial,
                            b_mod, h, q_idx, kv_idx, ctx_box, ctx, leaves,
                        )  # fmt: skip
                        p = jnp.exp2(s * c - lax.broadcast_in_dim(lse_row, s.shape, [0]))
                        keep = tile_keep(keep_fn, b_mod, h, ctx) if st.dropout else None
                        dp = _dropped(st, keep, low.read(dp_acc, wait_n=0))
                        plgpu.barrier_arrive(v_free.at[slot])
                        dt = _accumulate_ds(low, dq_acc, p, dp, delta_row, 0, vjp, k_slot)
                        for n, m in enumerate(tile_sites):  # one store per site and tile, each written once
                            ct = leaf_grads.cotangent(dt, derivs[m])
                            for c in range(0, bkv, tile_cols):
                                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                                leaf_tile_smem.at[wg][...] = ct[:, c : c + tile_cols]
                                plgpu.commit_smem()
                                dst = tile_outs[n].at[b, h, pl.ds(row0, bq), pl.ds(j * bkv + c, tile_cols)]
                                plgpu.copy_smem_to_gmem(leaf_tile_smem.at[wg], dst)
                        return _leaf_rows(row_sites, derivs, dt, rows)

                    rows = low.accumulators(tile, (bq, bkv), (bq, bkv))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return rows

                rows0 = tuple(low.cast(jnp.zeros((bq,), jnp.float32), WGMMA_ROW) for _ in row_sites)
                t, rows = low.walk(
                    (dq_acc,), tile_walk(qi), lambda j, t, is_partial, rows: step_body(j, t, is_partial, dq_acc, rows),
                    t0=t0, carry=rows0,
                )  # fmt: skip
                return t, low.read(dq_acc), rows

            lax.fori_loop(0, n_items, item, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(_REGISTERS[1], action="decrease")

            def fetch(j, t):
                rows = pl.ds(j * bkv, bkv)
                slot = lax.rem(t, jnp.int32(stages))
                wait_slot_free((k_free, v_free), t, stages)
                plgpu.copy_gmem_to_smem(slab(k_ref, b, hk, rows, st.bshd), k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(slab(v_ref, b, hk, rows, st.bshd), v_smem.at[slot], v_bar.at[slot])

            t_end = lax.fori_loop(
                0, n_items, lambda i, t: tile_walk(tiles.tile(cta, i)).produce(fetch, t0=t), jnp.int32(0)
            )
            drain_ring((k_free, v_free), t_end, stages)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    tiled = dict(transforms=(tiling, swizzle))
    smems = (
        plgpu.SMEM((2, bq, D), dtype, **tiled),
        plgpu.SMEM((2, bq, Dv), dtype, **tiled),
        plgpu.SMEM((2, bq), jnp.float32),
        plgpu.SMEM((2, bq), jnp.float32),
        plgpu.SMEM((stages, bkv, D), dtype, **tiled),
        plgpu.SMEM((stages, bkv, Dv), dtype, **tiled),
    )
    if tiles.paired:
        smems += (plgpu.SMEM((2, bq, D), dtype, **tiled),)
    if n_rows:
        smems += (plgpu.SMEM((n_rows, 2, bq), jnp.float32),)
    if n_tiles:
        smems += (plgpu.SMEM((2, bq, tile_cols), jnp.float32),)
    scratch = [
        smems,
        (plgpu.Barrier(num_barriers=2),) * 4,
        (plgpu.Barrier(num_barriers=stages),) * 2,
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
    ]
    kwargs = {} if not st.interpret else {"interpret": _interpret()}
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(layout_shape(B, H, Tp, D, st.bshd), dtype),
            *[jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)] * n_rows,
            *[jax.ShapeDtypeStruct((B, H, Tp, Sp), jnp.float32)] * n_tiles,
        ),
        scratch_types=scratch,
        grid=(H, tiles.n_ctas, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(q, k, v, do, lse2, delta, offsets, *lists, *mod_operands)


def dkv_kernel_call(q, k, v, do, lse2, delta, offsets, lists, mod_operands, build_mods: Callable, st: BwdStatic):
    """dK and dV, summed over each kv head's query heads.

    ``lists``: ``(counts [Bm, Hm, nkt, 2], order [Bm, Hm, nkt, nqt])`` per kv
    tile of ``2 * block_kv`` rows, over query tiles of ``block_q`` rows (the
    transposed view). Returns ``dk`` (times ``scale``) and ``dv``, ``[B, Hk, Sp, ·]``,
    then the cotangents of the leaf sites of kind ``kv`` (``[B, H, Sp]``
    float32 each, summed over queries), in site order. With ``st.part`` "dk"
    or "dv" it computes one of the two (one ``[block_kv, D]`` accumulator per
    warpgroup: what fits the registers for head dims above 128); leaf sites
    go with dK.
    """
    B, H, Tp, D = bhsd_dims(q, st.bshd)
    _, Hk, Sp, Dv = bhsd_dims(v, st.bshd)
    bq, bkv, stages = st.block_q, st.block_kv, st.num_stages
    nkt, nqt = Sp // (2 * bkv), Tp // bq
    G = st.group
    dtype = q.dtype
    n_ops = len(mod_operands)
    lists = () if lists is None else lists
    low = Lowering(st.interpret)
    want_dk, want_dv = st.part in ("both", "dk"), st.part in ("both", "dv")
    n_rows = len(st.leaf_sites.where(leaf_grads.DKV_ROWS)) if st.leaf_sites and want_dk else 0
    n_grads = int(want_dk) + int(want_dv)

    def kernel(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qoff_ref = refs[:7]
        n_in = 7 + len(lists) + n_ops
        list_refs = refs[7 : 7 + len(lists)]
        op_refs = refs[7 + len(lists) : n_in]
        grad_refs = iter(refs[n_in : n_in + n_grads])
        dk_ref = next(grad_refs) if want_dk else None
        dv_ref = next(grad_refs) if want_dv else None
        row_outs = refs[n_in + n_grads : n_in + n_grads + n_rows]
        smems, kv_bars, ready, free = refs[n_in + n_grads + n_rows :]
        k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = smems[:6]
        rows_smem = smems[6] if n_rows else None
        b = lax.axis_index("batch")
        b_mod = mod_batch_index(b, B, st.mod_batch or B)  # the batch row the mods see
        hk = lax.axis_index("heads")
        # Heaviest key tiles first: under causal masks the first keys are seen
        # by the most query tiles, and launching them early shortens the tail.
        kt = lax.axis_index("kv_seq")
        wg = lax.axis_index("wg")

        def head_walk(g):
            h = hk * G + g
            if not st.sparse:
                return h, TileWalk(nqt, False)
            return h, TileWalk(nqt, False, *list_refs, index=(b, h, kt))

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(_REGISTERS[0], action="increase")
            row0 = kt * (2 * bkv) + wg * bkv
            rows = rows_range = pl.ds(row0, bkv)
            kv_row0 = qoff_ref[B + b] + row0  # absolute position of the first key row
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            plgpu.copy_gmem_to_smem(slab(k_ref, b, hk, rows, st.bshd), k_smem, kv_bars[0].at[wg])
            if want_dk:  # dP^T = V dO^T; dV alone needs no V
                plgpu.copy_gmem_to_smem(slab(v_ref, b, hk, rows, st.bshd), v_smem, kv_bars[1].at[wg])
            plgpu.barrier_wait(kv_bars[0].at[wg])
            if want_dk:
                plgpu.barrier_wait(kv_bars[1].at[wg])
            ctx_box = [None]
            transform, mask_fn, keep_fn = build_mods(op_refs, lambda: ctx_box[0], b)
            row_sites, _, leaves = (), (), None
            if want_dk:
                row_sites, _, leaves = _leaf_plan(
                    st, (leaf_grads.DKV_ROWS, ()), build_mods, op_refs, lambda: ctx_box[0], b
                )

            def step_body(h, j, t, is_partial, dk_acc, dv_acc, rows):
                slot = lax.rem(t, jnp.int32(stages))
                q_slot, do_slot = q_smem.at[slot], do_smem.at[slot]
                q_start = qoff_ref[b] + j * bq
                for bar in ready:
                    plgpu.barrier_wait(bar.at[slot])

                def tile(s_acc, dp_acc=None):
                    # S^T = K Q^T and dP^T = V dO^T go out together; the
                    # softmax of S overlaps dP, dP's use overlaps dV += P^T dO.
                    low.mma(s_acc, k_smem, low.T(q_slot))
                    if want_dk:
                        low.mma(dp_acc, v_smem, low.T(do_slot))
                    raw = low.read(s_acc, wait_n=int(want_dk))  # keys x queries
                    kv_idx = kv_row0 + low.iota((bkv, bq), 0)
                    q_idx = q_start + low.iota((bkv, bq), 1)
                    ctx = TileContext(q_idx, kv_idx, q_start, kv_row0, (bkv, bq), low, q_axis=1)
                    s, c, vjp, derivs = _tile_scores(
                        st, raw, transform, mask_fn, st.has_mask, is_partial,
                        b_mod, h, q_idx, kv_idx, ctx_box, ctx, leaves,
                    )  # fmt: skip
                    lse_col = low.load(lse_smem.at[slot], WGMMA_COL)
                    delta_col = low.load(delta_smem.at[slot], WGMMA_COL)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(lse_col, s.shape, [1]))
                    keep = tile_keep(keep_fn, b_mod, h, ctx) if st.dropout else None
                    if want_dv:
                        low.mma(dv_acc, _dropped(st, keep, p).astype(dtype), do_slot)
                    if not want_dk:
                        low.wait(0)
                        return rows
                    dp = _dropped(st, keep, low.read(dp_acc, wait_n=int(want_dv)))
                    dt = _accumulate_ds(low, dk_acc, p, dp, delta_col, 1, vjp, q_slot)
                    return _leaf_rows(row_sites, derivs, dt, rows)

                rows = low.accumulators(tile, *[(bkv, bq)] * (1 + int(want_dk)))
                plgpu.barrier_arrive(free.at[slot])
                return rows

            def grads(*accs):
                it = iter(accs)
                dk_acc, dv_acc = next(it) if want_dk else None, next(it) if want_dv else None

                def per_head(g, carry):
                    t, values = carry
                    low.restore(accs, values)
                    h, walk = head_walk(g)
                    rows0 = tuple(low.cast(jnp.zeros((bkv,), jnp.float32), WGMMA_ROW) for _ in row_sites)
                    t, rows = low.walk(
                        accs, walk, lambda j, t, is_partial, rows: step_body(h, j, t, is_partial, dk_acc, dv_acc, rows),
                        t0=t, carry=rows0,
                    )  # fmt: skip
                    for n, r in enumerate(rows):  # this head's per-key leaf cotangents, stored at the end
                        rows_smem.at[n, g, wg][...] = r
                    return t, low.values(accs)

                _, values = lax.fori_loop(0, G, per_head, (jnp.int32(0), low.values(accs)))
                low.restore(accs, values)
                return tuple(low.read(a) for a in accs)

            shapes = [(bkv, D)] * want_dk + [(bkv, Dv)] * want_dv
            out = list(low.accumulators(grads, *shapes))
            if want_dk:
                k_smem[...] = (out.pop(0) * st.scale).astype(dtype)
            if want_dv:
                v_smem[...] = out.pop(0).astype(dtype)
            plgpu.commit_smem()
            if want_dk:
                plgpu.copy_smem_to_gmem(k_smem, slab(dk_ref, b, hk, rows, st.bshd))
            if want_dv:
                plgpu.copy_smem_to_gmem(v_smem, slab(dv_ref, b, hk, rows, st.bshd))
            for n, o in enumerate(row_outs):
                for g in range(G):
                    plgpu.copy_smem_to_gmem(rows_smem.at[n, g, wg], o.at[b, hk * G + g, rows_range])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(_REGISTERS[1], action="decrease")

            def per_head(g, t):
                h, walk = head_walk(g)

                def fetch(j, t):
                    rows = pl.ds(j * bq, bq)
                    slot = lax.rem(t, jnp.int32(stages))
                    wait_slot_free((free,), t, stages)
                    srcs = (slab(q_ref, b, h, rows, st.bshd), slab(do_ref, b, h, rows, st.bshd),
                            lse_ref.at[b, h, rows], delta_ref.at[b, h, rows])  # fmt: skip
                    for src, dst, bar in zip(srcs, (q_smem, do_smem, lse_smem, delta_smem), ready):
                        plgpu.copy_gmem_to_smem(src, dst.at[slot], bar.at[slot])

                return walk.produce(fetch, t0=t)

            t_end = lax.fori_loop(0, G, per_head, jnp.int32(0))
            drain_ring((free,), t_end, stages)

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    tiled = dict(transforms=(tiling, swizzle))
    scratch = [
        (
            plgpu.SMEM((2, bkv, D), dtype, **tiled),
            plgpu.SMEM((2, bkv, Dv), dtype, **tiled),
            plgpu.SMEM((stages, bq, D), dtype, **tiled),
            plgpu.SMEM((stages, bq, Dv), dtype, **tiled),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
            *[plgpu.SMEM((n_rows, G, 2, bkv), jnp.float32)] * bool(n_rows),
        ),
        (plgpu.Barrier(num_barriers=2),) * 2,
        (plgpu.Barrier(num_barriers=stages),) * 4,
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
    ]
    kwargs = {} if not st.interpret else {"interpret": _interpret()}
    return plgpu.kernel(
        kernel,
        out_type=(
            *[jax.ShapeDtypeStruct(layout_shape(B, Hk, Sp, D, st.bshd), dtype)] * want_dk,
            *[jax.ShapeDtypeStruct(layout_shape(B, Hk, Sp, Dv, st.bshd), dtype)] * want_dv,
            *[jax.ShapeDtypeStruct((B, H, Sp), jnp.float32)] * n_rows,
        ),
        scratch_types=scratch,
        grid=(Hk, nkt, B),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(q, k, v, do, lse2, delta, offsets, *lists, *mod_operands)


def _interpret() -> Any:
    from attnax.kernels._pallas_mgpu_common import interpret_params

    return interpret_params()
