"""Hopper (sm90) forward kernel: warp-specialised flash attention in Mosaic GPU.

One CTA computes ``2 * block_q`` query rows of one (batch, head): two compute
warpgroups of ``block_q`` rows each, and one memory warpgroup that streams K/V
tiles through a ``num_stages`` ring of shared memory with TMA. The compute
warpgroups alternate on the tensor cores (a schedule barrier): while one runs
its ``Q K^T`` wgmma, the other does its softmax.

The kv tiles a CTA visits come from per-tile classes (empty / partial / full)
computed from the masks: the CTA walks the non-empty tiles of its row, never
loads an empty tile, and evaluates the mask only on partial tiles (the
pipelined walk takes the full tiles first and the partial ones last, each with
its own code; the serial walk branches on the tile's class). Score mods run on
every visited tile.
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

from attnax.kernels._pallas_mgpu_common import (
    PAIRED_SMEM,
    WGMMA,
    WGMMA_ROW,
    GridTiles,
    Lowering,
    PersistentTiles,
    QueryTiles,
    TileContext,
    TileWalk,
    bhsd_dims,
    drain_ring,
    layout_shape,
    mod_batch_index,
    slab,
    softmax_step,
    tile_keep,
    wait_slot_free,
)

_LN2 = math.log(2.0)
# Registers per thread of the two compute warpgroups and the memory warpgroup
# (2 x 128 x 240 + 128 x 24 <= 64K; measured on H100: 2-5% faster than (232, 40)).
_REGISTERS = (240, 24)


@dataclasses.dataclass(frozen=True)
class FwdStatic:
    """Static description of one forward launch."""

    block_q: int  # rows per compute warpgroup (the CTA covers 2 * block_q)
    block_kv: int
    num_stages: int
    scale: float
    T: int  # true query length
    S: int  # true key length
    group: int  # query heads per kv head
    has_transform: bool
    has_mask: bool
    sparse: bool  # block lists given (else every kv tile is visited as full)
    mask_tail: bool  # S is not a multiple of block_kv
    interpret: bool
    dropout: float = 0.0  # the dropout rate (0: off)
    bshd: bool = False  # q, k, v and out are [B, S, H, D] (else [B, H, S, D])
    mod_batch: int | None = None  # the user's batch size (vmap folds its axes into the batch); None: B
    short_walks: bool = False  # a CTA visits few key tiles (the persistent grid may pay off)
    workers: int = 132  # CTAs of a persistent launch (the GPU's SM count)


def forward_kernel_call(
    q, k, v, offsets, lists, mod_operands, build_mods: Callable, st: FwdStatic, interpret: Any = None
):
    """Runs the forward kernel.

    Args:
        q: ``[B, H, Tp, D]`` with ``Tp`` a multiple of ``2 * block_q``
            (``[B, Tp, H, D]`` with ``st.bshd``, and so on for k, v, out).
        k, v: ``[B, Hk, Sp, D]``, ``[B, Hk, Sp, Dv]`` with ``Sp`` a multiple of
            ``block_kv``.
        offsets: int32 ``[2B]``: each batch row's query offset, then its key
            offset (the absolute position of key 0).
        lists: ``(classes, bounds)`` from ``kernel_tiles``: int32 tile classes
            ``[Bm, Hm, nq, nk]`` and the ``[lo, hi)`` range of non-empty kv
            tiles per query tile ``[Bm, Hm, nq, 2]`` (``Bm``/``Hm`` 1 or full).
            None when ``st.sparse`` is False.
        mod_operands: flattened mod leaves (see ``flatten_mods``).
        build_mods: ``build_mods(refs, ctx_getter, b)`` rebuilds ``(transform,
            mask_fn, keep_fn)`` from the leaf refs at (folded) batch row ``b``.

    Returns:
        ``out [B, H, Tp, Dv]`` (q dtype) and ``lse [B, H, Tp]`` float32 (natural log).
    """
    B, H, Tp, D = bhsd_dims(q, st.bshd)
    _, Hk, Sp, Dv = bhsd_dims(v, st.bshd)
    bq, bkv, stages = st.block_q, st.block_kv, st.num_stages
    nq, nk = Tp // (2 * bq), Sp // bkv
    dtype = q.dtype
    n_ops = len(mod_operands)
    if lists is None:
        lists = ()
    low = Lowering(st.interpret)
    # Two query tiles per CTA (QueryTiles) when a separate output buffer fits and
    # no mod transforms scores. Measured on H100: pairing made the plain and
    # causal forward 4-10% faster; with mods, after the pipelined walk and the
    # fused forms (benchmarks/gpu_pairing.py, D=128 16k): packed documents 5%
    # faster (they read a mod array), ALiBi 1% and soft-capping 13% slower (the
    # backward's dQ kernel gains with all).
    smem = (2 * bq * (D + Dv) + stages * bkv * (D + Dv)) * jnp.dtype(dtype).itemsize + 2 * bq * 4
    tiles = QueryTiles(nq, smem <= PAIRED_SMEM and not st.has_transform)
    paired = tiles.paired
    # The pipelined walk (see pipelined_walk) keeps a score tile, two
    # probability tiles and the output accumulator in registers at once: up to
    # 128 keys and 128 value columns. Measured on H100 (bf16) against the serial
    # walk: unmasked D=128 forward 4-10% faster; masked D=128 walks, which take
    # full tiles first and the partial ones last so that no branch on the tile
    # class sits in the pipeline, 0-9% faster (three interleaved runs; causal
    # 16k 9%, window 5%, soft-cap 4%, ALiBi 0.5%; causal 2k 2% slower). Masked
    # walks with 64 value columns showed no gain (-5% to +5% across runs): they
    # keep the serial walk.
    need_mask = st.has_mask or st.mask_tail
    pipelined = bkv <= 128 and Dv <= 128 and (Dv > 64 or not need_mask)
    # Short walks (``st.short_walks``) run on a persistent grid: one CTA per SM,
    # each taking pairs of query tiles in turn, so a CTA's launch and first
    # loads are paid once per SM instead of once per pair. Measured on H100
    # (benchmarks/gpu_persist_diag.py, D=128, two runs of five interleaved
    # rounds): 1024-key window at 16k 5.5-7.4%, causal 2k B=8 2.2-5.0%, 1024
    # keys past 16k queries 2.3-6.7%, unmasked 2k B=8 0.1-0.9% faster; long
    # walks gain nothing (causal 4k -0.1 to 0.5%, causal 16k 0.5%, unmasked 16k
    # 0.2% in that run, 6% slower in an earlier one).
    # Only the pipelined walk (the one measured) runs there: two full runs of the
    # gpu tests stalled in a serial-walk test on this grid (D=64, BSHD; it
    # passed when run alone and in a third full run; not explained).
    persistent = paired and pipelined and st.short_walks
    work = PersistentTiles(B, H, nq, st.workers) if persistent else GridTiles(tiles, B, H)

    def kernel(*refs):
        q_ref, k_ref, v_ref, qoff_ref = refs[:4]
        list_refs = refs[4 : 4 + len(lists)]
        op_refs = refs[4 + len(lists) : 4 + len(lists) + n_ops]
        out_ref, lse_ref = refs[4 + len(lists) + n_ops : 6 + len(lists) + n_ops]
        scratch = refs[6 + len(lists) + n_ops :]
        smems, (k_bar, v_bar, q_bar), (k_free, v_free), sched, turn = scratch
        q_smem2, k_smem, v_smem, lse_smem2 = smems[:4]
        o_smem2 = smems[4] if paired else None

        wg = lax.axis_index("wg")
        # Heaviest query tiles first (QueryTiles): with causal masks the last
        # tiles visit the most kv tiles, and launching them early shortens the tail.
        n_items = work.count()

        def tile_walk(b, h, qi):
            return TileWalk(nk, st.mask_tail, *list_refs, index=(b, h, qi)) if st.sparse else TileWalk(nk, st.mask_tail)

        def sched_sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(_REGISTERS[0], action="increase")
            q_smem = q_smem2.at[wg]
            o_smem = o_smem2.at[wg] if paired else q_smem
            lse_smem = lse_smem2.at[wg]

            def load_q(i):
                b, h, qi = work.item(i)
                rows = pl.ds(qi * (2 * bq) + wg * bq, bq)
                plgpu.copy_gmem_to_smem(slab(q_ref, b, h, rows, st.bshd), q_smem, q_bar.at[wg])

            load_q(0)

            def serial_walk(walk, t, scores, probs, m_i, l_i):
                """Each tile's ``P V`` right after its softmax (walks with masked tiles; tiles too wide to pipeline)."""
                pl.when(wg == 1)(sched_sync)

                def step_body(j, t, is_partial, carry):
                    acc, m_i, l_i = carry
                    slot = lax.rem(t, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    s = low.matmul_nt(q_smem, k_smem.at[slot], (bq, bkv), during=sched_sync)
                    plgpu.barrier_arrive(k_free.at[slot])
                    p16, m_new, l_i, alpha = probs(*scores(j, is_partial, s), m_i, l_i)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                    plgpu.barrier_arrive(sched)
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_wait(sched)
                    acc = low.matmul_acc(acc, p16, v_smem.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i

                acc = low.cast(jnp.zeros((bq, Dv), jnp.float32), WGMMA)
                t, (acc, m_i, l_i) = walk.consume(step_body, (acc, m_i, l_i), t0=t)
                pl.when(wg == 0)(sched_sync)
                return t, acc, m_i, l_i

            def pipelined_walk(walk, t0, scores, probs, m0, l0):
                """Tile ``j``'s ``Q K^T`` and tile ``j-1``'s ``P V`` go out together; the
                softmax of tile ``j`` runs while ``P V`` computes (FlashAttention-3's
                intra-warpgroup overlap). The two warpgroups take turns issuing.
                """

                def my_turn():
                    plgpu.barrier_wait(turn.at[wg])

                def your_turn():
                    plgpu.barrier_arrive(turn.at[1 - wg])

                def with_o(o_acc):
                    accs = (o_acc,)  # interpreted, its value travels in the loop carry

                    def add_pv(p16, alpha, slot):  # o = o * alpha + p @ v (issued, not awaited)
                        o = low.read(o_acc, wait_n=None)  # no matmul in flight writes o
                        low.store(o_acc, o * lax.broadcast_in_dim(alpha, o.shape, [0]))
                        plgpu.barrier_wait(v_bar.at[slot])
                        low.mma(o_acc, p16, v_smem.at[slot])

                    def first(j, t, is_partial, carry):
                        slot = lax.rem(t, jnp.int32(stages))
                        plgpu.barrier_wait(k_bar.at[slot])

                        def tile(s_acc):
                            my_turn()
                            low.mma(s_acc, q_smem, low.T(k_smem.at[slot]))
                            your_turn()
                            s = low.read(s_acc)
                            plgpu.barrier_arrive(k_free.at[slot])
                            return probs(*scores(j, is_partial, s), m0, l0)

                        return (carry[0], *low.accumulators(tile, (bq, bkv)))

                    def step(j, t, is_partial, carry):
                        values, p_prev, m_i, l_i, alpha = carry
                        low.restore(accs, values)
                        slot = lax.rem(t, jnp.int32(stages))
                        prev = lax.rem(t - 1, jnp.int32(stages))
                        plgpu.barrier_wait(k_bar.at[slot])

                        def tile(s_acc):
                            my_turn()
                            low.mma(s_acc, q_smem, low.T(k_smem.at[slot]))
                            add_pv(p_prev, alpha, prev)
                            your_turn()
                            s = low.read(s_acc, wait_n=1)  # Q K^T done, P V in flight
                            plgpu.barrier_arrive(k_free.at[slot])
                            out = probs(*scores(j, is_partial, s), m_i, l_i)
                            low.wait(0)
                            # P V reads p_prev from registers until it completes. LLVM
                            # does not know that: keep p_prev live up to here, or it may
                            # put this tile's probabilities in the same registers, and
                            # ptxas then serialises every wgmma of the kernel (C7513;
                            # measured on H100: the causal forward took 1.3-1.6x as
                            # long). Only the row maxima pass through the barrier:
                            # routing all of ``out`` through it cost the unmasked
                            # forward 10%.
                            p_new, m_new, l_new, a_new = out
                            _, m_new = lax.optimization_barrier((p_prev, m_new))
                            out = (p_new, m_new, l_new, a_new)
                            plgpu.barrier_arrive(v_free.at[prev])
                            return out

                        out = low.accumulators(tile, (bq, bkv))
                        return (low.values(accs), *out)

                    carry = (
                        low.values(accs),
                        low.cast(jnp.zeros((bq, bkv), dtype), WGMMA),
                        m0,
                        l0,
                        low.cast(jnp.ones((bq,), jnp.float32), WGMMA_ROW),
                    )
                    t, carry, visited = walk.consume_full_first(
                        first, step, carry, t0, full_positions=bool(st.has_transform or st.dropout)
                    )
                    values, p16, m_i, l_i, alpha = carry

                    def last_pv(values):
                        low.restore(accs, values)
                        prev = lax.rem(t - 1, jnp.int32(stages))
                        my_turn()
                        add_pv(p16, alpha, prev)
                        your_turn()
                        low.wait(0)
                        plgpu.barrier_arrive(v_free.at[prev])
                        return low.values(accs)

                    values = lax.cond(visited, last_pv, lambda v: v, values) if st.sparse else last_pv(values)
                    low.restore(accs, values)
                    return t, low.read(o_acc), m_i, l_i

                return low.accumulators(with_o, (bq, Dv))

            def item(i, t):
                b, h, qi = work.item(i)
                b_mod = mod_batch_index(b, B, st.mod_batch or B)  # the batch row the mods see
                kv_off = qoff_ref[B + b]
                ctx_box = [None]
                transform, mask_fn, keep_fn = build_mods(op_refs, lambda: ctx_box[0], b)
                q_row0 = qi * (2 * bq) + wg * bq
                q_start = qoff_ref[b] + q_row0
                plgpu.barrier_wait(q_bar.at[wg])
                m_i = low.cast(jnp.full((bq,), -jnp.inf, jnp.float32), WGMMA_ROW)
                l_i = low.cast(jnp.zeros((bq,), jnp.float32), WGMMA_ROW)

                def scores(j, is_partial, s):
                    """The raw ``Q K^T`` tile through the mods and the mask: ``(s, tile context, c)``.

                    ``s * c`` are the natural-log scores: ``c`` is the softmax scale
                    without a transform, else the factor of the mod's fused form
                    (``scaled_transform``), and folds into the exponent either way.
                    """
                    ctx, c = None, st.scale
                    if st.has_transform or st.dropout or (need_mask and is_partial is not False):
                        kv_start = kv_off + j * bkv
                        q_idx = q_start + low.iota((bq, bkv), 0)
                        kv_idx = kv_start + low.iota((bq, bkv), 1)
                        ctx_box[0] = ctx = TileContext(q_idx, kv_idx, q_start, kv_start, (bq, bkv), low)
                        if st.has_transform:
                            s, c = transform.scaled(s, st.scale, b_mod, h, q_idx, kv_idx, positions=ctx)
                            s = s.astype(jnp.float32)
                        if need_mask:

                            def apply_mask(s):
                                vis = mask_fn(b_mod, h, q_idx, kv_idx) if st.has_mask else None
                                if st.mask_tail:
                                    tail = kv_idx < kv_off + st.S
                                    vis = tail if vis is None else jnp.logical_and(vis, tail)
                                return jnp.where(vis, s, -jnp.inf)

                            # Full tiles skip the mask altogether (the pipelined walk
                            # knows each tile's class statically).
                            if isinstance(is_partial, bool):
                                s = apply_mask(s) if is_partial else s
                            else:
                                s = lax.cond(is_partial, apply_mask, lambda s: s, s)
                    return s, ctx, c

                def probs(s, ctx, c, m_i, l_i):
                    """``(p, m_new, l_new, alpha)`` of a score tile, ``p`` in the input dtype."""
                    p, m_new, l_new, alpha = softmax_step(s, m_i, l_i, c)
                    if st.dropout:
                        # The normaliser keeps every weight; P V only the kept ones
                        # (scaled by 1 / (1 - rate) once, at the end).
                        p = jnp.where(tile_keep(keep_fn, b_mod, h, ctx), p, 0.0)
                    return p.astype(dtype), m_new, l_new, alpha

                walk_fn = pipelined_walk if pipelined else serial_walk
                t, acc, m_i, l_i = walk_fn(tile_walk(b, h, qi), t, scores, probs, m_i, l_i)
                if paired:  # Q is free: the next tile's loads during this epilogue
                    pl.when(i + 1 < n_items)(lambda: load_q(i + 1))

                safe_l = jnp.where(l_i == 0.0, 1.0, l_i)
                inv_l = 1.0 / (safe_l * (1.0 - st.dropout)) if st.dropout else 1.0 / safe_l
                acc = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's stores have read o_smem
                o_smem[...] = acc.astype(dtype)
                lse_smem[...] = jnp.where(l_i == 0.0, -jnp.inf, (m_i + jnp.log2(safe_l)) * _LN2)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, slab(out_ref, b, h, pl.ds(q_row0, bq), st.bshd))
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q_row0, bq)])
                return t

            # The turns of the pipelined walk alternate across the CTA's query tiles:
            # warpgroup 1's last hand-over of one tile is warpgroup 0's first turn
            # of the next. (A hand-over per tile raced: warpgroup 1 could start the
            # next tile and arrive again before warpgroup 0 had waited, completing
            # two phases of one barrier; seen as a hang in GPU interpret mode.)
            if pipelined:
                pl.when(wg == 1)(lambda: plgpu.barrier_arrive(turn.at[0]))  # warpgroup 0 goes first
            lax.fori_loop(0, n_items, item, jnp.int32(0))
            if pipelined:
                pl.when(wg == 0)(lambda: plgpu.barrier_wait(turn.at[0]))  # warpgroup 1's last hand-over
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(_REGISTERS[1], action="decrease")

            def produce(i, t):
                b, h, qi = work.item(i)
                hk = lax.div(h, jnp.array(st.group, h.dtype))

                def fetch(j, t):
                    rows = pl.ds(j * bkv, bkv)
                    slot = lax.rem(t, jnp.int32(stages))
                    # K and V slots free separately: the pipelined walk holds V a tile longer.
                    wait_slot_free((k_free,), t, stages)
                    plgpu.copy_gmem_to_smem(slab(k_ref, b, hk, rows, st.bshd), k_smem.at[slot], k_bar.at[slot])
                    wait_slot_free((v_free,), t, stages)
                    plgpu.copy_gmem_to_smem(slab(v_ref, b, hk, rows, st.bshd), v_smem.at[slot], v_bar.at[slot])

                walk = tile_walk(b, h, qi)
                return walk.produce_full_first(fetch, t0=t) if pipelined else walk.produce(fetch, t0=t)

            t_end = lax.fori_loop(0, n_items, produce, jnp.int32(0))
            drain_ring((k_free, v_free), t_end, stages)

    def entry(*refs):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        scratch = (
            plgpu.SMEM((2, bq, D), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, Dv), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((2, bq), jnp.float32),
        )
        if paired:
            scratch += (plgpu.SMEM((2, bq, Dv), dtype, transforms=(tiling, swizzle)),)
        barriers = (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=2),
        )
        free = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *s: kernel(*refs, *s),
            scratch,
            barriers,
            free,
            plgpu.Barrier(num_arrivals=2),
            plgpu.Barrier(num_barriers=2),
            collective_axes="wg",
        )

    out_type = (
        jax.ShapeDtypeStruct(layout_shape(B, H, Tp, Dv, st.bshd), dtype),
        jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
    )
    kwargs = {} if interpret is None else {"interpret": interpret}
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=work.grid,
        grid_names=work.grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(q, k, v, offsets, *lists, *mod_operands)
