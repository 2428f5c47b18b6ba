"""The child side of the parent/child protocol, for any framework.

The parent runs ``python -m benchmarks.peers.<module> --peer NAME --case-json
PATH``. ``PATH`` holds ``{"peer", "variant", "smoke", "check", "deadline",
"timing", "tasks": [{"case": {...}, "modes": [...]}]}``. The child prints one
line per event on stdout, each ``MARK`` followed by a JSON object:

- ``{"type": "info", ...}`` once, after the peer's imports (versions, device);
- ``{"type": "start", "case": key, "mode": m}`` before each measurement
  (the parent's stall timeout counts from here);
- ``{"type": "result", ...}`` after each (see :func:`_result`);
- ``{"type": "restart", ...}`` before exiting after an error that leaves the
  CUDA context unusable: the parent starts a new process for the rest.

Anything else on stdout or stderr goes to the parent's log for this peer. A
peer whose imports fail reports every task ``unavailable``; an exception in
one task is recorded there (``NotImplementedError`` as ``unsupported``) and
the next task runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

from benchmarks._cases import Case
from benchmarks._timing import TimingConfig, count

__all__ = ["MARK", "Unavailable", "emit", "main"]

MARK = "@@BENCH "
_MAX_ERR = 2000


class Unavailable(Exception):
    """This peer (or this part of it) cannot be imported or used here."""


def emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _err(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= _MAX_ERR else s[: _MAX_ERR - 20] + " ...[truncated]"


_FATAL = (
    "illegal memory access",
    "CUDA_ERROR_ILLEGAL",
    "unspecified launch failure",
    "CUDA_ERROR_LAUNCH_FAILED",
    "misaligned address",
    "device-side assert",
    "CUDA_ERROR_ASSERT",
)


def _fatal(e: BaseException) -> bool:
    """Whether ``e`` leaves the CUDA context unusable."""
    msg = str(e)
    return any(p in msg for p in _FATAL)


def _status(e: BaseException) -> str:
    if isinstance(e, Unavailable):
        return "unavailable"
    if isinstance(e, NotImplementedError):
        return "unsupported"
    return "error"


def _result(peer: str, case: Case, mode: str, status: str, **kw) -> dict:
    c = count(case, mode)
    out = {
        "type": "result",
        "peer": peer,
        "suite": case.suite,
        "case": case.name,
        "mode": mode,
        "status": status,
        "flops": c["flops"],
        "bytes": c["bytes"],
    }
    out.update(kw)
    ms = out.get("ms")
    if status == "ok" and ms:
        out["tflops"] = c["flops"] / (ms * 1e-3) / 1e12
        if c["bytes"]:
            out["tbps"] = c["bytes"] / (ms * 1e-3) / 1e12
    return out


def main(make_peer) -> int:
    """Run the tasks of ``--case-json`` with ``make_peer(variant, smoke=..., check=...)``.

    ``make_peer`` does the peer's imports (failures: ``unavailable``) and
    returns an object with ``info() -> dict``, ``prepare(case) -> state``,
    ``measure(state, case, mode, timing_config) -> dict`` and
    ``release(state)``.
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True)
    ap.add_argument("--case-json", required=True)
    args, _ = ap.parse_known_args()
    with open(args.case_json) as f:
        spec = json.load(f)
    peer_name = args.peer
    deadline = spec.get("deadline")
    cfg = TimingConfig(**spec.get("timing", {}))
    tasks = [(Case.from_dict(t["case"]), list(t["modes"])) for t in spec["tasks"]]

    try:
        peer = make_peer(spec.get("variant"), smoke=bool(spec.get("smoke")), check=bool(spec.get("check", True)))
        emit({"type": "info", "peer": peer_name, **peer.info()})
    except BaseException as e:  # noqa: BLE001 - ImportError, CUDA init failures, ...
        traceback.print_exc()
        status = "unavailable"
        for case, modes in tasks:
            for m in modes:
                emit(_result(peer_name, case, m, status, error=_err(e)))
        return 0

    for case, modes in tasks:
        if deadline is not None and time.time() > deadline:
            for m in modes:
                emit(_result(peer_name, case, m, "skipped", error="time budget exhausted"))
            continue
        emit({"type": "start", "case": case.key, "mode": "prepare"})
        try:
            state = peer.prepare(case)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, Unavailable):
                print(f"--- {peer_name} {case.key}: {e}", file=sys.stderr)
            else:
                traceback.print_exc()
            for m in modes:
                emit(_result(peer_name, case, m, _status(e), error=_err(e)))
            continue
        for m in modes:
            if deadline is not None and time.time() > deadline:
                emit(_result(peer_name, case, m, "skipped", error="time budget exhausted"))
                continue
            emit({"type": "start", "case": case.key, "mode": m})
            t0 = time.time()
            try:
                r = peer.measure(state, case, m, cfg)
                emit(_result(peer_name, case, m, "ok", wall_s=time.time() - t0, **r))
            except Exception as e:  # noqa: BLE001
                print(f"--- {peer_name} {case.key} {m}", file=sys.stderr)
                traceback.print_exc()
                emit(_result(peer_name, case, m, _status(e), error=_err(e), wall_s=time.time() - t0))
                if _fatal(e):
                    # The CUDA context is gone: every later call would fail too. Ask the
                    # parent for a fresh process for the remaining tasks.
                    emit({"type": "restart", "reason": _err(e)[:300]})
                    sys.stdout.flush()
                    os._exit(3)
        try:
            peer.release(state)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        del state
        gc.collect()
    return 0
