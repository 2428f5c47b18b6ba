"""``autotune_pallas_config``: time a few tilings of the Pallas flash kernel, cache the fastest.

Choices are cached under a signature of the call that reads only what a
traced call also knows (shapes, dtypes, mod structure, static options, device
kind, jax version), so a config tuned on concrete arrays outside ``jax.jit``
serves ``pallas_flash_attention(..., block_sizes="autotune")`` inside it. The
environment variable ``ATTNAX_AUTOTUNE_CACHE`` may name a JSON file that keeps
the choices across processes.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from attnax.kernels._pallas import PallasFlashConfig, _checked_call, default_config, pallas_flash_attention

__all__ = ["autotune_pallas_config"]

#: The environment variable that names the optional JSON cache file.
CACHE_ENV = "ATTNAX_AUTOTUNE_CACHE"
#: Shared memory a default candidate may use: an H100 block has 227 KiB, the rest is the compiler's margin.
_SMEM_BUDGET = 220 * 1024

_CACHE: dict[str, PallasFlashConfig] = {}  # signature -> chosen config
_LOADED: set[str] = set()  # cache files already merged into _CACHE
_logger = logging.getLogger(__name__)

#: pallas_flash_attention's keyword arguments (but block_sizes) and their defaults.
_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(pallas_flash_attention).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "block_sizes"
}


def _call_kwargs(kwargs: dict) -> dict:
    """Every keyword argument of the kernel call, defaults filled in."""
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        hint = " (the tilings to try are `candidates=`)" if "block_sizes" in unknown else ""
        raise TypeError(
            f"autotune_pallas_config got unexpected keyword arguments {unknown}{hint}; it passes on only "
            f"pallas_flash_attention's: {sorted(_DEFAULTS)}."
        )
    return {**_DEFAULTS, **kwargs}


def _traced_argument(query, key, value, kwargs: dict) -> str | None:
    """The name of the first argument that holds a tracer, or None when all are concrete."""
    for name, x in {"query": query, "key": key, "value": value, **kwargs}.items():
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x)):
            return name
    return None


def _structure(tree) -> str:
    """A mod's (or block mask's) treedef and leaf shapes, the same for concrete and traced leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def leaf(x):
        if hasattr(x, "shape") or isinstance(x, (bool, int, float, complex)):
            return str(tuple(np.shape(x)))
        return f"{getattr(x, '__module__', '')}.{getattr(x, '__qualname__', type(x).__qualname__)}"

    # Object addresses in the treedef (static fields holding functions) would change between processes.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef)) + "[" + ", ".join(map(leaf, leaves)) + "]"


def signature(query, key, value, kwargs: dict, *, grad: bool) -> str:
    """The cache key of a call: what decides its speed, never an array's values.

    ``kwargs`` holds every keyword argument (:func:`_call_kwargs`). Values of
    ``scale``, ``q_offset`` and of mod leaves are left out: a traced call
    does not know them.
    """
    arrays = [f"{name}={tuple(x.shape)}:{jnp.dtype(x.dtype).name}" for name, x in zip("qkv", (query, key, value))]
    mods = [f"{name}={_structure(kwargs[name])}" for name in ("score_mod", "mask_mod", "block_mask")]
    mask = kwargs["mask"]
    dropout = bool(kwargs["dropout_rate"]) and not kwargs["deterministic"]  # as pallas_unsupported_reason reads it
    return "; ".join([
        *arrays, *mods, f"mask={None if mask is None else tuple(np.shape(mask))}", f"dropout={dropout}",
        f"head_dim={query.shape[-1]},{value.shape[-1]}", f"layout={kwargs['layout']}", f"grad={bool(grad)}",
        f"backend={kwargs['backend']}",
        f"interpret={bool(kwargs['interpret'])}", f"device={jax.devices()[0].device_kind}", f"jax={jax.__version__}",
    ])  # fmt: skip


def _smem_bytes(config: PallasFlashConfig, D: int, Dv: int, itemsize: int) -> int:
    """The forward kernel's shared memory: two Q (then O) tiles, the K/V ring, the LSE rows, barriers."""
    Dp, Dvp = -(-D // 64) * 64, -(-Dv // 64) * 64
    tiles = 2 * config.block_q * max(Dp, Dvp) + config.num_stages * config.block_kv * (Dp + Dvp)
    return tiles * itemsize + 2 * config.block_q * 4 + 1024


def default_candidates(
    query, value, *, kv_len: int, masked: bool, causal_only: bool = False
) -> list[PallasFlashConfig]:
    """The heuristic default first, then ``block_q=64`` with 64/128/256-key tiles and 2 or 3 stages.

    Tiles longer than the (64-padded) keys and tilings over the shared-memory
    budget are left out (the default always stays).
    """
    D, Dv = query.shape[-1], value.shape[-1]
    grid = [
        PallasFlashConfig(block_q=64, block_kv=bkv, num_stages=stages)
        for bkv in (64, 128, 256)
        for stages in (2, 3)
        if bkv <= max(64, -(-kv_len // 64) * 64)
    ]
    fits = [c for c in grid if _smem_bytes(c, D, Dv, jnp.dtype(query.dtype).itemsize) <= _SMEM_BUDGET]
    default = default_config(D, kv_len=kv_len, masked=masked, causal_only=causal_only)
    return list(dict.fromkeys([default, *fits]))


def _runner(query, key, value, kwargs: dict, config: PallasFlashConfig, grad: bool):
    """A no-argument callable: one jitted call with ``config`` (and its VJP with ``grad``).

    Arrays (inputs, mod leaves, masks) are arguments of the jitted function, as
    in a real step; Python values (``interpret``, a static ``q_offset``, plain
    callables) stay static.
    """
    leaves, treedef = jax.tree_util.tree_flatten((query, key, value, kwargs))
    is_array = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    @jax.jit
    def call(arrays):
        it = iter(arrays)
        q, k, v, kw = treedef.unflatten([next(it) if a else x for x, a in zip(leaves, is_array)])
        attend = lambda q, k, v: pallas_flash_attention(q, k, v, block_sizes=config, **kw)
        if not grad:
            return attend(q, k, v)
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(jax.tree_util.tree_map(jnp.ones_like, out))

    arrays = [x for x, a in zip(leaves, is_array) if a]
    return lambda: call(arrays)


def _measure(run, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``run`` after a warm-up call (which compiles)."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reason(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _read(path: str) -> dict[str, PallasFlashConfig]:
    try:
        with open(path, encoding="utf-8") as f:
            return {str(k): PallasFlashConfig(**v) for k, v in json.load(f).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, AttributeError) as e:  # unreadable, not JSON, or not our layout
        warnings.warn(f"ignoring the autotune cache {path!r} (from ${CACHE_ENV}): {_reason(e)}", stacklevel=3)
        return {}


def _lookup(sig: str) -> PallasFlashConfig | None:
    path = os.environ.get(CACHE_ENV)
    if path and path not in _LOADED:
        _LOADED.add(path)
        for k, config in _read(path).items():
            _CACHE.setdefault(k, config)  # this process's own choices win
    return _CACHE.get(sig)


def _store(sig: str, config: PallasFlashConfig) -> None:
    _CACHE[sig] = config
    path = os.environ.get(CACHE_ENV)
    if not path:
        return
    entries = {**_read(path), sig: config}  # keep what other processes wrote meanwhile
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({k: dataclasses.asdict(c) for k, c in sorted(entries.items())}, f, indent=1)
        os.replace(tmp, path)  # atomic: readers never see half a file
    except OSError as e:
        warnings.warn(f"could not write the autotune cache {path!r}: {_reason(e)}; kept in memory only", stacklevel=3)


def _clear_cache() -> None:
    """Forgets every cached choice in memory (files are left alone)."""
    _CACHE.clear()
    _LOADED.clear()


def _check_candidates(candidates) -> list[PallasFlashConfig]:
    if isinstance(candidates, PallasFlashConfig) or not hasattr(candidates, "__iter__"):
        raise TypeError(f"`candidates` must be a sequence of PallasFlashConfig; got {candidates!r}.")
    out = list(dict.fromkeys(candidates))
    bad = [c for c in out if not isinstance(c, PallasFlashConfig)]
    if bad or not out:
        raise TypeError(
            f"`candidates` must be a non-empty sequence of PallasFlashConfig; got {candidates!r}"
            + (f" (not configs: {bad!r})." if bad else ".")
        )
    return out


def autotune_pallas_config(
    query, key, value, *, candidates=None, grad: bool = False, repeats: int = 5, cache: bool = True, **attention_kwargs
) -> PallasFlashConfig:
    """Times tilings of :func:`pallas_flash_attention` on these arguments; returns and caches the fastest.

    Each candidate runs ``pallas_flash_attention(query, key, value,
    block_sizes=candidate, **attention_kwargs)`` under ``jax.jit`` (with
    ``grad``, its VJP with respect to ``query``, ``key`` and ``value`` too):
    one warm-up call that compiles, then the median of ``repeats`` calls.
    Candidates that fail to compile or run (shared memory exhausted, say) are
    skipped with a warning that gives the reasons.

    The choice is cached under the call's signature: shapes and dtypes of
    ``query``, ``key`` and ``value``, the tree structure and leaf shapes of
    ``score_mod``, ``mask_mod`` and ``block_mask``, the shape of a dense
    ``mask``, whether dropout is on, ``grad``, ``backend``, ``interpret``, the
    device kind (``jax.devices()[0].device_kind``) and the jax version. Array
    values (mod leaves, ``q_offset``) are not part of it, so a call inside
    ``jax.jit`` finds the choice with ``block_sizes='autotune'``. If the
    environment variable ``ATTNAX_AUTOTUNE_CACHE`` names a JSON file, choices
    are also read from and written to it.

    In interpret mode (``interpret=True``, CPU) the timings say nothing about
    a GPU; they are good for tests only.

    Args:
        query, key, value: concrete arrays, as for :func:`pallas_flash_attention`.
        candidates: the :class:`PallasFlashConfig` to try. None: the heuristic
            default, then ``block_q=64`` with 64-, 128- and 256-key tiles and 2
            or 3 stages, leaving out tiles longer than the keys and those whose
            forward needs more than 220 KiB of shared memory (an H100 has 227).
        grad: time forward + backward (for training) instead of the forward.
        repeats: timed calls per candidate (after one warm-up call).
        cache: reuse a cached choice (without timing) and cache the new one.
            False times every candidate and caches nothing.
        **attention_kwargs: the other keyword arguments of
            :func:`pallas_flash_attention` (mods, masks, ``interpret``, ...).

    Returns:
        The fastest candidate.

    Raises:
        TypeError: an argument holds a tracer (called inside ``jax.jit``,
            ``grad`` or ``vmap``): call it outside, on concrete arrays.
        RuntimeError: every candidate failed (the reasons are listed).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.kernels import PallasFlashConfig, autotune_pallas_config, causal_mod, pallas_flash_attention
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 1, 128, 64), jnp.bfloat16)
        >>> opts = dict(score_mod=causal_mod(), interpret=True)  # CPU: interpret mode, for the example only
        >>> tries = [PallasFlashConfig(64, 64, 2), PallasFlashConfig(64, 128, 2)]
        >>> autotune_pallas_config(q, k, v, candidates=tries, repeats=1, **opts) in tries
        True
        >>> step = jax.jit(lambda q, k, v: pallas_flash_attention(q, k, v, block_sizes="autotune", **opts))
        >>> step(q, k, v).shape  # with the cached choice
        (1, 1, 128, 64)
    """
    kwargs = _call_kwargs(attention_kwargs)
    traced = _traced_argument(query, key, value, kwargs)
    if traced is not None:
        raise TypeError(
            f"autotune_pallas_config times real calls, but `{traced}` is a tracer (called inside jax.jit, grad or "
            f"vmap). Call it outside, on concrete arrays of the same shapes, before jitting; inside, use "
            f"pallas_flash_attention(..., block_sizes='autotune') or the returned config."
        )
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"`repeats` must be an int >= 1; got {repeats!r}.")
    args, _, _, tiling = _checked_call(query, key, value, **kwargs)  # argument errors surface here, not per candidate
    sig = signature(query, key, value, kwargs, grad=grad)
    if cache and (hit := _lookup(sig)) is not None:
        return hit
    if candidates is None:
        candidates = default_candidates(query, value, kv_len=args.dims.S, **tiling)
    candidates = _check_candidates(candidates)
    times, failures, first_error = {}, {}, None
    for config in candidates:
        try:
            times[config] = _measure(_runner(query, key, value, kwargs, config, grad), repeats)
        except Exception as e:  # compile and runtime errors come in many types
            failures[config] = _reason(e)
            first_error = first_error or e
    report = "\n".join(f"  {c}: {why}" for c, why in failures.items())
    if not times:
        msg = f"autotune_pallas_config: all {len(candidates)} candidates failed:\n{report}"
        raise RuntimeError(msg) from first_error
    if failures:
        msg = f"autotune_pallas_config skipped {len(failures)} of {len(candidates)} candidates, which failed:\n{report}"
        warnings.warn(msg, stacklevel=2)
    best = min(times, key=times.get)  # ties: the earlier candidate (the default comes first)
    _logger.info("autotune %s: %s", sig, ", ".join(f"{c}: {t * 1e3:.3f} ms" for c, t in times.items()))
    if cache:
        _store(sig, best)
    return best


def tuned_config(query, key, value, kwargs: dict) -> PallasFlashConfig:
    """The config of ``block_sizes='autotune'``: cached (tuned with ``grad`` first), else tuned now.

    ``kwargs`` holds the call's other keyword arguments. Traced arguments with
    nothing cached raise: timing needs concrete arrays.
    """
    kwargs = _call_kwargs(kwargs)
    for grad in (True, False):  # a choice tuned for training covers the forward too
        hit = _lookup(signature(query, key, value, kwargs, grad=grad))
        if hit is not None:
            return hit
    traced = _traced_argument(query, key, value, kwargs)
    if traced is None:
        return autotune_pallas_config(query, key, value, **kwargs)
    raise ValueError(
        f"pallas_flash_attention(block_sizes='autotune') has no cached config for this call, and `{traced}` is "
        f"traced (inside jax.jit or another transformation), so it cannot time candidates. Before jitting, call "
        f"attnax.kernels.autotune_pallas_config(query, key, value, ...) on concrete arrays with the same shapes "
        f"and keyword arguments (grad=True to tune for training), or pass block_sizes=PallasFlashConfig(...). "
        f"This call's signature: {signature(query, key, value, kwargs, grad=False)}"
    )
