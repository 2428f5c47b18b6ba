"""A paged decode cache for :class:`attnax.MultiHeadAttention`.

:class:`PagedDecodeCache` keeps an :class:`attnax.cache.PagedKVCache` in
``nnx.Cache`` variables and attends with
:func:`attnax.kernels.paged_attention`, so decode mode reads each K/V page
once per step and rows advance independently (per-row lengths). It plugs in
through the :class:`attnax.nn.DecodeCache` interface: its views carry an
``attention`` callable that the module calls instead of its ``attention_fn``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnax.cache import PagedKVCache
from attnax.kernels._paged import pallas_supported
from attnax.nn._cache import CacheView

__all__ = ["PagedDecodeCache"]


class PagedDecodeCache(nnx.Module):
    """A decode-mode KV cache of pages, attended with :func:`attnax.kernels.paged_attention`.

    Args:
        batch_size: ``B``.
        max_length: tokens per row (prompt plus generated ones).
        num_kv_heads: ``Hk``.
        head_dim: ``D`` (keys and values).
        dtype: storage dtype; queries are cast to it for the kernel.
        page_size: tokens per page.
        num_pages: pages in the pool; default enough for every row to reach
            ``max_length``.
        implementation: ``paged_attention``'s ``implementation``; None
            picks the Pallas kernel where it can serve the cache (a GPU,
            bfloat16/float16, its head dims and page size), else the XLA
            path.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.nn import PagedDecodeCache
        >>> cache = PagedDecodeCache(2, 16, 1, 8, jnp.float32, page_size=4)
        >>> k = v = jax.random.normal(jax.random.key(0), (2, 3, 1, 8))
        >>> view = cache.append(k, v)
        >>> cache.position.tolist(), view.attention(jnp.ones((2, 2, 3, 8))).shape
        ([3, 3], (2, 2, 3, 8))
    """

    def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype, *,
                 page_size: int = 16, num_pages: int | None = None, implementation: str | None = None):  # fmt: skip
        max_pages = -(-max_length // page_size) if isinstance(page_size, int) and page_size > 0 else 1
        if num_pages is None:
            num_pages = batch_size * max_pages
        kv = PagedKVCache.create(batch_size, num_pages, page_size, max_pages, num_kv_heads, head_dim, dtype)
        self.implementation = implementation
        self.k_pages = nnx.Cache(kv.k_pages)
        self.v_pages = nnx.Cache(kv.v_pages)
        self.block_tables = nnx.Cache(kv.block_tables)
        self.lengths = nnx.Cache(kv.lengths)
        self.free_pages = nnx.Cache(kv.free_pages)
        self.num_free = nnx.Cache(kv.num_free)

    @property
    def kv(self) -> PagedKVCache:
        """The cache contents as an :class:`attnax.cache.PagedKVCache`."""
        return PagedKVCache(
            k_pages=self.k_pages[...], v_pages=self.v_pages[...], block_tables=self.block_tables[...],
            lengths=self.lengths[...], free_pages=self.free_pages[...], num_free=self.num_free[...],
        )  # fmt: skip

    def _store(self, new: PagedKVCache) -> None:
        for name in ("k_pages", "v_pages", "block_tables", "lengths", "free_pages", "num_free"):
            getattr(self, name)[...] = getattr(new, name)

    @property
    def position(self) -> jax.Array:
        """Tokens written per row, int32 ``[B]`` (the absolute position of each row's next token)."""
        return self.lengths[...]

    def release(self, rows) -> None:
        """Empties the rows where ``rows`` (bool ``[B]``) is True and frees their pages."""
        self._store(self.kv.release(rows))

    def append(self, key, value) -> CacheView:
        """Writes ``key`` ``[B, T, Hk, D]`` / ``value`` after each row's tokens (taking pages as needed).

        Raises:
            ValueError: eagerly, a row past ``max_length`` or an empty free
                list; under ``jit`` attention over such a row returns NaN.
        """
        kv = self.kv.append(key, value)
        self._store(kv)
        implementation = self.implementation

        def attention(query, *, score_mod=None, mask=None, dropout_rate=0.0, deterministic=True, **kwargs):
            # BHSD query; the module's other keywords (dropout rng) are accepted and unused when inactive.
            if mask is not None:
                raise NotImplementedError("decode mode with a paged cache does not take a dense `mask=`: express "
                                          "it as a score mod.")  # fmt: skip
            if dropout_rate > 0.0 and not deterministic:
                raise NotImplementedError("decode mode with a paged cache does not implement attention dropout: "
                                          "call with deterministic=True.")  # fmt: skip
            kwargs.pop("dropout_rng", None)
            q = query.astype(kv.k_pages.dtype)
            impl = implementation
            if impl is None:
                impl = "pallas" if pallas_supported(q, kv.k_pages, kv.v_pages, kv.block_tables) else "xla"
            out = kv.attend(q, score_mod=score_mod, implementation=impl, **kwargs)
            return out.astype(query.dtype)

        T = key.shape[1]
        return CacheView(key=None, value=None, q_offset=kv.lengths - T, mask_mod=None, valid=jnp.asarray(True),
                         attention=attention)  # fmt: skip
