"""``python -m benchmarks``: run suites against every peer, one subprocess per peer.

Examples::

    python -m benchmarks --suite dense,mods                 # the default cases, every peer
    python -m benchmarks --suite dense --full --peers attnax,cudnn
    python -m benchmarks --suite mods --cases 'window*,docs*' --modes fwd
    python -m benchmarks --suite dense,mods,decode --smoke  # CPU: tiny shapes, plumbing only
    python -m benchmarks --list --suite all --full          # what would run

Each peer runs in one child process for all its cases (JAX and PyTorch never
share a process; a crash costs one peer). The parent streams the child's
results, restarts it after a crash or a stalled measurement
(``--case-timeout``), gives each peer at most ``--peer-timeout`` seconds and
the whole run ``--time-budget`` seconds: what does not fit is recorded as
``skipped``, so a run always ends with complete reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

from benchmarks._cases import SUITES, Case, suite_cases
from benchmarks._report import collect_environment, write_suite
from benchmarks._timing import TimingConfig, count
from benchmarks.peers import PEERS, SMOKE_PEERS
from benchmarks.peers._protocol import MARK

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Compare attnax with its peers (each peer in its own subprocess).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Peers, in run order: " + ", ".join(PEERS),
    )
    ap.add_argument("--suite", default="dense", help="comma list of dense, mods, decode; or 'all' (default: dense)")
    ap.add_argument("--cases", help="comma list of glob patterns on case names, e.g. 'd128-*,window*'")
    ap.add_argument("--peers", help=f"comma list of peers (default: all; with --smoke: {','.join(SMOKE_PEERS)})")
    ap.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd (default: both)")
    ap.add_argument("--full", action="store_true", help="every case of the suites, not only the default ones")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes, few runs, attnax XLA kernels (CPU plumbing test)"
    )
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: benchmarks/results)")
    ap.add_argument("--time-budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--peer-timeout", type=float, default=None, help="seconds per peer (default: 40%% of the budget)")
    ap.add_argument(
        "--case-timeout", type=float, default=240.0, help="seconds without a result before a child is killed"
    )
    ap.add_argument("--runs", type=int, default=None, help="timed runs per measurement (default 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls after compiling (default 3)")
    ap.add_argument("--no-check", action="store_true", help="skip the spot checks against the numpy reference")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the peer processes")
    ap.add_argument("--list", action="store_true", help="print the cases and which peers serve them, then exit")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown tables at the end")
    ap.add_argument(
        "--allow-no-gpu", action="store_true", help="run the full-size suites even where nvidia-smi sees no GPU"
    )
    return ap.parse_args(argv)


# -- selection ------------------------------------------------------------------


def select(args) -> tuple[dict[str, list[Case]], list[str], list[str]]:
    suites = list(SUITES) if args.suite == "all" else _csv(args.suite)
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        raise SystemExit(f"unknown suite(s) {bad}; expected a comma list of {', '.join(SUITES)} or 'all'")
    pats = _csv(args.cases)
    cases = {}
    for s in suites:
        cs = suite_cases(s, smoke=args.smoke, full=bool(args.full or pats))
        if pats:
            cs = [c for c in cs if any(fnmatch.fnmatch(c.name, p) or fnmatch.fnmatch(c.key, p) for p in pats)]
        elif not (args.full or args.smoke):
            cs = [c for c in cs if c.default]
        if cs:
            cases[s] = cs
    if not cases:
        raise SystemExit(f"--cases {args.cases!r} matches no case of {suites}; try --list --full")
    peers = _csv(args.peers) or list(SMOKE_PEERS if args.smoke else PEERS)
    bad = [p for p in peers if p not in PEERS]
    if bad:
        raise SystemExit(f"unknown peer(s) {bad}; expected some of {', '.join(PEERS)}")
    peers = [p for p in PEERS if p in peers]
    modes = _csv(args.modes)
    if not modes or any(m not in ("fwd", "fwd+bwd") for m in modes):
        raise SystemExit(f"--modes must be a comma list of fwd, fwd+bwd; got {args.modes!r}")
    return cases, peers, modes


# -- running one peer -----------------------------------------------------------


class Runner:
    def __init__(self, args, peers, progress=None, console=None):
        self.args = args
        self.peers = peers
        self.progress = progress
        self.console = console
        self.task_id = None
        self.results: list[dict] = []
        self.proc = None
        self.infos: dict[str, dict] = {}
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = self.t0 + args.time_budget
        self.timing = TimingConfig.smoke() if args.smoke else TimingConfig()
        over = {k: v for k, v in (("runs", args.runs), ("warmup", args.warmup)) if v is not None}
        self.timing = dataclasses.replace(self.timing, **over)

    # results --------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, highlight=False, soft_wrap=True)
        else:
            print(msg, flush=True)

    def record(self, r: dict, advance: bool = True) -> None:
        r = {k: v for k, v in r.items() if k != "type"}
        self.results.append(r)
        if not advance:
            return
        if self.progress is not None:
            self.progress.advance(self.task_id)
        st = r["status"]
        head = f"{r['peer']:<17} {r['suite']}/{r['case']:<22} {r['mode']:<8}"
        if st == "ok":
            rate = f"{r['tbps']:.3g} TB/s" if r.get("tbps") else f"{r.get('tflops', 0):.3g} TFLOP/s"
            chk = ""
            if r.get("check_err") is not None:
                chk = f"  check {r['check_err']:.1e}" + ("" if r.get("check_ok") else " FAILED")
            self._say(f"{head} {r['ms']:9.3f} ms  {rate}{chk}  (compile {r.get('compile_s', 0):.1f}s)")
        else:
            err = (r.get("error") or "").strip().splitlines()
            self._say(f"{head} {st}: {(err[0] if err else '')[:160]}")

    def _blank(self, peer: str, case: Case, mode: str, status: str, error: str) -> dict:
        c = count(case, mode)
        return {
            "peer": peer,
            "suite": case.suite,
            "case": case.name,
            "mode": mode,
            "status": status,
            "error": error,
            "flops": c["flops"],
            "bytes": c["bytes"],
        }

    # one peer -------------------------------------------------------------

    def run_peer(self, peer: str, items: list[tuple[Case, str]]) -> None:
        spec = PEERS[peer]
        pending: OrderedDict[tuple[str, str], tuple[Case, str]] = OrderedDict(((c.key, m), (c, m)) for c, m in items)
        cap = self.args.peer_timeout or max(60.0, 0.4 * self.args.time_budget)
        peer_deadline = min(self.deadline, time.time() + cap)
        grace = min(self.args.case_timeout, 30.0)
        log_path = self.logs / f"{peer}.log"
        attempts = 0
        while pending:
            if time.time() >= peer_deadline:
                for c, m in list(pending.values()):
                    self.record(self._blank(peer, c, m, "skipped", "time budget exhausted"))
                return
            attempts += 1
            if attempts > 6:
                for c, m in list(pending.values()):
                    self.record(self._blank(peer, c, m, "error", "peer process restarted too often"))
                return
            tasks: OrderedDict[str, dict] = OrderedDict()
            for c, m in pending.values():
                tasks.setdefault(c.key, {"case": c.to_dict(), "modes": []})["modes"].append(m)
            job = {
                "peer": peer,
                "variant": spec.variant,
                "smoke": self.args.smoke,
                "check": not self.args.no_check,
                "deadline": peer_deadline,
                "timing": dataclasses.asdict(self.timing),
                "tasks": list(tasks.values()),
            }
            job_path = self.logs / f"{peer}-job{attempts}.json"
            job_path.write_text(json.dumps(job))
            outcome = self._spawn(peer, spec.module, job_path, log_path, pending, peer_deadline + grace)
            if outcome == "done":
                break
        for c, m in list(pending.values()):  # a child that ended without reporting these
            self.record(self._blank(peer, c, m, "error", f"no result from the peer process; see logs/{peer}.log"))

    def _spawn(self, peer, module, job_path, log_path, pending, hard_deadline) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [self.args.python, "-m", f"benchmarks.peers.{module}", "--peer", peer, "--case-json", str(job_path)]
        with open(log_path, "a") as logf:
            logf.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
            logf.flush()
            self.proc = proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=logf, cwd=str(ROOT), env=env, text=True, bufsize=1,
                start_new_session=True,
            )  # fmt: skip
            lines: queue.Queue = queue.Queue()

            def pump():
                for line in proc.stdout:
                    lines.put(line)
                lines.put(None)

            threading.Thread(target=pump, daemon=True).start()
            current, last, killed, restart = None, time.time(), None, False
            while True:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                now = time.time()
                if line.startswith(MARK):
                    try:
                        ev = json.loads(line[len(MARK) :])
                    except json.JSONDecodeError:
                        logf.write("[bad protocol line] " + line)
                        continue
                    if ev.get("type") == "info":
                        self.infos[peer] = {k: v for k, v in ev.items() if k != "type"}
                    elif ev.get("type") == "start":
                        current, last = (ev["case"], ev["mode"]), now
                        if self.progress is not None:
                            self.progress.update(self.task_id, description=f"{peer} {ev['case']} {ev['mode']}")
                    elif ev.get("type") == "restart":
                        restart = True
                        logf.write(f"[restart requested] {ev.get('reason', '')}\n")
                    elif ev.get("type") == "result":
                        key = (f"{ev['suite']}/{ev['case']}", ev["mode"])
                        if pending.pop(key, None) is not None:
                            self.record(ev)
                        current, last = None, now
                elif line:
                    logf.write("[stdout] " + line)
                if current is not None and now - last > self.args.case_timeout:
                    killed = "timeout"
                elif now > hard_deadline:
                    killed = "budget"
                if killed:
                    self._kill(proc)
                    break
            rc = proc.wait()
            self.proc = None
            logf.write(f"=== exit {rc}{' (killed: ' + killed + ')' if killed else ''}\n")
        if not pending:
            return "done"
        if restart and not killed:
            return "retry"
        if killed or rc != 0:
            why = {
                "timeout": f"no result within {self.args.case_timeout:.0f} s (--case-timeout); process killed",
                "budget": "time budget exhausted during this measurement; process killed",
            }.get(killed, f"peer process died (exit {rc}); see logs/{peer}.log: {self._tail(log_path)}")
            status = "timeout" if killed else "error"
            if current is None:
                if killed:
                    return "retry"
                for c, m in list(pending.values()):
                    pending.pop((c.key, m))
                    self.record(self._blank(peer, c, m, status, why))
                return "done"
            case_key, mode = current
            doomed = [k for k in pending if k[0] == case_key and (mode == "prepare" or k[1] == mode)]
            for k in doomed:
                c, m = pending.pop(k)
                self.record(self._blank(peer, c, m, status, why))
            return "retry"
        return "done"

    @staticmethod
    def _kill(proc) -> None:
        # The child's own group only (inductor / Triton compile workers included).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()

    @staticmethod
    def _tail(path: Path, n: int = 3) -> str:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        last_run = text.rsplit("\n=== ", 2)[-2] if text.count("\n=== ") >= 2 else text  # before "=== exit"
        lines = [x for x in last_run.splitlines()[1:] if x.strip() and not x.startswith("===")]
        return " | ".join(lines[-n:])[-400:]


# -- main -----------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    cases, peers, modes = select(args)

    if args.list:
        for s, cs in cases.items():
            print(f"{s}:")
            for c in cs:
                serve = [p for p in c.peers if p in peers]
                ms = "/".join(m for m in c.modes if m in modes)
                print(f"  {c.name:<24} {c.describe():<52} {ms:<12} {', '.join(serve)}")
        return 0

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    env = collect_environment()
    if not (args.smoke or args.allow_no_gpu or env.get("gpu", {}).get("name")):
        console.print(
            "nvidia-smi sees no GPU: the full-size suites would run for hours on a CPU. "
            "Use --smoke (tiny shapes) or --allow-no-gpu.",
            highlight=False,
        )
        return 2
    work: OrderedDict[str, list[tuple[Case, str]]] = OrderedDict((p, []) for p in peers)
    na_results = []
    for cs in cases.values():
        for c in cs:
            reasons = dict(c.na)
            for m in (m for m in c.modes if m in modes):
                for p in peers:
                    if p in c.peers:
                        work[p].append((c, m))
                    else:
                        na_results.append((p, c, m, reasons.get(p, "not served")))
    total = sum(len(v) for v in work.values())
    console.print(
        f"[bold]attnax benchmarks[/bold]: suites {', '.join(cases)}; {total} measurements over "
        f"{sum(1 for v in work.values() if v)} peers; budget {args.time_budget:.0f} s; "
        f"{env.get('gpu', {}).get('name', 'no NVIDIA GPU seen')}",
        highlight=False,
        soft_wrap=True,
    )
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    )  # fmt: skip
    runner = Runner(args, peers, progress, console)
    for p, c, m, why in na_results:
        runner.record(runner._blank(p, c, m, "n/a", why), advance=False)

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    with progress:
        runner.task_id = progress.add_task("starting", total=total)
        try:
            for p, items in work.items():
                if items:
                    runner.run_peer(p, items)
            progress.update(runner.task_id, description=f"done in {time.time() - runner.t0:.0f} s")
        except KeyboardInterrupt:
            # Still write the reports: what ran is kept, the rest is "skipped".
            if runner.proc is not None:
                runner._kill(runner.proc)
            done = {(r["peer"], r["suite"], r["case"], r["mode"]) for r in runner.results}
            for p, items in work.items():
                for c, m in items:
                    if (p, c.suite, c.name, m) not in done:
                        runner.record(runner._blank(p, c, m, "skipped", "run interrupted"), advance=False)
            console.print("[bold red]interrupted[/bold red]: writing the reports of what ran")

    written = {}
    run_args = {k: v for k, v in vars(args).items() if k != "python"}
    run_args["timing"] = dataclasses.asdict(runner.timing)
    run_args["elapsed_s"] = round(time.time() - runner.t0, 1)
    for s, cs in cases.items():
        res = [r for r in runner.results if r["suite"] == s]
        written[s] = write_suite(args.out, s, cs, res, env, runner.infos, peers, run_args)
    for s, paths in written.items():
        console.print(f"{s}: " + ", ".join(paths.values()), highlight=False, soft_wrap=True)
    if not args.quiet:
        for paths in written.values():
            print()
            print(Path(paths["md"]).read_text(), flush=True)
    return 0
