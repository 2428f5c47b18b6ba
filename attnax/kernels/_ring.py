"""Ring attention: context parallelism over one mesh axis (shard_map + ppermute).

Every device keeps its query shard and passes its key/value shard around the
ring, one hop per step. After ``N`` steps every query shard has seen every
key shard; partial results merge with the log-sum-exp rule in float32. The
backward pass runs the same ring: dK and dV follow K and V one hop behind
and reach their owner at the end; no device ever holds the whole sequence.

Per step each device computes up to four blocks (its two query chunks
against the two key chunks it holds: see :mod:`attnax.kernels._ring_layout`)
with an *inner* kernel that takes absolute ``q_offset``/``kv_offset``, so
mods see global positions. The inner kernel's backward accepts the global
LSE and output, which is what a ring backward needs per block.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnax._validation import check_kernel_options
from attnax.kernels._memory_efficient import MemoryEfficientConfig, _acc_dtype
from attnax.kernels._ring_layout import Ranges, block_may_be_visible, local_chunks
from attnax.kernels._ring_mesh import LocalFn, local_extras, on_mesh, prepare
from attnax.kernels._tiles import TileExtras, TileStatic, cotangent_tree, diff_leaves, match_vma, varying_axes
from attnax.reference import attention_reference

__all__ = ["ring_attention", "ring_attention_reference"]

#: Inner (per-block) kernels by name: modules with ``forward``/``backward``
#: of :mod:`attnax.kernels._memory_efficient`'s signatures.
INNER_KERNELS = {
    "memory_efficient": "attnax.kernels._memory_efficient",
    "pallas": "attnax.kernels._pallas",
}


@dataclasses.dataclass(frozen=True)
class _Inner:
    """An inner kernel module with keyword options bound (hashable: part of the static config)."""

    module: Any
    options: tuple = ()

    @property
    def traces_with_vma(self) -> bool:
        """False for kernels that fail on varying-axis types inside ``shard_map``."""
        return getattr(self.module, "traces_with_vma", True)

    def forward(self, *args):
        return self.module.forward(*args, **dict(self.options))

    def backward(self, *args):
        return self.module.backward(*args, **dict(self.options))


def _pallas_serves(query, key, value) -> bool:
    from attnax.kernels._pallas import pallas_unsupported_reason

    return pallas_unsupported_reason(query, key, value) is None


def _resolve_inner(inner, interpret: bool, query, key, value):
    """``inner=`` as an :class:`_Inner`.

    None picks the Pallas kernel on GPUs where it serves the inputs
    (bfloat16/float16), else the memory-efficient kernel.
    """
    if inner is None:
        on_gpu = jax.default_backend() == "gpu"
        inner = "pallas" if on_gpu and _pallas_serves(query, key, value) else "memory_efficient"
    if interpret and inner != "pallas":
        raise ValueError(f"`interpret=True` runs the Pallas inner kernel in interpret mode; it needs inner='pallas', "
                         f"got inner={inner!r}.")  # fmt: skip
    if isinstance(inner, str):
        if inner not in INNER_KERNELS:
            raise ValueError(
                f"`inner` must be one of {sorted(INNER_KERNELS)}, None, or an object with "
                f"forward/backward; got {inner!r}."
            )
        mod = importlib.import_module(INNER_KERNELS[inner])
        return _Inner(mod, (("interpret", True),) if interpret else ())
    if not (callable(getattr(inner, "forward", None)) and callable(getattr(inner, "backward", None))):
        raise TypeError(
            f"`inner` must be a kernel name or an object with forward/backward; got {type(inner).__name__}."
        )
    return _Inner(inner)


@dataclasses.dataclass(frozen=True)
class _RingStatic:
    """Static settings of one ring call (a ``nondiff_argnum``)."""

    axis_name: Any
    layout: str
    inner: Any
    scale: float
    dropout_rate: float
    block_q: int
    block_kv: int


def _merge(o, lse, o_b, lse_b):
    """Log-sum-exp merge of two partial softmax results (NaN-free for ``-inf`` rows)."""
    lse_b = lse_b.astype(lse.dtype)
    m = jnp.maximum(lse, lse_b)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w_a, w_b = jnp.exp(lse - m), jnp.exp(lse_b - m)
    w = w_a + w_b
    safe = jnp.where(w > 0, w, 1.0)
    out = (w_a / safe)[..., None] * o + (w_b / safe)[..., None] * o_b.astype(o.dtype)
    return out, jnp.where(w > 0, m + jnp.log(safe), -jnp.inf)


def _blocks(q, k, extras, st: _RingStatic, src):
    """The blocks of one ring step: ``(q chunk index, q slice, k slice, extras, tile static, pred)``."""
    n = jax.lax.axis_size(st.axis_name)
    me = jax.lax.axis_index(st.axis_name)
    q_off = jnp.asarray(extras.q_offset, jnp.int32)
    exact_q = q_off.ndim == 0
    q_off_lo, q_off_hi = (q_off, q_off) if exact_q else (jnp.min(q_off), jnp.max(q_off))
    out = []
    for qi, (qa, qn, qg) in enumerate(local_chunks(st.layout, q.shape[2], n)):
        q_start = qg(me)
        for ka, kn, kg in local_chunks(st.layout, k.shape[2], n):
            k_start = kg(src)
            r = Ranges(q_start + q_off_lo, q_start + qn - 1 + q_off_hi, k_start, k_start + kn - 1, qn, kn, exact_q)
            pred = block_may_be_visible(extras.score_mod, extras.mask_mod, r)
            ex = dataclasses.replace(extras, q_offset=q_off + q_start, kv_offset=jnp.asarray(k_start, jnp.int32))
            ts = TileStatic(
                scale=st.scale, dropout_rate=st.dropout_rate, T=qn, S=kn,
                block_q=min(st.block_q, qn), block_kv=min(st.block_kv, kn),
            )  # fmt: skip
            out.append((qi, slice(qa, qa + qn), slice(ka, ka + kn), ex, ts, pred))
    return out


def _varying_mods(extras, *refs):
    """Mod leaves marked as varying like the data they meet.

    Inside ``shard_map`` a replicated leaf (ALiBi slopes) used with sharded
    scores gets an implicit ``pvary``, whose transpose is a ``psum``: in a
    block's VJP that would put a collective inside the ``lax.cond`` that
    skips empty blocks, and devices that skip would never join it. Varying
    copies keep every block local; the ring sums mod gradients once, at the end.
    """
    return dataclasses.replace(
        extras, score_mod=match_vma(extras.score_mod, *refs), mask_mod=match_vma(extras.mask_mod, *refs)
    )


def _maybe(pred, fn, carry):
    return fn(carry) if pred is None else jax.lax.cond(pred, fn, lambda c: c, carry)


def _ring_forward(q, k, v, extras, st: _RingStatic):
    """Per-device forward. Returns ``(out, lse, blocks_computed)`` for the local query shard."""
    axis = st.axis_name
    n = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    acc = _acc_dtype(q.dtype)
    perm = [(j, (j + 1) % n) for j in range(n)]
    B, H = q.shape[:2]
    qchunks = local_chunks(st.layout, q.shape[2], n)
    init = [(jnp.zeros((B, H, qn, v.shape[-1]), acc), jnp.full((B, H, qn), -jnp.inf, acc)) for _, qn, _ in qchunks]
    init = match_vma((init, jnp.int32(0)), q, k, v, extras, me)
    extras = _varying_mods(extras, q, k, v, me)

    def compute(s, k, v, carry):
        parts, count = carry
        parts = list(parts)
        for qi, qs, ks, ex, ts, pred in _blocks(q, k, extras, st, (me - s) % n):

            def block(c, qs=qs, ks=ks, ex=ex, ts=ts):
                o_b, lse_b = st.inner.forward(q[:, :, qs], k[:, :, ks], v[:, :, ks], ex, ts)
                return _merge(*c, o_b, lse_b)

            parts[qi] = _maybe(pred, block, parts[qi])
            count = count + (1 if pred is None else pred.astype(jnp.int32))
        return parts, count

    def step(carry, s):
        k, v, state = carry
        # Issued before the block compute, which does not depend on it: the
        # transfer of the next shard can hide behind this step's work. The
        # last step's transfer is not needed; it also hides behind compute,
        # and one loop body (rather than a peeled last step) halves the
        # program.
        k_next, v_next = jax.lax.ppermute((k, v), axis, perm)
        return (k_next, v_next, compute(s, k, v, state)), None

    (_, _, (parts, count)), _ = jax.lax.scan(step, (k, v, init), jnp.arange(n))
    out = jnp.concatenate([o for o, _ in parts], axis=2).astype(q.dtype)
    lse = jnp.concatenate([lse for _, lse in parts], axis=2)
    return out, lse, count


def _like(ct, primal):
    """Gives a cotangent the primal's varying axes: psum where it varies and the primal does not."""
    extra = tuple(a for a in sorted(varying_axes(ct) - varying_axes(primal), key=str))
    if extra:
        ct = jax.lax.psum(ct, extra)
    return match_vma(ct, primal)


def _ring_backward(q, k, v, extras, st: _RingStatic, out, lse, dout, dlse):
    axis = st.axis_name
    n = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    acc = _acc_dtype(q.dtype)
    perm = [(j, (j + 1) % n) for j in range(n)]
    mod_leaves, _ = diff_leaves(extras.score_mod)  # the primal leaves: gradients match their types
    qchunks = local_chunks(st.layout, q.shape[2], n)
    zeros_kv = (jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc))
    init = (
        *zeros_kv,
        [jnp.zeros((*q.shape[:2], qn, q.shape[3]), acc) for _, qn, _ in qchunks],
        [jnp.zeros(x.shape, x.dtype) for x in mod_leaves],
    )
    init, zeros_kv = match_vma((init, zeros_kv), q, k, v, extras, out, lse, dout, dlse, me)
    extras = _varying_mods(extras, q, k, v, me)

    def compute(s, k, v, carry):
        for qi, qs, ks, ex, ts, pred in _blocks(q, k, extras, st, (me - s) % n):

            def block(c, qi=qi, qs=qs, ks=ks, ex=ex, ts=ts):
                dk, dv, dq, dmod = c
                dq_b, dk_b, dv_b, dmod_b = st.inner.backward(
                    q[:, :, qs], k[:, :, ks], v[:, :, ks], ex, ts, out[:, :, qs], lse[:, :, qs], dout[:, :, qs],
                    dlse[:, :, qs],
                )  # fmt: skip
                dq = list(dq)
                dq[qi] = dq[qi] + dq_b.astype(acc)
                dk = dk.at[:, :, ks].add(dk_b.astype(acc))
                dv = dv.at[:, :, ks].add(dv_b.astype(acc))
                return dk, dv, dq, [a + b for a, b in zip(dmod, dmod_b)]

            carry = _maybe(pred, block, carry)
        return carry

    def step(carry, s):
        k, v, (dk_prev, dv_prev, dq, dmod) = carry
        # dK/dV travel one hop behind K/V: this step receives what the
        # devices before it accumulated for the shard it now holds, and sends
        # on its total for the previous shard. Neither transfer waits for this
        # step's compute, which goes into fresh buffers, so both can hide
        # behind it.
        k_next, v_next = jax.lax.ppermute((k, v), axis, perm)
        dk_in, dv_in = jax.lax.ppermute((dk_prev, dv_prev), axis, perm)
        dk, dv, dq, dmod = compute(s, k, v, (*zeros_kv, dq, dmod))
        return (k_next, v_next, (dk_in + dk, dv_in + dv, dq, dmod)), None

    (_, _, (dk, dv, dq, dmod)), _ = jax.lax.scan(step, (k, v, init), jnp.arange(n))
    dk, dv = jax.lax.ppermute((dk, dv), axis, perm)  # the last shard belongs to the next device: home
    dq = jnp.concatenate(dq, axis=2).astype(q.dtype)
    # Mod leaves (slopes, a bias) are global, hence replicated over the ring:
    # their gradient sums the contributions of every device.
    dmod = [_like(g, x) for g, x in zip(dmod, mod_leaves)]
    return _like(dq, q), _like(dk.astype(k.dtype), k), _like(dv.astype(v.dtype), v), dmod


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, extras, st):
    out, lse, _ = _ring_forward(q, k, v, extras, st)
    return out, lse


def _ring_fwd(q, k, v, extras, st):
    out, lse, _ = _ring_forward(q, k, v, extras, st)
    return (out, lse), (q, k, v, extras, out, lse)


def _ring_bwd(st, res, cts):
    q, k, v, extras, out, lse = res
    dout, dlse = cts
    dq, dk, dv, dmod = _ring_backward(q, k, v, extras, st, out, lse, dout, dlse)
    d_extras = TileExtras(
        score_mod=cotangent_tree(extras.score_mod, dmod),
        mask_mod=None, block_mask=None, mask=None, q_offset=None, kv_offset=None, seed=None,
    )  # fmt: skip
    return dq, dk, dv, d_extras


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    query,
    key,
    value,
    *,
    axis_name=None,
    mesh=None,
    seq_axis=None,
    batch_axis=None,
    head_axis=None,
    layout: str = "zigzag",
    inner=None,
    score_mod=None,
    mask_mod=None,
    mask=None,
    block_mask=None,
    scale=None,
    q_offset=0,
    dropout_rate=0.0,
    dropout_rng=None,
    deterministic=True,
    return_lse=False,
    **kernel_options,
):
    r"""Attention with the sequence sharded over a mesh axis (context parallelism).

    Computes what :func:`attnax.reference.attention_reference` defines on the
    whole sequence, with each of the ``N`` devices of the ring holding
    ``1/N`` of the queries, keys and values. Key/value shards travel the ring
    (``ppermute``, one hop per step, the next transfer issued before the
    current block's compute); partial outputs merge in float32 by

    .. math::

        \ell = \log(e^{\ell_a} + e^{\ell_b}), \qquad
        o = e^{\ell_a - \ell} o_a + e^{\ell_b - \ell} o_b .

    The backward pass (a ``custom_vjp``) runs the ring again: dK/dV travel
    with K/V back to their owner. Mods see **global** positions; blocks that
    the mask leaves empty are skipped (see
    :func:`~attnax.kernels.ring_block_counts`). Gradients reach the array
    leaves of ``score_mod``, summed over devices.

    Two call styles:

    * **inside** ``shard_map``: ``axis_name=`` names the sequence axis and
      the arrays are local shards. With ``layout="zigzag"`` (default) device
      ``i`` of ``N`` must hold chunks ``i`` and ``2N-1-i`` of ``2N`` equal
      chunks (reorder the global sequence with
      :func:`~attnax.kernels.zigzag_permutation`, or convert contiguous
      shards with :func:`~attnax.kernels.zigzag_shard`); with
      ``layout="contiguous"`` device ``i`` holds the ``i``-th slice. Batch
      and head indices handed to mods are those of the local arrays (shard
      mod arrays such as ALiBi slopes like the heads).
    * **on global arrays**: ``mesh=`` and ``seq_axis=``; ``batch_axis=`` and
      ``head_axis=`` optionally shard batch and heads over other mesh axes.
      Inputs are in natural order: the zig-zag relayout happens inside
      (every chunk moves once), sequences of any length are padded to a
      multiple of ``2N`` (padded keys masked), and mods see global batch
      and head indices.

    Not supported (``NotImplementedError``): a dense ``mask=`` or a
    ``block_mask=`` (give the ``mask_mod`` instead), and, on a mesh, dropout
    together with ``batch_axis``/``head_axis``.

    Args:
        query: ``[B, H, T, D]`` (local shard inside ``shard_map``).
        key: ``[B, Hk, S, D]``.
        value: ``[B, Hk, S, Dv]``.
        axis_name: sequence mesh axis, inside ``shard_map``.
        mesh: a :class:`jax.sharding.Mesh`, for global arrays.
        seq_axis: the mesh axis (or axes) sharding the sequence.
        batch_axis: mesh axis (or axes) sharding the batch, or None.
        head_axis: mesh axis (or axes) sharding query and kv heads, or None.
        layout: ``"zigzag"`` (balanced under causal masks) or
            ``"contiguous"``.
        inner: per-block kernel: ``"memory_efficient"``, ``"pallas"`` (the
            Mosaic GPU flash kernel: bfloat16/float16, no gradients to mod
            leaves), an object with ``forward``/``backward``
            of the memory-efficient kernel's signatures, or None: ``"pallas"``
            on GPUs when it serves the inputs, else ``"memory_efficient"``.
        score_mod, mask_mod, scale, q_offset, dropout_rate, dropout_rng, deterministic, return_lse: see
            :class:`attnax.typing.AttentionFn`; ``q_offset`` is the absolute position of the first query of the
            whole sequence.
        mask, block_mask: not supported (see above).
        **kernel_options: ``config``, a
            :class:`~attnax.kernels.MemoryEfficientConfig` for the
            memory-efficient inner blocks; ``interpret=True`` runs the
            ``"pallas"`` inner kernel in GPU interpret mode (CPU tests).

    Returns:
        ``out`` shaped like ``query`` (``Dv`` last), or ``(out, lse)``.

    Raises:
        ValueError: both or neither call style, unknown mesh axes, a zig-zag
            shard of odd length, batch/heads not divisible by their axes.
        NotImplementedError: the unsupported arguments above.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import causal_mod, ring_attention
        >>> from attnax.reference import attention_reference
        >>> mesh = jax.make_mesh((jax.device_count(),), ("sp",))
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 2, 64, 16))
        >>> out = ring_attention(q, k, v, mesh=mesh, seq_axis="sp", score_mod=causal_mod())
        >>> bool(jnp.allclose(out, attention_reference(q, k, v, score_mod=causal_mod()), atol=1e-5))
        True
    """
    check_kernel_options("ring_attention", kernel_options, ("config", "interpret"))
    kw = dict(
        score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask, scale=scale, q_offset=q_offset,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic,
    )  # fmt: skip
    style, args, score_mod, mask_mod, seed = prepare(
        "ring_attention", query, key, value, kw, axis_name, mesh, seq_axis, batch_axis, head_axis, layout
    )
    config = kernel_options.get("config") or MemoryEfficientConfig()
    if not isinstance(config, MemoryEfficientConfig):
        raise TypeError(f"`config` must be a MemoryEfficientConfig; got {type(config).__name__}.")
    inner = _resolve_inner(inner, bool(kernel_options.get("interpret", False)), query, key, value)
    st = _RingStatic(
        axis_name=axis_name if style == "shard_map" else seq_axis, layout=layout, inner=inner,
        scale=args.scale, dropout_rate=args.dropout_rate, block_q=config.block_q, block_kv=config.block_kv,
    )  # fmt: skip
    local = LocalFn(lambda q, k, v, extras: _ring(q, k, v, extras, st), layout, check_vma=inner.traces_with_vma)
    if style == "shard_map":
        if not inner.traces_with_vma and varying_axes(query):
            raise NotImplementedError(
                "ring_attention's inner kernel cannot be traced with varying-axis types (JAX's Mosaic GPU kernels "
                "keep them on their refs): call it inside jax.shard_map(..., check_vma=False), or pass mesh= and "
                "seq_axis= and let ring_attention wrap the shard_map."
            )
        extras = local_extras(score_mod, mask_mod, jnp.asarray(args.q_offset, jnp.int32), seed)
        out, lse = local(query, key, value, extras)
    else:
        out, lse = on_mesh(local, query, key, value, args, mesh, seq_axis, batch_axis, head_axis, score_mod,
                            mask_mod, seed)  # fmt: skip
    return (out, lse) if return_lse else out


def _gathered_reference(q, k, v, extras, axis_name, layout, scale, dropout_rate, dropout_rng):
    """The oracle on all-gathered shards; returns this device's rows ``(out, lse)``."""
    n = jax.lax.axis_size(axis_name)
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=2, tiled=True)
    qg, kg, vg = gather(q), gather(k), gather(v)
    order = {}
    for name, x in (("q", qg), ("k", kg)):
        L = x.shape[2] // n
        idx = np.concatenate([np.arange(d * L + a, d * L + a + m) for d in range(n)
                              for a, m, _ in local_chunks(layout, L, n)])  # fmt: skip
        glob = np.concatenate([np.arange(g(d), g(d) + m) for d in range(n) for _, m, g in local_chunks(layout, L, n)])
        order[name] = idx[np.argsort(glob)]  # gathered index of each global position
    qg = jnp.take(qg, order["q"], axis=2)
    kg, vg = jnp.take(kg, order["k"], axis=2), jnp.take(vg, order["k"], axis=2)
    out, lse = attention_reference(
        qg, kg, vg, score_mod=extras.score_mod, mask_mod=extras.mask_mod, scale=scale, q_offset=extras.q_offset,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=dropout_rate == 0.0, return_lse=True,
    )  # fmt: skip
    back = np.argsort(order["q"])  # gathered (device-major) order from global order
    L = q.shape[2]
    me = jax.lax.axis_index(axis_name)
    out = jax.lax.dynamic_slice_in_dim(jnp.take(out, back, axis=2), me * L, L, axis=2)
    lse = jax.lax.dynamic_slice_in_dim(jnp.take(lse, back, axis=2), me * L, L, axis=2)
    return out, lse


def ring_attention_reference(
    query,
    key,
    value,
    *,
    axis_name=None,
    mesh=None,
    seq_axis=None,
    batch_axis=None,
    head_axis=None,
    layout: str = "zigzag",
    score_mod=None,
    mask_mod=None,
    mask=None,
    block_mask=None,
    scale=None,
    q_offset=0,
    dropout_rate=0.0,
    dropout_rng=None,
    deterministic=True,
    return_lse=False,
):
    """:func:`ring_attention`'s math by all-gather and the dense oracle (tests, debugging).

    Takes the same arguments and layouts as :func:`ring_attention`, gathers
    the whole sequence on every device (``O(T S)`` memory per device), puts it
    in natural order, calls :func:`attnax.reference.attention_reference`, and
    keeps this device's rows. Differentiable by plain autodiff.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import causal_mod, ring_attention, ring_attention_reference
        >>> mesh = jax.make_mesh((jax.device_count(),), ("sp",))
        >>> q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 2, 32, 16))
        >>> ref = ring_attention_reference(q, k, v, mesh=mesh, seq_axis="sp", score_mod=causal_mod())
        >>> out = ring_attention(q, k, v, mesh=mesh, seq_axis="sp", score_mod=causal_mod())
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
    """
    kw = dict(
        score_mod=score_mod, mask_mod=mask_mod, mask=mask, block_mask=block_mask, scale=scale, q_offset=q_offset,
        dropout_rate=dropout_rate, dropout_rng=dropout_rng, deterministic=deterministic,
    )  # fmt: skip
    style, args, score_mod, mask_mod, _ = prepare(
        "ring_attention_reference", query, key, value, kw, axis_name, mesh, seq_axis, batch_axis, head_axis, layout
    )
    axis = axis_name if style == "shard_map" else seq_axis
    rng = args.dropout_rng

    def fn(q, k, v, extras):
        return _gathered_reference(q, k, v, extras, axis, layout, args.scale, args.dropout_rate, rng)

    local = LocalFn(fn, layout)
    if style == "shard_map":
        out, lse = local(query, key, value, local_extras(score_mod, mask_mod, args.q_offset, None))
    else:
        out, lse = on_mesh(local, query, key, value, args, mesh, seq_axis, batch_axis, head_axis, score_mod,
                            mask_mod, None)  # fmt: skip
    return (out, lse) if return_lse else out
