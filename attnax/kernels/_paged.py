"""``paged_attention``: decoding and chunked prefill against a paged KV cache.

The public function, its config, the XLA implementation (gather the pages,
then :func:`~attnax.kernels.memory_efficient_attention`) and the preparation
the Pallas kernel needs (query packing, visit lists for masks, the number of
splits, the combine of split results). The Mosaic GPU kernel itself lives in
``_paged_mgpu.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attnax._validation import (
    PagedDims,
    check_paged_args,
    check_paged_implementation,
    check_paged_values,
)
from attnax.block_mask import EMPTY, FULL, create_block_mask
from attnax.kernels import _pallas_mgpu_common as common
from attnax.kernels._memory_efficient import MemoryEfficientConfig, memory_efficient_attention
from attnax.score_mods._base import _as_mask_mod, _as_score_mod, and_masks, compose_score_mods
from attnax.score_mods._prebuilt import causal_mod

__all__ = ["PagedAttentionConfig", "paged_attention"]

_ROWS = 64  # query rows per CTA: the wgmma M dimension
_SMEM_BYTES = 227 * 1024 - 2048  # H100 shared memory per block, less barriers and slack
_DEFAULT_NUM_SMS = 132


@dataclasses.dataclass(frozen=True)
class PagedAttentionConfig:
    """Tiling of the Pallas paged kernel; None picks a default from the shapes.

    Attributes:
        block_kv: keys per pipeline stage, a multiple of 64; the page size
            must divide it or be a multiple of it (default: 128, or 64 for
            head dims above 128, or what the page size needs).
        num_stages: depth of the shared-memory ring the pages stream through
            (default: as many as fit, at most 4).
        num_splits: how many CTAs share one sequence's keys (split-K, combined
            afterwards); default from the batch, kv heads, cache length and
            the GPU's SM count.
    """

    block_kv: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None

    def __post_init__(self):
        for name in ("block_kv", "num_stages", "num_splits"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"`PagedAttentionConfig.{name}` must be a positive int or None; got {v!r}.")
        if self.block_kv is not None and self.block_kv % 64:
            raise ValueError(f"`PagedAttentionConfig.block_kv` must be a multiple of 64; got {self.block_kv}.")
        if self.num_stages is not None and self.num_stages < 2:
            raise ValueError(f"`PagedAttentionConfig.num_stages` must be >= 2; got {self.num_stages}.")


def _cdiv(a, b):
    return -(-a // b)


# --- the XLA implementation -------------------------------------------------------------------------------------


def _gather_pages(pages, tables):
    """``[N, ps, Hk, D]`` pages and ``[B, P]`` tables -> ``[B, Hk, P * ps, D]`` (BHSD)."""
    B, P = tables.shape
    _, ps, Hk, D = pages.shape
    x = pages[tables]  # [B, P, ps, Hk, D]
    return jnp.swapaxes(x.reshape(B, P * ps, Hk, D), 1, 2)


def _xla_paged(query, k_pages, v_pages, tables, lengths, score_mod, mask_mod, scale, dims: PagedDims):
    k = _gather_pages(k_pages, tables)
    v = _gather_pages(v_pages, tables)
    config = MemoryEfficientConfig(block_q=dims.T, block_kv=min(512, dims.capacity))
    return memory_efficient_attention(
        query, k, v, score_mod=compose_score_mods(causal_mod(), score_mod), mask_mod=mask_mod, scale=scale,
        q_offset=lengths - dims.T, return_lse=True, config=config,
    )  # fmt: skip


# --- the Pallas implementation: preparation and combine ---------------------------------------------------------


def _pallas_unsupported(dims: PagedDims, dtype, interpret: bool) -> str | None:
    """Why the Pallas kernel cannot serve these arguments, or None."""
    if not interpret and jax.default_backend() != "gpu":
        return (f"the Pallas paged kernel is a Mosaic GPU kernel: it needs an NVIDIA GPU (sm90), or interpret=True; "
                f"the platform is {jax.default_backend()!r}")  # fmt: skip
    if not interpret:
        cc = getattr(jax.devices()[0], "compute_capability", None)
        if cc is not None and float(cc) < 9.0:
            return f"it uses Hopper (sm90) instructions (wgmma, TMA); this GPU has compute capability {cc}"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"it computes in bfloat16/float16; got {jnp.dtype(dtype)} (cast the cache and query)"
    if dims.D % 64 or dims.Dv % 64 or dims.D > 256 or dims.Dv > 256:
        return f"head dims must be multiples of 64 up to 256; got D={dims.D}, Dv={dims.Dv}"
    if dims.page_size % 8:
        return f"pages are copied by TMA in rows of 8: page_size must be a multiple of 8; got {dims.page_size}"
    return None


def pallas_supported(query, k_pages, v_pages, block_tables, config=None) -> bool:
    """Whether ``implementation='pallas'`` (compiled) serves these arrays on this platform.

    For callers that pick an implementation by features (the Flax decode
    cache); :func:`paged_attention` itself chooses by platform only.
    """
    B, H, T, D = query.shape
    N, ps, Hk, _ = k_pages.shape
    dims = PagedDims(B=B, H=H, Hk=Hk, T=T, D=D, Dv=v_pages.shape[3], num_pages=N, page_size=ps,
                     max_pages=block_tables.shape[1])  # fmt: skip
    if _pallas_unsupported(dims, query.dtype, interpret=False) is not None:
        return False
    try:
        resolve_config(config, dims, query.dtype)
    except NotImplementedError:
        return False
    return True


def _block_kv_for(page_size: int, D: int, Dv: int) -> int | None:
    """A stage size (multiple of 64) that pages tile exactly, preferring 128 (64 for large heads)."""
    prefs = (64, 128, 192, 256) if D + Dv > 256 else (128, 64, 192, 256)
    for bkv in prefs:
        if page_size % bkv == 0 or bkv % page_size == 0:
            return bkv
    return None


def _smem_bytes(bkv: int, stages: int, D: int, Dv: int, itemsize: int) -> int:
    return stages * bkv * (D + Dv) * itemsize + _ROWS * D * itemsize + _ROWS * Dv * 4 + _ROWS * 4


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        return int(getattr(dev, "core_count", 0)) or _DEFAULT_NUM_SMS
    except RuntimeError:
        return _DEFAULT_NUM_SMS


def default_num_splits(ctas: int, num_blocks: int, num_sms: int) -> int:
    """Splits per sequence: the fewest that fill the GPU's waves to >= 90%.

    ``ctas`` CTAs exist before splitting (batch x kv heads x row blocks), each
    streaming ``num_blocks`` stages of keys; one CTA runs per SM. Each split
    keeps at least 4 stages so the pipeline stays full.
    """
    max_splits = max(1, min(64, num_blocks // 4))

    def efficiency(n):
        waves = ctas * n / num_sms
        return waves / math.ceil(waves)

    for n in range(1, max_splits + 1):
        if efficiency(n) >= 0.9:
            return n
    return max(range(1, max_splits + 1), key=lambda n: (efficiency(n), -n))


def resolve_config(config: PagedAttentionConfig | None, dims: PagedDims, dtype) -> tuple[int, int, int]:
    """``(block_kv, num_stages, num_splits)`` for the Pallas kernel, or NotImplementedError."""
    config = config or PagedAttentionConfig()
    ps = dims.page_size
    bkv = config.block_kv or _block_kv_for(ps, dims.D, dims.Dv)
    if bkv is None or not (ps % bkv == 0 or bkv % ps == 0):
        raise NotImplementedError(
            f"paged_attention (pallas): page_size={ps} must divide block_kv or be a multiple of it, with block_kv "
            f"a multiple of 64 up to 256 (got block_kv={bkv}). Use a page size such as 16, 32, 64 or 128, or "
            "implementation='xla'."
        )
    itemsize = jnp.dtype(dtype).itemsize
    stages = config.num_stages
    if stages is None:
        stages = max((s for s in range(2, 5) if _smem_bytes(bkv, s, dims.D, dims.Dv, itemsize) <= _SMEM_BYTES),
                     default=None)  # fmt: skip
    if stages is None or _smem_bytes(bkv, stages, dims.D, dims.Dv, itemsize) > _SMEM_BYTES:
        raise NotImplementedError(
            f"paged_attention (pallas): block_kv={bkv} with D={dims.D}, Dv={dims.Dv} does not fit shared memory "
            f"with {stages or 2} stages; use a smaller PagedAttentionConfig.block_kv."
        )
    nm = _cdiv(dims.group * dims.T, _ROWS)
    splits = config.num_splits or default_num_splits(dims.B * dims.Hk * nm, _cdiv(dims.capacity, bkv), _num_sms())
    return bkv, stages, splits


def _depends_on_head(fn, *args_shapes) -> bool:
    out = jax.eval_shape(fn, *args_shapes)
    shape = (1,) * (4 - len(out.shape)) + tuple(out.shape)
    return shape[1] != 1


def head_dependence(transform, mask_fn, H: int) -> tuple[bool, bool]:
    """Whether a score rewrite and a mask vary with the query head (by shapes)."""
    i32 = jnp.int32
    b = jax.ShapeDtypeStruct((1, 1, 1, 1), i32)
    h = jax.ShapeDtypeStruct((1, H, 1, 1), i32)
    q = kv = jax.ShapeDtypeStruct((1, 1, 1, 1), i32)
    s = jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32)
    t_dep = transform is not None and H > 1 and _depends_on_head(transform, s, b, h, q, kv)
    m_dep = mask_fn is not None and H > 1 and _depends_on_head(mask_fn, b, h, q, kv)
    return t_dep, m_dep


def visit_lists(mask_fn, dims: PagedDims, lengths, block_kv: int, head_dependent: bool):
    """Per (row, kv head): how many kv blocks are full, how many to visit, and their order.

    Classes come from the user's mask ANDed with the built-in causal one, the
    queries at ``lengths - T + i``; a kv head's class joins its query heads'
    (empty only if empty for all, full only if full for all).

    Returns:
        ``counts`` int32 ``[B, Hk', 2]`` and ``order`` int32 ``[B, Hk', nk]``
        (full blocks first, then partial), ``Hk'`` is ``Hk`` or 1.
    """
    S = _cdiv(dims.capacity, block_kv) * block_kv
    full_mask = and_masks(causal_mod().mask_mod, mask_fn)
    H = dims.H if head_dependent else None
    bm = create_block_mask(full_mask, dims.B, H, dims.T, S, block_size=(dims.T, block_kv), q_offset=lengths - dims.T)
    classes = bm.block_classes[:, :, 0, :]  # [B, H or 1, nk]
    if head_dependent:
        g = classes.reshape(dims.B, dims.Hk, dims.group, -1)
        lo, hi = jnp.min(g, axis=2), jnp.max(g, axis=2)
        classes = jnp.where(hi == EMPTY, EMPTY, jnp.where(lo == FULL, FULL, 1)).astype(jnp.int8)
    rank = jnp.where(classes == FULL, 0, jnp.where(classes == EMPTY, 2, 1))
    order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    n_full = jnp.sum(classes == FULL, axis=-1, dtype=jnp.int32)
    n_total = jnp.sum(classes != EMPTY, axis=-1, dtype=jnp.int32)
    return jnp.stack([n_full, n_total], axis=-1), order


def combine_splits(out, lse):
    """Merges split results: ``out [..., NS, M, Dv]``, ``lse [..., NS, M]`` -> ``[..., M, Dv]``, ``[..., M]``."""
    m = jnp.max(lse, axis=-2, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m_safe), 0.0)  # [..., NS, M]
    total = jnp.sum(w, axis=-2)
    o = jnp.sum(w[..., None] * out, axis=-3) / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m_safe[..., 0, :], -jnp.inf)
    return o, lse


def _pallas_paged(query, k_pages, v_pages, tables, lengths, score_mod, mask_mod, scale, dims: PagedDims,
                  config, interpret: bool):  # fmt: skip
    from attnax.kernels import _paged_mgpu

    bkv, stages, splits = resolve_config(config, dims, query.dtype)
    G, T = dims.group, dims.T
    nm = _cdiv(G * T, _ROWS)
    rows_out = _ROWS if nm > 1 else _cdiv(G * T, 8) * 8
    # Rows of one kv head's CTA: query head g of the group, token t -> row g * T + t (a plain reshape).
    q = query.reshape(dims.B, dims.Hk, G * T, dims.D)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, nm * _ROWS - G * T), (0, 0))).reshape(dims.B, dims.Hk * nm, _ROWS, dims.D)

    transform = score_mod.transform if score_mod is not None and score_mod.has_transform else None
    smask = score_mod if score_mod is not None and score_mod.has_mask else None
    parts = (smask, mask_mod)

    def mask_of(parts):
        fns = [f for f in (parts[0].mask_mod if parts[0] is not None else None, parts[1]) if f is not None]
        if not fns:
            return None
        return fns[0] if len(fns) == 1 else and_masks(*fns)

    mask_fn = mask_of(parts)
    t_dep, m_dep = head_dependence(transform, mask_fn, dims.H)
    lists = visit_lists(mask_fn, dims, lengths, bkv, m_dep) if mask_fn is not None else None

    mods = (score_mod if transform is not None else None, parts)
    operands, build = common.flatten_mods(mods, pad=max(_ROWS, bkv), probe=common.exercise_mods(mask_of))

    def build_mods(refs, ctx_getter):
        smod, kparts = build(refs, ctx_getter)
        return (smod.transform if smod is not None else None), mask_of(kparts)

    st = _paged_mgpu.DecodeStatic(
        block_kv=bkv, num_stages=stages, num_splits=splits, page_size=dims.page_size, scale=scale, T=T, group=G,
        num_row_blocks=nm, rows_out=rows_out, has_transform=transform is not None, has_mask=mask_fn is not None,
        transform_per_head=t_dep, mask_per_head=m_dep, interpret=interpret,
    )  # fmt: skip
    params = common.interpret_params() if interpret else None
    out, lse = _paged_mgpu.decode_kernel_call(q, k_pages, v_pages, tables, lengths, lists, operands, build_mods,
                                              st, params)  # fmt: skip
    # out [B, Hk*nm, NS, rows_out, Dv], lse [B, Hk*nm, NS, 64]
    if splits == 1:
        out, lse = out[:, :, 0], lse[:, :, 0, :rows_out]
    else:
        out, lse = combine_splits(out, lse[..., :rows_out])
    out = out.reshape(dims.B, dims.Hk, nm * rows_out, dims.Dv)[:, :, : G * T]
    lse = lse.reshape(dims.B, dims.Hk, nm * rows_out)[:, :, : G * T]
    out = out.reshape(dims.B, dims.H, T, dims.Dv).astype(query.dtype)
    return out, lse.reshape(dims.B, dims.H, T)


# --- the public function ----------------------------------------------------------------------------------------


def paged_attention(
    query,
    k_pages,
    v_pages,
    block_tables,
    lengths,
    *,
    score_mod=None,
    mask_mod=None,
    scale=None,
    return_lse=False,
    implementation=None,
    config=None,
    interpret=False,
):
    r"""Attention of new tokens over a paged KV cache (decoding, chunked prefill, speculation).

    Row ``b`` of the batch holds ``lengths[b]`` tokens, the ``T`` new ones
    included; its token at position ``p`` lives in page
    ``block_tables[b, p // page_size]``, slot ``p % page_size``. Query ``i``
    of row ``b`` sits at absolute position ``lengths[b] - T + i`` and sees
    the keys at positions ``<=`` its own (causal within the new tokens):

    .. math::

        \mathrm{out}_{bhi} = \sum_{j \le L_b - T + i} \mathrm{softmax}_j\big(
        \mathrm{score\_mod}(q_{bhi} \cdot k_{b,g(h),j} \cdot \mathrm{scale}, b, h, L_b - T + i, j)\big)
        \, v_{b,g(h),j}

    with ``g(h) = h // (H // Hk)``. Mods see these absolute positions. Rows
    with fewer than ``T`` tokens place their first queries at negative
    positions, which see nothing (output 0): ``lengths[b] = 0`` marks an
    empty row.

    **Implementations.** ``'pallas'``: a Mosaic GPU kernel (sm90). A CTA
    takes all ``H // Hk`` query heads of one kv head (and the ``T`` tokens)
    as the rows of one tile, so each K/V page is read once; TMA streams the
    pages of its share of the keys through a shared-memory ring; long
    sequences are split over several CTAs ("flash-decoding") whose results
    are merged by their log-sum-exps. It needs bfloat16/float16, head dims
    that are multiples of 64 (up to 256) and a page size that is a multiple
    of 8 dividing (or a multiple of) the stage size. ``'xla'``: gathers the
    pages and runs :func:`~attnax.kernels.memory_efficient_attention`; any
    dtype, page size and head dim. ``None`` chooses by platform, not by
    arguments: ``'pallas'`` on GPU, ``'xla'`` elsewhere. An implementation
    that cannot serve the arguments raises ``NotImplementedError``; nothing
    falls back silently.

    Args:
        query: ``[B, H, T, D]``.
        k_pages: ``[num_pages, page_size, Hk, D]``.
        v_pages: ``[num_pages, page_size, Hk, Dv]``.
        block_tables: int ``[B, max_pages_per_seq]``; entries past a row's
            ``ceil(lengths[b] / page_size)`` pages are never read.
        lengths: int ``[B]``: tokens per row, the new ones included.
        score_mod: score mod (absolute positions); mask-type mods hide keys.
        mask_mod: mask mod, True = attend (ANDed with causality).
        scale: default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, T]`` (float32).
        implementation: ``None``, ``'pallas'`` or ``'xla'`` (see above).
        config: a :class:`PagedAttentionConfig` for the Pallas kernel.
        interpret: run the Pallas kernel in GPU interpret mode on CPU.

    Returns:
        ``out [B, H, T, Dv]`` in the query dtype, or ``(out, lse)``.

    Raises:
        ValueError: shapes that disagree; a block table too small for ``T``
            tokens; in eager calls, ``lengths`` outside
            ``[0, max_pages_per_seq * page_size]`` or a page in use that is
            not in ``[0, num_pages)``. Under ``jit`` such rows come back NaN.
        TypeError: dtypes that differ.
        NotImplementedError: an implementation that cannot serve these
            arguments (the reason is given).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import paged_attention
        >>> from attnax.reference import attention_reference
        >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        >>> k_pages = jax.random.normal(kk, (6, 4, 1, 16))  # 6 pages of 4 tokens, 1 kv head
        >>> v_pages = jax.random.normal(kv, (6, 4, 1, 16))
        >>> tables = jnp.array([[5, 0, 3], [1, 4, 2]])  # pages of each row, in order
        >>> lengths = jnp.array([10, 7])
        >>> q = jax.random.normal(kq, (2, 2, 1, 16))  # 2 query heads share the kv head
        >>> out = paged_attention(q, k_pages, v_pages, tables, lengths)
        >>> k = k_pages[tables].reshape(2, 12, 1, 16).transpose(0, 2, 1, 3)  # contiguous [B, Hk, S, D]
        >>> v = v_pages[tables].reshape(2, 12, 1, 16).transpose(0, 2, 1, 3)
        >>> valid = jnp.arange(12)[None, None, None, :] < lengths[:, None, None, None]
        >>> ref = attention_reference(q, k, v, mask=valid)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
    """
    dims, scale = check_paged_args(query, k_pages, v_pages, block_tables, lengths, score_mod=score_mod,
                                   mask_mod=mask_mod, scale=scale)  # fmt: skip
    implementation = check_paged_implementation(implementation, interpret)
    if config is not None and not isinstance(config, PagedAttentionConfig):
        raise TypeError(f"`config` must be a PagedAttentionConfig; got {type(config).__name__}.")
    check_paged_values(block_tables, lengths, dims)
    lengths = jnp.asarray(lengths, jnp.int32)
    tables = jnp.asarray(block_tables, jnp.int32)
    # Under jit nothing can raise: rows with impossible lengths or missing pages come back NaN, and the
    # kernels only ever see clamped, in-bounds values.
    in_use = jnp.arange(dims.max_pages, dtype=jnp.int32)[None, :] < _cdiv(lengths, dims.page_size)[:, None]
    bad_page = jnp.any(in_use & ((tables < 0) | (tables >= dims.num_pages)), axis=1)
    bad = bad_page | (lengths < 0) | (lengths > dims.capacity)
    lengths_c = jnp.clip(lengths, 0, dims.capacity)
    tables_c = jnp.clip(tables, 0, dims.num_pages - 1)
    smod = None if score_mod is None else _as_score_mod(score_mod)
    mmod = None if mask_mod is None else _as_mask_mod(mask_mod)
    if implementation == "xla":
        out, lse = _xla_paged(query, k_pages, v_pages, tables_c, lengths_c, smod, mmod, scale, dims)
    else:
        reason = _pallas_unsupported(dims, query.dtype, interpret)
        if reason is not None:
            raise NotImplementedError(f"paged_attention (pallas) cannot serve these arguments: {reason}. "
                                      "Pass implementation='xla' to use the XLA path.")  # fmt: skip
        out, lse = _pallas_paged(query, k_pages, v_pages, tables_c, lengths_c, smod, mmod, scale, dims, config,
                                 interpret)  # fmt: skip
    out = jnp.where(bad[:, None, None, None], jnp.asarray(jnp.nan, out.dtype), out)
    lse = jnp.where(bad[:, None, None], jnp.nan, lse)
    return (out, lse) if return_lse else out
