"""KV caches for decoding: contiguous and paged, as jittable pytrees.

Both caches are frozen dataclasses registered as pytrees whose fields are all
arrays, so they pass through ``jax.jit``, ``lax.scan`` and ``lax.while_loop``
unchanged. Every method returns a new cache. Under ``jit`` with the cache
donated (``donate_argnums``), XLA writes the new tokens into the old buffers
in place: an append costs the bytes of the new tokens, not of the cache.

* :class:`KVCache`: ``[B, S_max, Hk, D]`` buffers and per-row ``lengths``.
* :class:`PagedKVCache`: a pool of ``[num_pages, page_size, Hk, D]`` pages, a
  block table ``[B, max_pages_per_seq]`` mapping each row's logical pages to
  pool pages (``-1`` = none), per-row ``lengths``, and a free list. Appends
  take pages from the free list as rows grow; :meth:`PagedKVCache.release`
  gives a finished row's pages back.

Positions are absolute and per row: a row holding ``n`` tokens writes the
next one at position ``n``. :meth:`KVCache.attend` and
:meth:`PagedKVCache.attend` run :func:`attnax.kernels.paged_attention` over
the cache (a contiguous cache is a paged one with a trivial block table).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from attnax._validation import (
    check_cache_create,
    check_cache_room,
    check_kv_append,
    check_pages_available,
    check_release_rows,
)

__all__ = ["KVCache", "PagedKVCache"]


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


def _cdiv(a, b):
    return -(-a // b)


def _chunk_positions(lengths, T: int, num_new):
    """Absolute positions ``[B, T]`` of a chunk of ``T`` new tokens, and which of them are written.

    Without ``num_new`` every token is new: row ``b`` writes positions
    ``lengths[b] .. lengths[b] + T - 1``. With ``num_new`` a row's chunk is
    left-padded: only its last ``num_new[b]`` tokens are written, at
    ``lengths[b] ..``, so that new token ``i`` always sits at
    ``lengths_after - T + i``, the position :func:`attnax.kernels.paged_attention`
    gives query ``i``.
    """
    n = jnp.full(lengths.shape, T, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    i = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = (lengths - (T - n))[:, None] + i
    written = i >= (T - n)[:, None]
    return pos, written, n


@_pytree_dataclass
class KVCache:
    """A contiguous KV cache: ``[B, S_max, Hk, D]`` buffers and per-row lengths.

    Attributes:
        key: ``[B, S_max, Hk, D]``.
        value: ``[B, S_max, Hk, Dv]``.
        lengths: int32 ``[B]``: tokens written per row (the position of the
            next one).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.cache import KVCache
        >>> cache = KVCache.create(batch_size=2, max_length=16, num_kv_heads=1, head_dim=8)
        >>> k, v = jax.random.normal(jax.random.key(0), (2, 2, 3, 1, 8))
        >>> cache = cache.append(k, v)
        >>> cache.lengths
        Array([3, 3], dtype=int32)
        >>> q = jax.random.normal(jax.random.key(1), (2, 2, 1, 8))  # [B, H, T, D]: position 2
        >>> cache.attend(q).shape
        (2, 2, 1, 8)
    """

    key: Any
    value: Any
    lengths: Any

    @classmethod
    def create(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32, *,
               value_head_dim: int | None = None) -> KVCache:  # fmt: skip
        """An empty cache (zeros, lengths 0).

        Args:
            batch_size: rows ``B``.
            max_length: tokens per row ``S_max``.
            num_kv_heads: ``Hk``.
            head_dim: ``D`` of keys (and of values unless ``value_head_dim``).
            dtype: storage dtype.
            value_head_dim: ``Dv``.
        """
        check_cache_create(batch_size=batch_size, max_length=max_length, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, value_head_dim=value_head_dim)  # fmt: skip
        dv = head_dim if value_head_dim is None else value_head_dim
        return cls(
            key=jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
            value=jnp.zeros((batch_size, max_length, num_kv_heads, dv), dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        """Tokens one row can hold."""
        return self.key.shape[1]

    def append(self, key, value, *, num_new=None) -> KVCache:
        """Writes ``T`` new tokens per row after the row's ``lengths``.

        Args:
            key: ``[B, T, Hk, D]``.
            value: ``[B, T, Hk, Dv]``.
            num_new: optional int ``[B]`` in ``[0, T]``: row ``b`` writes only
                its last ``num_new[b]`` tokens (a left-padded chunk; 0 leaves
                the row untouched).

        Returns:
            The cache with the tokens written and ``lengths`` advanced.

        Raises:
            ValueError: wrong shapes; eagerly, a row that would overflow
                ``max_length``. Under ``jit`` an overflowing row's extra tokens
                are dropped and its length passes ``max_length``, so attention
                over it returns NaN.
        """
        B, S, Hk, D = self.key.shape
        T = check_kv_append(key, value, batch=B, num_kv_heads=Hk, head_dim=D, value_head_dim=self.value.shape[3],
                            num_new=num_new)  # fmt: skip
        check_cache_room(self.lengths, T if num_new is None else num_new, S, f"max_length={S}")
        pos, written, n = _chunk_positions(self.lengths, T, num_new)
        pos = jnp.where(written & (pos < S), pos, S)  # S is out of bounds: dropped
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        return dataclasses.replace(
            self,
            key=self.key.at[rows, pos].set(key.astype(self.key.dtype), mode="drop"),
            value=self.value.at[rows, pos].set(value.astype(self.value.dtype), mode="drop"),
            lengths=self.lengths + n,
        )

    def release(self, rows) -> KVCache:
        """Empties the rows where ``rows`` (bool ``[B]``) is True (their lengths become 0)."""
        check_release_rows(rows, self.lengths.shape[0])
        return dataclasses.replace(self, lengths=jnp.where(rows, 0, self.lengths).astype(jnp.int32))

    def as_paged(self, page_size: int | None = None):
        """This cache as pages and a block table, without copying.

        Row ``b``'s tokens ``[j * page_size, (j + 1) * page_size)`` are page
        ``b * (S_max // page_size) + j`` of ``key.reshape(-1, page_size, Hk, D)``.

        Args:
            page_size: must divide ``max_length``; default the largest of 256,
                128, 64, 32, 16, 8 that does, else ``max_length``.

        Returns:
            ``(k_pages, v_pages, block_tables)``.
        """
        B, S, Hk, D = self.key.shape
        if page_size is None:
            page_size = next((p for p in (256, 128, 64, 32, 16, 8) if S % p == 0), S)
        if not isinstance(page_size, int) or page_size < 1 or S % page_size:
            raise ValueError(f"`page_size` must be a positive int dividing max_length={S}; got {page_size!r}.")
        P = S // page_size
        k_pages = self.key.reshape(B * P, page_size, Hk, D)
        v_pages = self.value.reshape(B * P, page_size, Hk, self.value.shape[3])
        tables = jnp.arange(B * P, dtype=jnp.int32).reshape(B, P)
        return k_pages, v_pages, tables

    def attend(self, query, *, page_size: int | None = None, **kwargs):
        """:func:`attnax.kernels.paged_attention` of ``query`` ``[B, H, T, D]`` over this cache.

        The ``T`` queries sit at positions ``lengths - T + i``: append their
        keys and values first. ``kwargs`` go to ``paged_attention``.
        """
        from attnax.kernels._paged import paged_attention

        return paged_attention(query, *self.as_paged(page_size), self.lengths, **kwargs)


@_pytree_dataclass
class PagedKVCache:
    """A paged KV cache: a page pool, a block table, lengths, and a free list.

    Row ``b``'s token at position ``p`` lives in page
    ``block_tables[b, p // page_size]``, slot ``p % page_size``. A row holds
    a prefix of its block table (entries past it are ``-1``); pages come from
    the free list ``free_pages[:num_free]`` (a stack, top last) as rows grow,
    and go back to it on :meth:`release`.

    Attributes:
        k_pages: ``[num_pages, page_size, Hk, D]``.
        v_pages: ``[num_pages, page_size, Hk, Dv]``.
        block_tables: int32 ``[B, max_pages_per_seq]``; ``-1`` = no page.
        lengths: int32 ``[B]``: tokens written per row.
        free_pages: int32 ``[num_pages]``: free page ids in ``[:num_free]``.
        num_free: int32 scalar.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from attnax.cache import PagedKVCache
        >>> cache = PagedKVCache.create(batch_size=2, num_pages=8, page_size=4, max_pages_per_seq=3,
        ...                             num_kv_heads=1, head_dim=8)
        >>> k, v = jax.random.normal(jax.random.key(0), (2, 2, 5, 1, 8))
        >>> cache = cache.append(k, v)  # 5 tokens per row: 2 pages each
        >>> cache.block_tables
        Array([[ 0,  1, -1],
               [ 2,  3, -1]], dtype=int32)
        >>> int(cache.num_free)
        4
        >>> cache = cache.release(jnp.array([True, False]))
        >>> int(cache.num_free), cache.lengths.tolist()
        (6, [0, 5])
    """

    k_pages: Any
    v_pages: Any
    block_tables: Any
    lengths: Any
    free_pages: Any
    num_free: Any

    @classmethod
    def create(cls, batch_size: int, num_pages: int, page_size: int, max_pages_per_seq: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32, *, value_head_dim: int | None = None) -> PagedKVCache:  # fmt: skip
        """An empty cache: every page free, every row empty.

        Args:
            batch_size: rows ``B`` (sequences decoded together).
            num_pages: pages in the pool, shared by all rows.
            page_size: tokens per page (any positive int).
            max_pages_per_seq: block table columns: one row holds at most
                ``max_pages_per_seq * page_size`` tokens.
            num_kv_heads: ``Hk``.
            head_dim: ``D`` of keys (and of values unless ``value_head_dim``).
            dtype: storage dtype.
            value_head_dim: ``Dv``.
        """
        check_cache_create(batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           value_head_dim=value_head_dim, num_pages=num_pages, page_size=page_size,
                           max_pages_per_seq=max_pages_per_seq)  # fmt: skip
        dv = head_dim if value_head_dim is None else value_head_dim
        return cls(
            k_pages=jnp.zeros((num_pages, page_size, num_kv_heads, head_dim), dtype),
            v_pages=jnp.zeros((num_pages, page_size, num_kv_heads, dv), dtype),
            block_tables=jnp.full((batch_size, max_pages_per_seq), -1, jnp.int32),
            lengths=jnp.zeros((batch_size,), jnp.int32),
            # Reversed so that pages are handed out as 0, 1, 2, ... from the top.
            free_pages=jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32),
            num_free=jnp.asarray(num_pages, jnp.int32),
        )

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self.k_pages.shape[1]

    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
        return self.k_pages.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        """Block table columns."""
        return self.block_tables.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens one row can hold: ``max_pages_per_seq * page_size``."""
        return self.max_pages_per_seq * self.page_size

    def reserve(self, num_tokens) -> PagedKVCache:
        """Takes pages from the free list so that each row can grow by ``num_tokens``.

        A row holding ``n`` tokens and ``m`` pages gets
        ``ceil((n + num_tokens) / page_size) - m`` more (if positive). All
        rows are served or none: when the free list is short, nothing is
        taken (eagerly: ``ValueError``; under ``jit`` the rows then lack
        pages and attention over them returns NaN).

        Args:
            num_tokens: an int, or int ``[B]`` per row.
        """
        B, P = self.block_tables.shape
        ps, N = self.page_size, self.num_pages
        grow = jnp.broadcast_to(jnp.asarray(num_tokens, jnp.int32), (B,))
        held = jnp.sum(self.block_tables >= 0, axis=1, dtype=jnp.int32)
        want = jnp.minimum(_cdiv(self.lengths + grow, ps), P)
        need = jnp.maximum(want - held, 0)
        total = jnp.sum(need)
        check_pages_available(total, self.num_free)
        fits = total <= self.num_free
        need = jnp.where(fits, need, 0)
        total = jnp.where(fits, total, 0)
        start = jnp.cumsum(need) - need
        j = jnp.arange(P, dtype=jnp.int32)[None, :]
        take = j < need[:, None]
        ids = self.free_pages[jnp.clip(self.num_free - 1 - (start[:, None] + j), 0, N - 1)]
        cols = jnp.where(take, held[:, None] + j, P)  # P is out of bounds: dropped
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        return dataclasses.replace(
            self,
            block_tables=self.block_tables.at[rows, cols].set(ids, mode="drop"),
            num_free=(self.num_free - total).astype(jnp.int32),
        )

    def append(self, key, value, *, num_new=None) -> PagedKVCache:
        """Writes ``T`` new tokens per row after the row's ``lengths``, taking pages as needed.

        Args:
            key: ``[B, T, Hk, D]``.
            value: ``[B, T, Hk, Dv]``.
            num_new: optional int ``[B]`` in ``[0, T]``: row ``b`` writes only
                its last ``num_new[b]`` tokens (a left-padded chunk; 0 leaves
                the row untouched).

        Returns:
            The cache with the tokens written and ``lengths`` advanced.

        Raises:
            ValueError: wrong shapes; eagerly, a row past
                ``max_pages_per_seq * page_size`` tokens or too few free
                pages. Under ``jit`` such a row's tokens are dropped and
                attention over it returns NaN.
        """
        N, ps, Hk, D = self.k_pages.shape
        B, P = self.block_tables.shape
        T = check_kv_append(key, value, batch=B, num_kv_heads=Hk, head_dim=D, value_head_dim=self.v_pages.shape[3],
                            num_new=num_new)  # fmt: skip
        grow = T if num_new is None else num_new
        check_cache_room(self.lengths, grow, self.capacity, f"max_pages_per_seq * page_size = {P} * {ps}")
        cache = self.reserve(grow)
        pos, written, n = _chunk_positions(self.lengths, T, num_new)
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        page = cache.block_tables[rows, jnp.clip(pos // ps, 0, P - 1)]
        ok = written & (pos >= 0) & (pos < self.capacity) & (page >= 0)
        page = jnp.where(ok, page, N)  # N is out of bounds: dropped
        slot = pos % ps
        return dataclasses.replace(
            cache,
            k_pages=cache.k_pages.at[page, slot].set(key.astype(cache.k_pages.dtype), mode="drop"),
            v_pages=cache.v_pages.at[page, slot].set(value.astype(cache.v_pages.dtype), mode="drop"),
            lengths=cache.lengths + n,
        )

    def release(self, rows) -> PagedKVCache:
        """Frees the rows where ``rows`` (bool ``[B]``) is True: their pages go back to the free list."""
        B, P = self.block_tables.shape
        check_release_rows(rows, B)
        held = (self.block_tables >= 0) & rows[:, None]
        flat = held.reshape(-1)
        rank = jnp.cumsum(flat, dtype=jnp.int32) - 1
        dest = jnp.where(flat, self.num_free + rank, self.num_pages)  # out of bounds: dropped
        return dataclasses.replace(
            self,
            free_pages=self.free_pages.at[dest].set(self.block_tables.reshape(-1), mode="drop"),
            num_free=(self.num_free + jnp.sum(flat, dtype=jnp.int32)).astype(jnp.int32),
            block_tables=jnp.where(rows[:, None], -1, self.block_tables).astype(jnp.int32),
            lengths=jnp.where(rows, 0, self.lengths).astype(jnp.int32),
        )

    def attend(self, query, **kwargs):
        """:func:`attnax.kernels.paged_attention` of ``query`` ``[B, H, T, D]`` over this cache.

        The ``T`` queries sit at positions ``lengths - T + i``: append their
        keys and values first. ``kwargs`` go to ``paged_attention``.
        """
        from attnax.kernels._paged import paged_attention

        return paged_attention(query, self.k_pages, self.v_pages, self.block_tables, self.lengths, **kwargs)
