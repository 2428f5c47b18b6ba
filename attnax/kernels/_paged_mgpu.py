"""Hopper (sm90) paged decode kernel: split-K attention over a block table, in Mosaic GPU.

One CTA computes one (batch row, kv head, row block, split). Its 64 query
rows are the ``G = H / Hk`` query heads of the kv head times the ``T`` new
tokens (row ``g * T + t``; decoding fills ``G`` of them), so every K/V page
is read from memory once for the whole group. Two warpgroups:

* the memory warpgroup walks the CTA's share of the row's kv blocks and, per
  block of ``block_kv`` keys, issues one TMA copy per page (or one sub-page
  copy when pages are larger than a block) into a ``num_stages`` ring of
  shared memory, reading page ids from the block table;
* the compute warpgroup runs ``Q K^T`` and ``P V`` on the tensor cores
  (wgmma) with the online softmax in registers, and writes its normalised
  partial output and log-sum-exp; the splits are merged afterwards in XLA.

Blocks are visited full ones first (no mask evaluated), then partial ones
(causal bound and mods' masks evaluated on the register tile). Without mask
mods the order is the identity and the counts follow from ``lengths``; with
them they come from precomputed visit lists.
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

from attnax.kernels._pallas_mgpu_common import WGMMA, WGMMA_ROW, Lowering, TileContext, online_softmax

_LN2 = math.log(2.0)
_ROWS = 64


@dataclasses.dataclass(frozen=True)
class DecodeStatic:
    """Static description of one paged decode launch."""

    block_kv: int
    num_stages: int
    num_splits: int
    page_size: int
    scale: float
    T: int  # new tokens per row
    group: int  # query heads per kv head
    num_row_blocks: int  # 64-row blocks covering group * T rows
    rows_out: int  # rows of each CTA's output written back (a multiple of 8)
    has_transform: bool
    has_mask: bool  # a user mask (else only the causal bound, from lengths)
    transform_per_head: bool  # the score rewrite depends on the query head
    mask_per_head: bool  # the user mask depends on the query head
    interpret: bool


def _cdiv(a, b):
    return lax.div(a + (b - 1), jnp.int32(b))


def decode_kernel_call(
    q, k_pages, v_pages, tables, lengths, lists, mod_operands, build_mods: Callable, st: DecodeStatic,
    interpret: Any = None,
):  # fmt: skip
    """Runs the paged decode kernel.

    Args:
        q: ``[B, Hk * nm, 64, D]``: row block ``m`` of kv head ``k`` at
            ``k * nm + m``; row ``g * T + t`` of the group is query head
            ``k * G + g``, token ``t``.
        k_pages, v_pages: ``[N, page_size, Hk, D]`` / ``[N, page_size, Hk, Dv]``.
        tables: int32 ``[B, P]``, in ``[0, N)``.
        lengths: int32 ``[B]``, in ``[0, P * page_size]``.
        lists: None, or ``(counts [B, Hk', 2], order [B, Hk', nk])`` int32
            with ``Hk'`` 1 or ``Hk``: full blocks first, then partial ones.
        mod_operands: flattened mod leaves (see ``flatten_mods``).
        build_mods: rebuilds ``(transform, mask_fn)`` from the leaf refs.

    Returns:
        ``out [B, Hk * nm, NS, rows_out, Dv]`` float32 (each split
        normalised on its own) and ``lse [B, Hk * nm, NS, 64]`` float32.
    """
    B, HM, _, D = q.shape
    _, ps, Hk, Dv = v_pages.shape
    bkv, stages, NS = st.block_kv, st.num_stages, st.num_splits
    nm, T, G = st.num_row_blocks, st.T, st.group
    copies = max(1, bkv // ps)  # TMA copies per stage per operand
    rows_per_copy = min(ps, bkv)
    dtype = q.dtype
    lists = () if lists is None else tuple(lists)
    n_ops = len(mod_operands)
    low = Lowering(st.interpret)
    # Heads a 64-row block can touch (static bound for the per-head evaluation loop).
    heads_per_block = min(G, -(-_ROWS // T) + (1 if nm > 1 and _ROWS % T else 0))

    def kernel(*refs):
        q_ref, k_ref, v_ref, table_ref, len_ref = refs[:5]
        list_refs = refs[5 : 5 + len(lists)]
        op_refs = refs[5 + len(lists) : 5 + len(lists) + n_ops]
        out_ref, lse_ref = refs[5 + len(lists) + n_ops : 7 + len(lists) + n_ops]
        scratch = refs[7 + len(lists) + n_ops :]
        (q_smem, k_smem, v_smem, o_smem, lse_smem), (k_bar, v_bar, q_bar), (k_free, v_free) = scratch

        hm = lax.axis_index("heads")
        split = lax.axis_index("splits")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        if nm > 1:
            hk = lax.div(hm, jnp.int32(nm))
            row0 = lax.rem(hm, jnp.int32(nm)) * _ROWS
        else:
            hk, row0 = hm, 0
        length = len_ref[b]
        q_first = length - T  # absolute position of token 0

        if lists:
            counts_ref, order_ref = list_refs
            hh = hk if counts_ref.shape[1] > 1 else 0
            n_full = counts_ref[b, hh, 0]
            n_total = counts_ref[b, hh, 1]

            def kv_block(step):
                return order_ref[b, hh, step]
        else:
            n_total = _cdiv(length, bkv)
            # Block j is fully visible when its last key precedes the first query: (j + 1) * bkv <= q_first + 1.
            n_full = jnp.clip(lax.div(jnp.maximum(q_first + 1, 0), jnp.int32(bkv)), 0, n_total)

            def kv_block(step):
                return step

        # This split's share of the visit list: [lo, hi); the full blocks in it are [lo, mid).
        chunk = _cdiv(n_total, NS)
        lo = jnp.minimum(split * chunk, n_total)
        hi = jnp.minimum(lo + chunk, n_total)
        mid = jnp.clip(n_full, lo, hi)

        # No set_max_registers: with one compute and one memory warpgroup (256 threads) every thread may
        # already hold 255 registers.
        @pl.when(wg == 0)
        def _compute():
            plgpu.copy_gmem_to_smem(q_ref.at[b, hm], q_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            ctx_box = [None]
            transform, mask_fn = build_mods(op_refs, lambda: ctx_box[0])
            h_base = hk * G

            def positions(kv_start):
                rows = low.iota((_ROWS, bkv), 0)
                if nm > 1:
                    rows = rows + row0
                if T > 1:
                    tok, head = lax.rem(rows, jnp.int32(T)), lax.div(rows, jnp.int32(T))
                else:
                    tok, head = rows * 0, rows
                return q_first + tok, kv_start + low.iota((_ROWS, bkv), 1), head

            def per_head(fn, default, head):
                """``fn(h)`` for the head of each row: one evaluation per head of the block, rows selected."""
                g0 = lax.div(row0, jnp.int32(T)) if nm > 1 else 0
                out = default
                for i in range(heads_per_block):
                    g = jnp.minimum(g0 + i, G - 1) if nm > 1 else i
                    out = jnp.where(head == g, fn(h_base + g), out)
                return out

            def mods(s, kv_start, masked: bool):
                if not (st.has_transform or masked):
                    return s
                q_idx, kv_idx, head = positions(kv_start)
                ctx_box[0] = TileContext(
                    q_idx, kv_idx, q_first, kv_start, (_ROWS, bkv), low, q_layout="uniform" if T == 1 else "packed"
                )
                if st.has_transform:
                    if st.transform_per_head:
                        s = per_head(lambda h: transform(s, b, h, q_idx, kv_idx).astype(jnp.float32), s, head)
                    else:
                        s = transform(s, b, h_base, q_idx, kv_idx).astype(jnp.float32)
                if masked:
                    vis = kv_idx <= q_idx
                    if st.has_mask:
                        if st.mask_per_head:
                            user = per_head(lambda h: mask_fn(b, h, q_idx, kv_idx), vis, head)
                        else:
                            user = mask_fn(b, h_base, q_idx, kv_idx)
                        vis = jnp.logical_and(vis, user)
                    s = jnp.where(vis, s, -jnp.inf)
                return s

            m_i = low.cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), WGMMA_ROW)
            l_i = low.cast(jnp.zeros((_ROWS,), jnp.float32), WGMMA_ROW)
            acc = low.cast(jnp.zeros((_ROWS, Dv), jnp.float32), WGMMA)

            def step_body(step, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(step - lo, jnp.int32(stages))
                plgpu.barrier_wait(k_bar.at[slot])
                s = low.matmul_nt(q_smem, k_smem.at[slot], (_ROWS, bkv))
                plgpu.barrier_arrive(k_free.at[slot])
                s = mods(s * st.scale, kv_block(step) * bkv, masked)
                p, m_new, l_i, acc = online_softmax(s, m_i, l_i, acc)
                plgpu.barrier_wait(v_bar.at[slot])
                acc = low.matmul_acc(acc, p.astype(dtype), v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(lo, mid, lambda i, c: step_body(i, c, False), carry)
            carry = lax.fori_loop(mid, hi, lambda i, c: step_body(i, c, True), carry)
            acc, m_i, l_i = carry

            safe_l = jnp.where(l_i == 0.0, 1.0, l_i)
            o_smem[...] = acc * lax.broadcast_in_dim(1.0 / safe_l, acc.shape, [0])
            lse_smem[...] = jnp.where(l_i == 0.0, -jnp.inf, (m_i + jnp.log2(safe_l)) * _LN2)
            plgpu.commit_smem()
            src = o_smem if st.rows_out == _ROWS else o_smem.at[pl.ds(0, st.rows_out)]
            plgpu.copy_smem_to_gmem(src, out_ref.at[b, hm, split])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, hm, split])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            # Pages past the row's last one may hold anything (-1 when unallocated): never read them.
            last_page = jnp.maximum(_cdiv(length, ps) - 1, 0)

            def pages_of(step):
                """``(page, first row)`` of each copy of a block, read from the block table."""
                key0 = kv_block(step) * bkv
                out = []
                for j in range(copies):
                    if ps >= bkv:
                        col, r0 = lax.div(key0, jnp.int32(ps)), lax.rem(key0, jnp.int32(ps))
                    else:
                        col, r0 = lax.div(key0, jnp.int32(ps)) + j, 0
                    out.append((table_ref[b, jnp.minimum(col, last_page)], r0))
                return out

            def issue(src_ref, smem, bar, slot, pages):
                for j, (page, r0) in enumerate(pages):
                    dst = smem.at[slot] if copies == 1 else smem.at[slot, pl.ds(j * rows_per_copy, rows_per_copy)]
                    plgpu.copy_gmem_to_smem(src_ref.at[page, pl.ds(r0, rows_per_copy), hk], dst, bar.at[slot])

            for i in range(stages):

                @pl.when(lo + i < hi)
                def _(i=i):
                    pages = pages_of(lo + i)
                    issue(k_ref, k_smem, k_bar, i, pages)
                    issue(v_ref, v_smem, v_bar, i, pages)

            @pl.loop(lo + stages, jnp.maximum(hi, lo + stages))
            def _(step):
                slot = lax.rem(step - lo, jnp.int32(stages))
                pages = pages_of(step)  # table reads first: their latency overlaps the wait for a free slot
                # K and V of a slot are released separately (K after Q K^T, V after P V): refill each as
                # soon as it is free.
                plgpu.barrier_wait(k_free.at[slot])
                issue(k_ref, k_smem, k_bar, slot, pages)
                plgpu.barrier_wait(v_free.at[slot])
                issue(v_ref, v_smem, v_bar, slot, pages)

            # Observe the releases of the last `stages` steps too: every barrier phase is then waited on
            # (GPU interpret mode checks this; compiled, it only delays this warpgroup's exit).
            for i in range(stages):
                step = hi - stages + i

                @pl.when(step >= lo)
                def _(step=step):
                    slot = lax.rem(step - lo, jnp.int32(stages))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

    def entry(*refs):
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        f32_tiling = plgpu.TilingTransform((8, 32))
        scratch = (
            plgpu.SMEM((_ROWS, D), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, D), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, bkv, Dv), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((_ROWS, Dv), jnp.float32, transforms=(f32_tiling, swizzle)),
            plgpu.SMEM((_ROWS,), jnp.float32),
        )
        barriers = (
            plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
            plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
            plgpu.Barrier(),
        )
        free = (plgpu.Barrier(num_barriers=stages),) * 2
        pl.run_scoped(lambda *s: kernel(*refs, *s), scratch, barriers, free, collective_axes="wg")

    out_type = (
        jax.ShapeDtypeStruct((B, HM, NS, st.rows_out, Dv), jnp.float32),
        jax.ShapeDtypeStruct((B, HM, NS, _ROWS), jnp.float32),
    )
    kwargs = {} if interpret is None else {"interpret": interpret}
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(HM, NS, B),
        grid_names=("heads", "splits", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(q, k_pages, v_pages, tables, lengths, *lists, *mod_operands)
