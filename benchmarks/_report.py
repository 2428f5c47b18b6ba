"""Reports: one JSON, one Markdown table and one PNG per suite.

Files: ``<out>/<suite>-<device-slug>-<date>.{json,md,png}``. The JSON keeps
everything (every result with its status and error string, the cases, the
environment); the Markdown has a table of milliseconds and TFLOP/s (TB/s
for decode) per peer with attnax's speedup over each peer (peer time /
attnax time: > 1 means attnax is faster), then the reasons for n/a and the
errors. The PNG (matplotlib, when importable) is a grouped bar chart.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import math
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from benchmarks._cases import Case
from benchmarks.peers import PEERS

__all__ = ["collect_environment", "device_slug", "markdown", "write_suite"]

_DISTS = (
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "jax-cuda13-pjrt",
    "jax-cuda12-pjrt",
    "flax",
    "torch",
    "triton",
    "tokamax",
    "numpy",
)


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def collect_environment() -> dict:
    """Versions (without importing JAX or PyTorch), the GPU, the date, the commit."""
    versions = {"python": platform.python_version()}
    for d in _DISTS:
        try:
            versions[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    env = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host_platform": platform.platform(),
        "versions": versions,
    }
    if shutil.which("nvidia-smi"):
        q = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        if q:
            name, driver, mem = (x.strip() for x in q.splitlines()[0].split(","))
            env["gpu"] = {"name": name, "driver": driver, "memory": mem, "count": len(q.splitlines())}
        head = _run(["nvidia-smi"])
        m = re.search(r"CUDA Version:\s*([\d.]+)", head or "")
        if m:
            env.setdefault("gpu", {})["cuda_driver_api"] = m.group(1)
    root = Path(__file__).resolve().parent.parent
    commit = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    if commit:
        dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
        env["attnax_commit"] = commit + ("+dirty" if dirty else "")
    return env


def device_name(env: dict, infos: dict) -> str:
    if env.get("gpu", {}).get("name"):
        return env["gpu"]["name"]
    for info in infos.values():
        if info.get("device_kind"):
            return info["device_kind"]
    return platform.processor() or "cpu"


def device_slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


# -- Markdown -------------------------------------------------------------------

_SHORT = {
    "ok": None,
    "n/a": "n/a",
    "unavailable": "unavail.",
    "unsupported": "unsup.",
    "error": "error",
    "timeout": "timeout",
    "skipped": "skipped",
}


def _index(results: list[dict]) -> dict:
    return {(r["case"], r["mode"], r["peer"]): r for r in results}


def _cell(r: dict | None, decode: bool) -> str:
    if r is None:
        return "—"
    if r["status"] != "ok":
        return _SHORT.get(r["status"], r["status"])
    rate = _num(r.get("tbps") if decode else r.get("tflops"))
    mark = "" if r.get("check_ok", True) else " ✗"
    return f"{r['ms']:.3f} ({rate}){mark}"


def _num(x) -> str:
    """A rate with three significant digits at most (whole numbers from 100 up)."""
    if x is None or not math.isfinite(x):
        return "?"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(a: dict | None, p: dict | None) -> float | None:
    if not a or not p or a["status"] != "ok" or p["status"] != "ok" or not a.get("ms"):
        return None
    return p["ms"] / a["ms"]


def _columns(results: list[dict], peers: list[str]) -> list[str]:
    """Peers with at least one result other than n/a / unavailable, attnax first."""
    shown = [p for p in peers if any(r["peer"] == p and r["status"] not in ("n/a", "unavailable") for r in results)]
    if "attnax" in peers and "attnax" not in shown:
        shown.insert(0, "attnax")
    return shown


def markdown(suite: str, cases: list[Case], results: list[dict], env: dict, infos: dict, peers: list[str]) -> str:
    decode = suite == "decode"
    unit = "TB/s" if decode else "TFLOP/s"
    idx = _index(results)
    cols = _columns(results, peers)
    others = [p for p in cols if p != "attnax"]
    v = env.get("versions", {})
    vers = ", ".join(f"{k} {v[k]}" for k in ("python", "jax", "jaxlib", "torch", "triton", "tokamax") if k in v)
    gpu = env.get("gpu", {})
    lines = [
        f"## {suite} — {device_name(env, infos)} — {env.get('date', '')}",
        "",
        f"{vers}"
        + (f"; driver {gpu['driver']} (CUDA {gpu.get('cuda_driver_api', '?')})" if gpu.get("driver") else "")
        + (f"; attnax {env['attnax_commit']}" if env.get("attnax_commit") else ""),
        "",
        f"Cells: ms ({unit}), median of timed runs. `×peer`: peer ms / attnax ms (> 1: attnax faster). "
        "✗: output failed the spot check against the numpy reference.",
        "",
    ]
    head = ["case", "mode"] + (["attnax"] if cols and cols[0] == "attnax" else [])
    with_attnax = bool(cols) and cols[0] == "attnax"
    for p in others:
        head += [p, f"×{p}"] if with_attnax else [p]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    ratios: dict[tuple[str, str], list[float]] = {}
    for c in cases:
        for m in c.modes:
            a = idx.get((c.name, m, "attnax"))
            row = [c.name, m]
            if cols and cols[0] == "attnax":
                row.append(_cell(a, decode))
            for p in others:
                r = idx.get((c.name, m, p))
                row.append(_cell(r, decode))
                if not with_attnax:
                    continue
                x = _ratio(a, r)
                row.append("" if x is None else f"{x:.2f}")
                if x is not None:
                    ratios.setdefault((p, m), []).append(x)
            if any((c.name, m, p) in idx for p in cols):
                lines.append("| " + " | ".join(row) + " |")
    for m in sorted({m for _, m in ratios}, key=["fwd", "fwd+bwd"].index):
        row = ["**geomean**", m] + ([""] if cols and cols[0] == "attnax" else [])
        for p in others:
            xs = ratios.get((p, m), [])
            row += ["", f"**{math.exp(sum(map(math.log, xs)) / len(xs)):.2f}**" if xs else ""]
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "Cases:"]
    lines += [f"- `{c.name}`: {c.describe()}" for c in cases]
    unavailable = sorted({r["peer"] for r in results if r["status"] == "unavailable"})
    if unavailable:
        lines += ["", "Not available here: " + ", ".join(f"`{p}`" for p in unavailable)]
        first = {r["peer"]: r.get("error", "") for r in results if r["status"] == "unavailable"}
        lines += [f"- `{p}`: {first[p][:200]}" for p in unavailable]
    na = {}
    for c in cases:
        for p, reason in c.na:
            if p in peers:
                na.setdefault((p, reason), []).append(c.name)
    if na:
        lines += ["", "n/a:"]
        lines += [f"- `{p}` on {', '.join(names)}: {reason}" for (p, reason), names in sorted(na.items())]
    bad = [r for r in results if r["status"] in ("error", "unsupported", "timeout")]
    if bad:
        lines += ["", "Errors:"]
        for r in bad:
            msg = (r.get("error") or "").strip().splitlines()
            lines.append(f"- `{r['peer']}` {r['case']} {r['mode']} ({r['status']}): {(msg[0] if msg else '')[:300]}")
    wrong = [r for r in results if r["status"] == "ok" and r.get("check_ok") is False]
    if wrong:
        lines += ["", "Spot check failed (✗):"]
        lines += [f"- `{r['peer']}` {r['case']}: max err {r.get('check_err')}" for r in wrong]
    return "\n".join(lines) + "\n"


# -- PNG ------------------------------------------------------------------------


def plot(path: Path, suite: str, cases: list[Case], results: list[dict], peers: list[str], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional
        return False
    decode = suite == "decode"
    key = "tbps" if decode else "tflops"
    idx = _index(results)
    rows = [(c.name, m) for c in cases for m in c.modes]
    shown = [p for p in peers if any(idx.get((c, m, p), {}).get("status") == "ok" for c, m in rows)]
    if not rows or not shown:
        return False
    width = 0.8 / len(shown)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    for i, p in enumerate(shown):
        ys = []
        for c, m in rows:
            r = idx.get((c, m, p))
            ok = r is not None and r["status"] == "ok"
            ys.append((r.get(key) or 0.0) if ok else 0.0)
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, ys, width, label=PEERS[p].label if p in PEERS else p)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{c}\n{m}" for c, m in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("TB/s (K+V read)" if decode else "TFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -- files ----------------------------------------------------------------------


def write_suite(
    out_dir: str | os.PathLike,
    suite: str,
    cases: list[Case],
    results: list[dict],
    env: dict,
    infos: dict,
    peers: list[str],
    args: dict,
) -> dict[str, str]:
    """Write the JSON, Markdown and (if matplotlib imports) PNG of one suite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = device_name(env, infos)
    date = (env.get("date") or _dt.date.today().isoformat())[:10]
    stem = out / f"{suite}-{device_slug(dev)}-{date}"
    doc = {
        "suite": suite,
        "device": dev,
        "environment": env,
        "peer_info": infos,
        "args": args,
        "cases": [c.to_dict() for c in cases],
        "results": results,
    }
    paths = {}
    p = stem.with_suffix(".json")
    p.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    paths["json"] = str(p)
    p = stem.with_suffix(".md")
    p.write_text(markdown(suite, cases, results, env, infos, peers))
    paths["md"] = str(p)
    p = stem.with_suffix(".png")
    if plot(p, suite, cases, results, peers, f"{suite} — {dev} — {env.get('date', '')}"):
        paths["png"] = str(p)
    return paths
