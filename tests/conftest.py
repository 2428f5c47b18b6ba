"""Test configuration: float64 oracle, strict broadcasting, 8 fake CPU devices."""

import os

# Must be set before JAX initialises a backend. GPU interpret mode runs each
# simulated warpgroup as a host thread that blocks in barrier callbacks; XLA's
# CPU intra-op thread pool (one thread per core: two in CI) can then starve
# and the run deadlocks, so intra-op parallelism is off for the tests.
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # for ring attention
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True)
settings.load_profile("ci")


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
