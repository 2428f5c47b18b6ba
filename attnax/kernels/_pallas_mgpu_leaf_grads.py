"""Gradients to the array leaves of score mods, inside the Pallas backward kernels.

A score mod ``t = transform(s, b, h, q_idx, kv_idx)`` reads its leaves
(ALiBi slopes, a learnable bias, a softcap) inside the kernels, tile by tile
(:class:`attnax.kernels._pallas_mgpu_common.TileOperand`). The cotangent of
one load ``x`` of a leaf is ``sum dT * dt/dx`` over the scores that load
reaches, with ``dT = P * (dP - delta)`` the cotangent of the transformed
scores, which the backward kernels compute anyway. Score mods are
elementwise in the score (the protocol), so ``dt/dx`` is a tile that a
forward-mode JVP with the load's tangent set to ones gives.

Each load (a *site*) has a kind, by how it indexes its leaf:

* ``scalar``: by scalars only (``slopes[h]``), or a 0-d leaf (a softcap).
* ``q``: by ``q_idx`` (a vector along the tile's query axis).
* ``kv``: by ``kv_idx``.
* ``tile``: by both (``bias[b, h, q_idx, kv_idx]``).

The dQ kernel, which owns query rows, sums ``scalar`` and ``q`` cotangents
along each row over its key tiles and writes one float32 value per query row
(``[B, H, Tp]``); it writes ``tile`` cotangents tile by tile
(``[B, H, Tp, Sp]``). The dK/dV kernel, whose tiles are transposed, sums
``kv`` cotangents over the query tiles of each head and writes one value per
key (``[B, H, Sp]``). Every buffer is written by one CTA (no atomics), so the
result is deterministic.

Outside the kernels, :func:`probe_sites` calls the score mod once per
``(b, h)`` in XLA to find, for every site, the leaf it reads and the scalar
indices it reads at (those may depend on ``b``, ``h`` and scalar leaf values,
not on positions), and :func:`assemble` adds each site's cotangents into its
leaf at those indices, at the absolute positions of the query rows and keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from attnax.kernels._pallas_mgpu_common import LoadTape, split_leaf_index

#: Where each kind of site is reduced: along the dQ kernel's query rows, tile by
#: tile in the dQ kernel, along the dK/dV kernel's key rows.
DQ_ROWS, DQ_TILES, DKV_ROWS = ("scalar", "q"), ("tile",), ("kv",)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LeafSites:
    """Static description of the sites of one backward call.

    Attributes:
        requested: ids (positions among the score mod's flattened leaves) of
            the leaves whose gradients are wanted.
        scalar_ids: the requested 0-d leaves; they are the first sites, in
            this order (a 0-d leaf reaches the kernel as a value, not a load).
        kinds: the kind of every site: ``"scalar"`` for each of
            ``scalar_ids``, then one per load of a requested leaf, in the
            order in which the score mod loads them.
    """

    requested: tuple[int, ...]
    scalar_ids: tuple[int, ...]
    kinds: tuple[str, ...]

    def where(self, kinds) -> tuple[int, ...]:
        """The sites of the given kinds (indices into ``kinds``)."""
        return tuple(m for m, k in enumerate(self.kinds) if k in kinds)


@dataclasses.dataclass
class _SiteRecord:
    leaf: int
    kind: str
    q_axis: int | None
    kv_axis: int | None
    index: dict  # leaf axis -> scalar index ([B, H] int32 after the vmaps of the probe)


class _SiteProbe:
    """A leaf during :func:`probe_sites`: records each load; scalar loads read the real value."""

    def __init__(self, x, leaf: int, positions, records: list):
        self.shape, self.ndim, self.dtype = x.shape, x.ndim, x.dtype
        self._x, self._leaf, self._positions, self._records = x, leaf, positions, records

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        q_idx = self._positions[0]
        if len(idx) != self.ndim:
            raise NotImplementedError(
                f"inside a Pallas kernel a mod must index its array leaf of shape {self.shape} with "
                f"{self.ndim} indices (scalars, q_idx or kv_idx); got {len(idx)}."
            )
        q_axis, kv_axis, scalars = split_leaf_index(idx, self._positions)
        index = {a: jnp.asarray(i, jnp.int32) for a, i in scalars.items()}
        if q_axis is not None and kv_axis is not None and q_axis > kv_axis:
            raise NotImplementedError("index a 2-D leaf as [..., q_idx, ..., kv_idx] (query dimension first).")
        kind = {(False, False): "scalar", (True, False): "q", (False, True): "kv", (True, True): "tile"}[
            (q_axis is not None, kv_axis is not None)
        ]
        self._records.append(_SiteRecord(self._leaf, kind, q_axis, kv_axis, index))
        if kind == "scalar":
            return self._x[tuple(index[a] for a in range(self.ndim))]
        return jnp.zeros(q_idx.shape, self.dtype)


def probe_sites(score_mod, requested: tuple[int, ...], B: int, H: int):
    """The sites of ``score_mod``'s requested leaves: ``(LeafSites, records)``.

    Calls the mod once per ``(b, h)`` under ``jax.vmap``: the records' scalar
    indices come out as ``[B, H]`` arrays.
    """
    leaves, treedef = jax.tree_util.tree_flatten(score_mod)
    arrays = [jnp.asarray(x) for x in leaves]
    want = set(requested)
    scalar_ids = tuple(i for i in requested if arrays[i].ndim == 0)
    meta: list = []

    def run(b, h):
        records: list = []
        q_idx = lax.broadcasted_iota(jnp.int32, (8, 8), 0)
        kv_idx = lax.broadcasted_iota(jnp.int32, (8, 8), 1)
        new = [x if x.ndim == 0 else _SiteProbe(x, i, (q_idx, kv_idx), records) for i, x in enumerate(arrays)]
        mod = jax.tree_util.tree_unflatten(treedef, new)
        mod.transform(jnp.zeros((8, 8), jnp.float32), b, h, q_idx, kv_idx)
        records = [r for r in records if r.leaf in want]
        meta[:] = [dataclasses.replace(r, index=dict.fromkeys(r.index)) for r in records]
        return [r.index for r in records]

    bs, hs = jnp.arange(B, dtype=jnp.int32), jnp.arange(H, dtype=jnp.int32)
    indices = jax.vmap(jax.vmap(run, (None, 0)), (0, None))(bs, hs)
    records = [dataclasses.replace(m, index=ix) for m, ix in zip(meta, indices)]
    kinds = ("scalar",) * len(scalar_ids) + tuple(r.kind for r in records)
    return LeafSites(tuple(requested), scalar_ids, kinds), records


def _eval_inline(jaxpr, consts, args):
    """Evaluates ``jaxpr`` equation by equation, inlining nested calls, with ``x ** -n`` as ``1 / x ** n``.

    Mosaic GPU lowers ``integer_pow`` only for exponents >= -1 (the
    derivative of a division by a leaf, ``s / cap``, has ``cap ** -2``) and
    has no rule for ``add_any`` (JAX's sum of tangents).
    """
    env = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr") if k in eqn.params), None)
        if eqn.primitive is lax.integer_pow_p and eqn.params["y"] < -1:
            outs = [1.0 / lax.integer_pow(invals[0], -eqn.params["y"])]
        elif eqn.primitive.name == "add_any":  # the sum of two tangents
            outs = [lax.add(*invals)]
        elif eqn.primitive.name in ("pjit", "jit", "closed_call", "custom_jvp_call") and inner is not None:
            inner = inner if hasattr(inner, "jaxpr") else jex_core.ClosedJaxpr(inner, ())
            outs = _eval_inline(inner.jaxpr, inner.consts, invals)
        else:
            bind = eqn.primitive.get_bind_params(eqn.params)  # params, or (subfuns, params) (jax versions differ)
            subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
            outs = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _lowerable(fn):
    """``fn`` retraced and evaluated by :func:`_eval_inline` (same values, primitives Mosaic GPU lowers)."""

    def wrapped(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval_inline(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), outs)

    return wrapped


def tile_scores(build_transform, s, args, ctx, sites: LeafSites, wanted: tuple[int, ...], unit: bool):
    """The transformed scores of a tile, the derivative in the score, and ``dt/dx`` of the ``wanted`` sites.

    ``build_transform(scalar_hook)`` builds the score mod's transform in the
    kernel (see ``flatten_mods``); ``args`` are ``(b, h, q_idx, kv_idx)``.
    Returns ``(t, slope or None when unit, {site: derivative tile})``.
    """
    tape = ctx.tape = LoadTape()
    scalars: dict = {}

    def record(i, x):
        if i in sites.scalar_ids:
            scalars[i] = x
        return x

    build_transform(record)(s, *args)  # records the loads; its arithmetic is dead code
    loads = list(tape.values)
    load_sites = [k for k, (leaf, _) in enumerate(tape.sites) if leaf in sites.requested]
    kinds = ("scalar",) * len(sites.scalar_ids) + tuple(tape.sites[k][1] for k in load_sites)
    if kinds != sites.kinds:
        raise RuntimeError(
            f"a score mod read its leaves differently in the kernel ({kinds}) and outside it ({sites.kinds}); "
            "a mod must index its leaves the same way on every call."
        )

    def f(s, scal, diff_loads):
        values = list(loads)
        for k, x in zip(load_sites, diff_loads):
            values[k] = x
        tape.values = values
        tape.replay()
        sub = dict(zip(sites.scalar_ids, scal))
        return build_transform(lambda i, x: sub.get(i, x))(s, *args).astype(jnp.float32)

    primals = (s, [scalars[i] for i in sites.scalar_ids], [loads[k] for k in load_sites])
    zeros = jax.tree.map(jnp.zeros_like, primals)
    jvp = _lowerable(lambda primals, tangents: jax.jvp(f, primals, tangents))
    if unit:
        t, slope = f(*primals), None
    else:
        t, slope = jvp(primals, (jnp.ones_like(s), *zeros[1:]))
    derivs = {}
    n_scalar = len(sites.scalar_ids)
    for m in wanted:
        scal_t, load_t = list(zeros[1]), list(zeros[2])
        if m < n_scalar:
            scal_t[m] = jnp.ones_like(scal_t[m])
        else:
            load_t[m - n_scalar] = jnp.ones_like(load_t[m - n_scalar])
        derivs[m] = jvp(primals, (zeros[0], scal_t, load_t))[1]
    ctx.tape = None
    return t, slope, derivs


def cotangent(ds, deriv):
    """A site's cotangent tile: ``dT * dt/dx``, zero wherever ``dT`` is (masked scores)."""
    return jnp.where(ds == 0.0, 0.0, ds * deriv)


def _scatter_add(g, v, index: dict, pos_axes, starts):
    """Adds ``v [B, H, *n]`` into ``g`` at ``index`` (``[B, H]`` per scalar axis) and ``starts`` (``[B]`` per
    positional axis): one window per ``(b, h)``, clipped to ``g`` (positions past its end are dropped)."""
    B, H, *n = v.shape
    sc_axes = sorted(index)
    perm = [*sc_axes, *pos_axes]
    gp = jnp.pad(jnp.transpose(g, perm), [(0, 0)] * len(sc_axes) + [(0, k) for k in n])  # room for overhangs
    cols = [jnp.where(index[a] < 0, index[a] + g.shape[a], index[a]) for a in sc_axes]
    cols += [jnp.broadcast_to(jnp.clip(o, 0, g.shape[a])[:, None], (B, H)) for a, o in zip(pos_axes, starts)]
    indices = jnp.stack([c.astype(jnp.int32).reshape(B * H) for c in cols], axis=-1)
    dnums = lax.ScatterDimensionNumbers(
        update_window_dims=tuple(range(1, 1 + len(n))),
        inserted_window_dims=tuple(range(len(sc_axes))),
        scatter_dims_to_operand_dims=tuple(range(len(perm))),
    )
    gp = lax.scatter_add(gp, indices, v.reshape(B * H, *n), dnums, mode=lax.GatherScatterMode.FILL_OR_DROP)
    gp = gp[tuple(slice(0, g.shape[a]) for a in perm)]
    return jnp.transpose(gp, [perm.index(a) for a in range(g.ndim)])


def assemble(score_mod, sites: LeafSites, records, values, q_offset, kv_offset) -> dict[int, Any]:
    """Each requested leaf's gradient (in its dtype), from the sites' kernel outputs.

    ``values[m]``: site ``m``'s cotangents, ``[B, H]`` (scalar), ``[B, H, T]``
    (q), ``[B, H, S]`` (kv) or ``[B, H, T, S]`` (tile), at the call's rows and
    keys; ``q_offset``/``kv_offset``: ``[B]`` absolute positions of row and key 0.
    """
    leaves = jax.tree_util.tree_leaves(score_mod)
    grads = {i: jnp.zeros(jnp.shape(leaves[i]), jnp.float32) for i in sites.requested}
    n_scalar = len(sites.scalar_ids)
    for m, i in enumerate(sites.scalar_ids):
        grads[i] = grads[i] + jnp.sum(values[m])
    for r, v in zip(records, values[n_scalar:]):
        pos = [(a, o) for a, o in ((r.q_axis, q_offset), (r.kv_axis, kv_offset)) if a is not None]
        grads[r.leaf] = _scatter_add(grads[r.leaf], v, r.index, [a for a, _ in pos], [o for _, o in pos])
    return {i: g.astype(leaves[i].dtype) for i, g in grads.items()}
