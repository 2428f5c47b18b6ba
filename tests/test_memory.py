"""Peak temporary memory from XLA's compiled memory analysis (CPU, compile only).

At T = S = 16384, B = H = 1, D = 64, float32 the dense kernel needs the
16k x 16k score matrix (1 GiB per copy); the memory-efficient kernel needs
O(T + S). Nothing is run: the programs are lowered and compiled from shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnax.kernels import causal_mod, memory_efficient_attention, standard_attention

MiB = 2**20
N, D = 16384, 64


def forward(kernel):
    return lambda q, k, v: kernel(q, k, v, score_mod=causal_mod())


def forward_backward(kernel):
    def loss(q, k, v):
        return jnp.sum(kernel(q, k, v, score_mod=causal_mod()))

    return jax.grad(loss, argnums=(0, 1, 2))


def temp_bytes(fn, n=N):
    x = jax.ShapeDtypeStruct((1, 1, n, D), jnp.float32)
    analysis = jax.jit(fn).lower(x, x, x).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no compiled memory analysis")
    return analysis.temp_size_in_bytes


@pytest.fixture(scope="module")
def temps():
    out = {}
    for name, kernel in (("standard", standard_attention), ("memory_efficient", memory_efficient_attention)):
        out[name, "forward"] = temp_bytes(forward(kernel))
        out[name, "forward+backward"] = temp_bytes(forward_backward(kernel))
    for (name, what), b in sorted(out.items()):
        print(f"temp memory at T=S={N}, D={D}, float32: {name:17s} {what:17s} {b / MiB:9.1f} MiB")
    return out


@pytest.mark.parametrize("what", ["forward", "forward+backward"])
def test_memory_efficient_stays_small(temps, what, record_property):
    dense, chunked = temps["standard", what], temps["memory_efficient", what]
    record_property(f"{what}_standard_MiB", round(dense / MiB, 1))
    record_property(f"{what}_memory_efficient_MiB", round(chunked / MiB, 1))
    assert dense >= N * N * 4, "the dense kernel must hold the 16k x 16k score matrix (1 GiB)"
    assert chunked < dense / 8, f"memory_efficient {chunked / MiB:.1f} MiB vs standard {dense / MiB:.1f} MiB"
    assert chunked < 64 * MiB, f"memory_efficient {what} needs {chunked / MiB:.1f} MiB"


def test_memory_efficient_grows_linearly():
    # O(T + S): doubling the length about doubles the temporaries (quadratic would be x4).
    half = temp_bytes(forward_backward(memory_efficient_attention), N // 2)
    full = temp_bytes(forward_backward(memory_efficient_attention), N)
    print(f"memory_efficient forward+backward temp: T=S={N // 2}: {half / MiB:.1f} MiB, T=S={N}: {full / MiB:.1f} MiB")
    assert full < 2.5 * half, (half, full)
