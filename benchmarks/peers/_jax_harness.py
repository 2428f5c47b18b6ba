"""What every JAX peer shares: inputs, forward / forward+backward, timing, spot checks.

A peer subclasses :class:`JaxPeer` and implements ``build(case, inputs)``,
returning a :class:`Built`: a function of arrays (no large closed-over
constants: JAX would embed them in the program), its arguments in the
peer's own layout, and how to turn its output back into ``[B, H, T, D]``.
Layout changes happen in ``build``, outside the timed function.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._cases import CHECK_ATOL, Case, check_points, reference_rows
from benchmarks._timing import TimingConfig, time_jax

__all__ = ["Built", "JaxPeer"]


@dataclasses.dataclass
class Built:
    """A peer's callable for one case.

    Attributes:
        fn: ``fn(*args) -> out``.
        args: its arguments (arrays and pytrees).
        to_canonical: ``out -> [B, H, T, D]`` (for the spot check).
        diff_argnums: the positions of q, k, v in ``args`` (for the backward).
        note: recorded with the results (which kernel, which options).
    """

    fn: Callable
    args: tuple
    to_canonical: Callable = lambda o: o
    diff_argnums: tuple[int, ...] = (0, 1, 2)
    note: str | None = None


class JaxPeer:
    """Base class of the JAX peers (see the module docstring)."""

    def __init__(self, variant: str | None, *, smoke: bool = False, check: bool = True):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.variant = variant
        self.smoke = smoke
        self.check = check
        self.platform = jax.devices()[0].platform
        self.setup()

    def setup(self) -> None:
        """The peer's own imports; raise to mark the peer unavailable."""

    def info(self) -> dict:
        import jax
        import jaxlib

        d = jax.devices()[0]
        out = {
            "framework": "jax",
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "platform": d.platform,
            "device_kind": d.device_kind,
            "device_count": jax.device_count(),
        }
        try:
            out["platform_version"] = d.client.platform_version
        except Exception:  # noqa: BLE001
            pass
        out.update(self.extra_info())
        return out

    def extra_info(self) -> dict:
        return {}

    # -- inputs -------------------------------------------------------------

    def make_inputs(self, case: Case) -> dict:
        """Canonical inputs: ``q [B,H,T,D]``, ``k``/``v [B,Hk,S,D]`` bf16 N(0, 1)."""
        jax, jnp = self.jax, self.jnp
        kq, kk, kv = jax.random.split(jax.random.key(1234), 3)
        dt = jnp.bfloat16
        q = jax.random.normal(kq, (case.B, case.H, case.T, case.D), dt)
        k = jax.random.normal(kk, (case.B, case.Hk, case.S, case.D), dt)
        v = jax.random.normal(kv, (case.B, case.Hk, case.S, case.D), dt)
        out = {"q": q, "k": k, "v": v}
        if case.page is not None:
            if case.S % case.page:
                raise ValueError(f"S={case.S} is not a multiple of the page size {case.page}")
            n = case.B * (case.S // case.page)
            perm = np.random.default_rng(0).permutation(n).astype(np.int32)
            out["table"] = perm.reshape(case.B, case.S // case.page)
        return jax.block_until_ready(out)

    def pages(self, x, case: Case, table: np.ndarray):
        """``[B, Hk, S, D]`` -> pages ``[P, page, Hk, D]`` placed as ``table`` says."""
        jnp = self.jnp
        B, Hk, S, D = x.shape
        logical = x.transpose(0, 2, 1, 3).reshape(B * (S // case.page), case.page, Hk, D)
        return jnp.zeros_like(logical).at[jnp.asarray(table.reshape(-1))].set(logical)

    # -- the peer's part ----------------------------------------------------

    def build(self, case: Case, inputs: dict) -> Built:
        raise NotImplementedError

    # -- protocol -----------------------------------------------------------

    def supports(self, case: Case) -> None:
        """Raise (``Unavailable`` / ``NotImplementedError``) before inputs are made."""

    def prepare(self, case: Case) -> Any:
        self.supports(case)
        inputs = self.make_inputs(case)
        built = self.build(case, inputs)
        return {"inputs": inputs, "built": built}

    def release(self, state) -> None:
        state.clear()

    def measure(self, state, case: Case, mode: str, cfg: TimingConfig) -> dict:
        jax, jnp = self.jax, self.jnp
        b: Built = state["built"]
        if mode == "fwd":
            f = jax.jit(b.fn)
            args = b.args
        else:
            out_shape = jax.eval_shape(b.fn, *b.args)
            ct = jax.random.normal(jax.random.key(99), out_shape.shape, out_shape.dtype)

            def grads(*a):
                # The cotangent travels as the last argument (a closed-over array would
                # be embedded in the program as a constant).
                *fa, cot = a

                def loss(*x):
                    return jnp.sum(b.fn(*x).astype(jnp.float32) * cot.astype(jnp.float32))

                return jax.grad(loss, argnums=b.diff_argnums)(*fa)

            f = jax.jit(grads)
            args = (*b.args, ct)
        r = time_jax(f, args, cfg)
        if b.note:
            r["note"] = b.note
        if mode == "fwd" and self.check:
            r.update(self.spot_check(case, state["inputs"], b.to_canonical(f(*args))))
        return r

    def spot_check(self, case: Case, inputs: dict, out) -> dict:
        """Max |out - numpy reference| over a few rows (:func:`benchmarks._cases.check_points`)."""
        jnp = self.jnp
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        if tuple(out.shape) != (case.B, case.H, case.T, case.D):
            return {"check_err": None, "check_ok": False, "check_note": f"output shape {tuple(out.shape)}"}
        err = 0.0
        group = case.H // case.Hk
        for bi, h, rows in check_points(case):
            idx = jnp.asarray(rows)
            qr = np.asarray(q[bi, h][idx].astype(jnp.float32))
            kk = np.asarray(k[bi, h // group].astype(jnp.float32))
            vv = np.asarray(v[bi, h // group].astype(jnp.float32))
            o = np.asarray(out[bi, h][idx].astype(jnp.float32))
            ref = reference_rows(case, h, qr, kk, vv, rows)
            e = float(np.max(np.abs(o - ref))) if np.all(np.isfinite(o)) else float("inf")
            err = max(err, e)
        return {"check_err": err, "check_ok": bool(err <= CHECK_ATOL)}
