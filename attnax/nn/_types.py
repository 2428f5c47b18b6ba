"""``AttentionType``: the attnax kernels by name, for ``attention_fn=``."""

from __future__ import annotations

import enum
from collections.abc import Callable

from attnax._validation import check_attention_fn

__all__ = ["AttentionType", "resolve_attention_fn"]


class AttentionType(enum.Enum):
    """Names the attnax kernels, as a convenience for ``attention_fn=``.

    Each member resolves to the kernel ``attnax.kernels.<value>_attention``
    through :attr:`kernel`. Kernels are looked up when used, so a member whose
    kernel this build lacks (or this platform cannot run) fails only when it
    is chosen, with a ``NotImplementedError`` that says so.

    ============================  =============================================
    member                        kernel
    ============================  =============================================
    ``STANDARD``                  :func:`attnax.kernels.standard_attention`
    ``MEMORY_EFFICIENT``          :func:`attnax.kernels.memory_efficient_attention`
    ``FLASH``                     :func:`attnax.kernels.flash_attention` (the default)
    ``PALLAS_FLASH``              ``attnax.kernels.pallas_flash_attention``
    ``RING``                      ``attnax.kernels.ring_attention``
    ``LINEAR``                    ``attnax.kernels.linear_attention``
    ``PAGED``                     ``attnax.kernels.paged_attention``
    ============================  =============================================

    Kernels that need extra arguments (ring attention's mesh axis, paged
    attention's block table) are passed as a ``functools.partial`` instead.

    Example:
        >>> import attnax
        >>> attnax.AttentionType.STANDARD.kernel is attnax.standard_attention
        True
        >>> attnax.AttentionType("memory_efficient")
        <AttentionType.MEMORY_EFFICIENT: 'memory_efficient'>
    """

    STANDARD = "standard"
    MEMORY_EFFICIENT = "memory_efficient"
    FLASH = "flash"
    PALLAS_FLASH = "pallas_flash"
    RING = "ring"
    LINEAR = "linear"
    PAGED = "paged"

    @property
    def kernel(self) -> Callable:
        """The kernel function this member names (an :class:`attnax.typing.AttentionFn`).

        Raises:
            NotImplementedError: this build of attnax has no such kernel.
        """
        from attnax import kernels

        name = f"{self.value}_attention"
        fn = getattr(kernels, name, None)
        if fn is None:
            raise NotImplementedError(
                f"AttentionType.{self.name} names `attnax.kernels.{name}`, which this build of attnax does not "
                f"provide. Use AttentionType.FLASH (the best available kernel) or pass a kernel function."
            )
        return fn


def resolve_attention_fn(attention_fn) -> Callable:
    """``None`` -> ``flash_attention``; an :class:`AttentionType` or its name -> its kernel; a callable -> itself."""
    check_attention_fn(attention_fn)
    if attention_fn is None:
        return AttentionType.FLASH.kernel
    if isinstance(attention_fn, str):
        return AttentionType(attention_fn.lower()).kernel
    if isinstance(attention_fn, AttentionType):
        return attention_fn.kernel
    return attention_fn
