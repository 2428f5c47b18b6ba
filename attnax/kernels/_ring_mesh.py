"""Ring attention's two call styles: checks, and the shard_map around global arrays.

Inside ``shard_map`` (``axis_name=``) the ring runs on the caller's shards as
they are. On global arrays (``mesh=``, ``seq_axis=``) :func:`on_mesh` pads the
sequences to a multiple of ``2N`` (masking padded keys), reshards explicitly
sharded inputs, wraps the ``shard_map``, moves shards into the zig-zag layout
and back, and hands mods the global batch and head indices.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attnax import _dropout
from attnax._validation import (
    check_attention_args,
    check_ring_layout,
    check_ring_local_len,
    check_ring_mesh_dims,
    check_ring_style,
)
from attnax.kernels._memory_efficient import _as_arrays
from attnax.kernels._ring_layout import KeyBound, OffsetMask, OffsetMod, zigzag_shard, zigzag_unshard
from attnax.kernels._tiles import TileExtras
from attnax.score_mods._base import _AndMask, _as_mask_mod, _as_score_mod


def shard_map(f, mesh, in_specs, out_specs, check_vma: bool = True):
    """``jax.shard_map`` (jax >= 0.6), else the experimental one: the one place that differs."""
    sm = getattr(jax, "shard_map", None)
    if sm is None:  # pragma: no cover - old jax
        from jax.experimental.shard_map import shard_map as sm

        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)
    return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def check_supported(name, mask, block_mask):
    """Raises ``NotImplementedError`` for the AttentionFn arguments a ring cannot serve."""
    if mask is not None:
        raise NotImplementedError(
            f"{name} cannot take a dense `mask=`: each device would need the mask columns of every key shard. "
            "Express the mask as a `mask_mod` (or a mask-type score mod such as document_mask_mod): ring "
            "attention evaluates it on global positions, block by block."
        )
    if block_mask is not None:
        raise NotImplementedError(
            f"{name} cannot take a `block_mask=` (it classifies tiles of the global sequence, not of the "
            "ring's chunks); pass its `mask_mod` instead: ring attention skips empty chunk pairs itself."
        )


def local_extras(score_mod, mask_mod, q_offset, seed, b_offset=None, h_offset=None):
    """The traced extras of one device; mods see ``b + b_offset``, ``h + h_offset`` when given."""
    if b_offset is not None or h_offset is not None:
        b0 = jnp.int32(0) if b_offset is None else b_offset
        h0 = jnp.int32(0) if h_offset is None else h_offset
        score_mod = None if score_mod is None else OffsetMod(score_mod, b0, h0)
        mask_mod = None if mask_mod is None else OffsetMask(mask_mod, b0, h0)
    return TileExtras(
        score_mod=score_mod, mask_mod=mask_mod, block_mask=None, mask=None,
        q_offset=q_offset, kv_offset=jnp.int32(0), seed=seed,
    )  # fmt: skip


def _axis_offset(axis, local_size):
    if axis is None:
        return None
    return jax.lax.axis_index(axis) * local_size


def _explicit_axes(mesh) -> set:
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return {a for a, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if t == explicit}


def _to_spec(x, mesh, spec):
    """Explicitly sharded meshes need inputs resharded to the shard_map specs; auto ones reshard themselves."""
    explicit = _explicit_axes(mesh)
    if not explicit:
        return x
    spec = P(*(a if a is not None and set(a if isinstance(a, tuple) else (a,)) <= explicit else None for a in spec))
    return jax.reshard(x, NamedSharding(mesh, spec))


def _pad_seq(x, length, mesh, keep_spec):
    if x.shape[2] == length:
        return x
    x = _to_spec(x, mesh, keep_spec)  # unshard the sequence first: an uneven dim cannot stay sharded
    return jnp.pad(x, [(0, 0), (0, 0), (0, length - x.shape[2])] + [(0, 0)] * (x.ndim - 3))


def on_mesh(local_fn, query, key, value, args, mesh, seq_axis, batch_axis, head_axis, score_mod, mask_mod, seed):
    """Runs ``local_fn`` on zig-zag or contiguous shards of global arrays; returns global ``(out, lse)``."""
    n = int(np.prod([mesh.shape[a] for a in (seq_axis if isinstance(seq_axis, tuple) else (seq_axis,))]))
    d = args.dims
    Tp, Sp = -(-d.T // (2 * n)) * (2 * n), -(-d.S // (2 * n)) * (2 * n)
    spec = P(batch_axis, head_axis, seq_axis, None)
    no_seq = P(batch_axis, head_axis, None, None)
    q = _to_spec(_pad_seq(query, Tp, mesh, no_seq), mesh, spec)
    k = _to_spec(_pad_seq(key, Sp, mesh, no_seq), mesh, spec)
    v = _to_spec(_pad_seq(value, Sp, mesh, no_seq), mesh, spec)
    if Sp != d.S:
        bound = KeyBound(d.S)
        mask_mod = bound if mask_mod is None else _AndMask((mask_mod, bound))
    q_offset = jnp.asarray(args.q_offset, jnp.int32)
    off_spec = P(batch_axis) if q_offset.ndim else P()
    if q_offset.ndim:
        q_offset = _to_spec(q_offset, mesh, off_spec)

    def body(q, k, v, score_mod, mask_mod, q_offset, seed):
        extras = local_extras(
            score_mod,
            mask_mod,
            q_offset,
            seed,
            _axis_offset(batch_axis, q.shape[0]),
            _axis_offset(head_axis, q.shape[1]),
        )
        q, k, v = (zigzag_shard(x, seq_axis) for x in (q, k, v)) if local_fn.layout == "zigzag" else (q, k, v)
        out, lse = local_fn(q, k, v, extras)
        if local_fn.layout == "zigzag":
            out, lse = zigzag_unshard(out, seq_axis), zigzag_unshard(lse, seq_axis)
        return out, lse

    lse_spec = P(batch_axis, head_axis, seq_axis)
    out, lse = shard_map(
        body, mesh, in_specs=(spec, spec, spec, P(), P(), off_spec, P()), out_specs=(spec, lse_spec),
        check_vma=local_fn.check_vma,
    )(q, k, v, score_mod, mask_mod, q_offset, seed)  # fmt: skip
    if Tp != d.T:
        out = _to_spec(out, mesh, no_seq)[:, :, : d.T]
        lse = _to_spec(lse, mesh, P(batch_axis, head_axis, None))[:, :, : d.T]
    return out, lse


@dataclasses.dataclass(frozen=True)
class LocalFn:
    """The per-device computation (ring or gathered oracle) and the layout it expects."""

    fn: Any
    layout: str
    #: False when the computation cannot be traced with varying-axis types
    #: (Mosaic GPU kernels): the ``shard_map`` around global arrays then runs
    #: with ``check_vma=False``.
    check_vma: bool = True

    def __call__(self, q, k, v, extras):
        return self.fn(q, k, v, extras)


def prepare(name, query, key, value, kw, axis_name, mesh, seq_axis, batch_axis, head_axis, layout):
    """Shared checks of both entry points; returns ``(style, args, score_mod, mask_mod, seed)``."""
    style = check_ring_style(axis_name, mesh, seq_axis, batch_axis, head_axis)
    check_ring_layout(layout)
    check_supported(name, kw["mask"], kw["block_mask"])
    args = check_attention_args(query, key, value, **kw)
    if style == "shard_map":
        check_ring_local_len("query", args.dims.T, layout)
        check_ring_local_len("key", args.dims.S, layout)
    else:
        check_ring_mesh_dims(args.dims, mesh, batch_axis, head_axis)
        if args.dropout_active and (batch_axis is not None or head_axis is not None):
            raise NotImplementedError(
                f"{name}: dropout with `batch_axis`/`head_axis` is not supported: the dropout pattern is a "
                "function of the local batch and head index, so it would repeat across those shards. Shard "
                "only the sequence, or call ring attention inside your own shard_map with a per-shard key."
            )
    score_mod, mask_mod = kw["score_mod"], kw["mask_mod"]
    score_mod = None if score_mod is None else _as_arrays(_as_score_mod(score_mod))
    mask_mod = None if mask_mod is None else _as_mask_mod(mask_mod)
    seed = _dropout.key_to_seed(args.dropout_rng) if args.dropout_active else None
    return style, args, score_mod, mask_mod, seed
