"""What every PyTorch peer shares (never imported together with JAX).

Inputs are bf16 N(0, 1) on CUDA, ``q [B,H,T,D]``, ``k``/``v [B,Hk,S,D]``
(the layout of SDPA and FlexAttention). Forward+backward is
``torch.autograd.grad(out, (q, k, v), cotangent)``. Timing by CUDA events
(:func:`benchmarks._timing.time_torch`).
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks._cases import CHECK_ATOL, Case, check_points, reference_rows
from benchmarks._timing import TimingConfig, time_torch
from benchmarks.peers._protocol import Unavailable

__all__ = ["TorchBuilt", "TorchPeer"]


@dataclasses.dataclass
class TorchBuilt:
    """``fn(q, k, v) -> [B, H, T, D]`` and a note for the results."""

    fn: Callable
    note: str | None = None


class TorchPeer:
    def __init__(self, variant: str | None, *, smoke: bool = False, check: bool = True):
        import torch

        if not torch.cuda.is_available():
            raise Unavailable("PyTorch sees no CUDA device")
        self.torch = torch
        self.variant = variant
        self.smoke = smoke
        self.check = check
        self.device = "cuda"
        self.setup()

    def setup(self) -> None:
        pass

    def info(self) -> dict:
        torch = self.torch
        out = {
            "framework": "torch",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "device_kind": torch.cuda.get_device_name(0),
        }
        try:
            import triton

            out["triton"] = triton.__version__
        except Exception:  # noqa: BLE001
            pass
        return out

    def build(self, case: Case, inputs: dict) -> TorchBuilt:
        raise NotImplementedError

    def prepare(self, case: Case) -> Any:
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(1234)
        mk = lambda *s: torch.randn(*s, generator=g, device=self.device, dtype=torch.bfloat16)
        inputs = {
            "q": mk(case.B, case.H, case.T, case.D),
            "k": mk(case.B, case.Hk, case.S, case.D),
            "v": mk(case.B, case.Hk, case.S, case.D),
        }
        built = self.build(case, inputs)
        torch.cuda.synchronize()
        return {"inputs": inputs, "built": built}

    def release(self, state) -> None:
        state.clear()
        self.torch.cuda.empty_cache()

    def measure(self, state, case: Case, mode: str, cfg: TimingConfig) -> dict:
        torch = self.torch
        b: TorchBuilt = state["built"]
        q, k, v = (state["inputs"][n] for n in ("q", "k", "v"))
        if mode == "fwd":

            def call():
                with torch.no_grad():
                    return b.fn(q, k, v)

        else:
            qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
            with torch.no_grad():
                ct = torch.randn_like(b.fn(q, k, v))

            def call():
                out = b.fn(qg, kg, vg)
                return torch.autograd.grad(out, (qg, kg, vg), ct)

        r = time_torch(call, cfg)
        if b.note:
            r["note"] = b.note
        if mode == "fwd" and self.check:
            r.update(self.spot_check(case, state["inputs"], call()))
        return r

    def spot_check(self, case: Case, inputs: dict, out) -> dict:
        if tuple(out.shape) != (case.B, case.H, case.T, case.D):
            return {"check_err": None, "check_ok": False, "check_note": f"output shape {tuple(out.shape)}"}
        np_ = lambda x: x.float().cpu().numpy()
        err = 0.0
        group = case.H // case.Hk
        for bi, h, rows in check_points(case):
            idx = self.torch.as_tensor(rows, device=self.device)
            qr = np_(inputs["q"][bi, h][idx])
            kk = np_(inputs["k"][bi, h // group])
            vv = np_(inputs["v"][bi, h // group])
            o = np_(out[bi, h][idx])
            ref = reference_rows(case, h, qr, kk, vv, rows)
            e = float(np.max(np.abs(o - ref))) if np.all(np.isfinite(o)) else float("inf")
            err = max(err, e)
        return {"check_err": err, "check_ok": bool(err <= CHECK_ATOL)}
