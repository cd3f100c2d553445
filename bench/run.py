#!/usr/bin/env python3
"""runplane benchmark: runplane vs Celery, Dramatiq, taskiq(+NATS JetStream), procrastinate.

    python bench/run.py                    # full run (make bench)
    python bench/run.py --quick            # ~1 minute smoke run
    python bench/run.py --only celery,runplane-pg --workloads W1,W2 --reps 5

Runs each system one after another on this machine, each with its own broker(s) on free
loopback ports, the same workloads, one client process, and verifies every task's
completion by count. Writes bench/results/latest.json and latest.png. Orchestrator is
stdlib-only; peers run in bench/.venv-peers (created here if missing), runplane in the
product venv (.venv). See bench/README.md for method and caveats.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import procs, report  # noqa: E402
from bench.brokers import BrokerError, Postgres, RedisServer  # noqa: E402
from bench.procs import log  # noqa: E402
from bench.systems.base import Ctx, Profile, System  # noqa: E402

BENCH = REPO / "bench"
PEERS_VENV = Path(os.environ.get("BENCH_PEERS_VENV") or BENCH / ".venv-peers")
PEERS_REQ = BENCH / "requirements-peers.txt"
RESULTS = BENCH / "results"
WORKLOADS = ("W1", "W1C", "W2", "W3", "W4", "W5", "W6")
W5_MODES = ("run", "tag", "sse-tag", "stream")
W5_DEFAULT = "run:1000/10000,tag:1000,tag@1:1000,sse-tag@1:1000,stream:100"
W5_TAG_RATE = 0.0


def w5_cases(spec: str, default_subs: list[int]) -> list[tuple[str, int]]:
    """``run:1000/10000,tag@1`` -> [("run", 1000), ("run", 10000), ("tag@1", <default>)...];
    a tag mode's ``@R`` triggers its runs at R a second."""
    cases: list[tuple[str, int]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        mode, _, counts = part.partition(":")
        kind, _, rate = mode.partition("@")
        if kind not in W5_MODES or (rate and kind not in ("tag", "sse-tag")):
            raise ValueError(f"{mode!r} is not one of {', '.join(W5_MODES)} (tag@R, sse-tag@R)")
        try:
            float(rate or 0)
        except ValueError:
            raise ValueError(f"{mode!r}: the rate after @ is runs a second") from None
        try:
            subs = [int(x) for x in counts.split("/") if x] if counts else default_subs
        except ValueError:
            raise ValueError(f"{part!r}: counts look like run:1000/10000") from None
        cases += [(mode, n) for n in subs]
    if not cases:
        raise ValueError("no case")
    return cases


def system_classes() -> dict[str, type[System]]:
    from bench.systems.celery_sys import Celery
    from bench.systems.dramatiq_sys import Dramatiq
    from bench.systems.procrastinate_sys import Procrastinate
    from bench.systems.runplane_sys import RunplanePG, RunplanePG2, RunplanePG3, RunplaneSQLite
    from bench.systems.taskiq_sys import Taskiq

    return {
        "celery": Celery,
        "dramatiq": Dramatiq,
        "taskiq": Taskiq,
        "procrastinate": Procrastinate,
        "runplane-pg": RunplanePG,
        "runplane-sqlite": RunplaneSQLite,
        "runplane-pg-2rep": RunplanePG2,
        "runplane-pg-3rep": RunplanePG3,
    }


# ---------------------------------------------------------------------------------------------
def ensure_peers_venv() -> str:
    py = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".requirements.sha256"
    want = hashlib.sha256(PEERS_REQ.read_bytes()).hexdigest()
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return str(py)
    t = time.monotonic()
    if not py.exists():
        log(f"creating peers venv {PEERS_VENV} ...")
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(PEERS_VENV)], check=True)
    log(f"installing {PEERS_REQ.relative_to(REPO)} into the peers venv ...")
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(PEERS_REQ),
        ],
        check=True,
    )
    stamp.write_text(want)
    log(f"peers venv ready ({time.monotonic() - t:.0f} s)")
    return str(py)


def ensure_system_packages(systems: list[str]) -> None:
    """redis-server (recorder, Celery, Dramatiq) and nats-server (taskiq, runplane) from apt."""
    from bench.brokers import which

    need = {"redis-server": which("redis-server")}
    if any(s.startswith(("taskiq", "runplane")) for s in systems):
        need["nats-server"] = which("/usr/sbin/nats-server", "nats-server")
    missing = [pkg for pkg, path in need.items() if not path]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        log(f"missing {', '.join(missing)}: install them (apt-get install -y {' '.join(missing)})")
        return
    log(f"installing {', '.join(missing)} with apt-get ...")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if procs.run(cmd, env=env, timeout=600).returncode != 0:
        procs.run(["apt-get", "update"], env=env, timeout=600)
        r = procs.run(cmd, env=env, timeout=600)
        if r.returncode != 0:
            log(f"apt-get install failed: {r.stderr.strip()[-300:]}")


def fsync_bound(workdir: Path) -> float | None:
    """The durable bound of one-at-a-time commits on this disk: fdatasync of one 8 kB write per
    second, as `pg_test_fsync` measures it (on PostgreSQL's data disk when it is local)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_test_fsync"))
    if not found:
        log("pg_test_fsync not found: no durable bound in the W1 table")
        return None
    where = Path("/var/lib/postgresql")
    target = (where if where.is_dir() else workdir) / f"runplane-bench-fsync-{os.getpid()}"
    try:
        r = procs.run([str(found[-1]), "-s", "1", "-f", str(target)], timeout=120)
    finally:
        target.unlink(missing_ok=True)
    for line in r.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["fdatasync"] and len(parts) > 1:
            bound = float(parts[1])
            log(f"pg_test_fsync: fdatasync {bound:,.0f}/s (the durable bound of W1 on PostgreSQL)")
            return bound
    log(f"pg_test_fsync printed no fdatasync figure: {r.stdout[-300:]} {r.stderr[-300:]}")
    return None


# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, a: argparse.Namespace, ctx: Ctx) -> None:
        self.a, self.ctx = a, ctx

    def client(
        self,
        system: System,
        workload: str,
        n: int,
        *,
        rate: float = 0,
        batch: int = 0,
        concurrency: int = 1,
        deadline: float,
        verify_max: int = 0,
        kind: str = "",
        special: tuple[str, ...] = (),
    ) -> dict:
        key = f"bench:{system.name}:{workload}:{time.time_ns()}"
        argv = [
            system.python,
            "-m",
            "bench.client",
            "--workload",
            workload,
            "--n",
            str(n),
            "--rate",
            str(rate),
            "--batch",
            str(batch),
            "--concurrency",
            str(concurrency),
            "--key",
            key,
            "--deadline",
            str(deadline),
            "--stall",
            str(self.a.stall),
            "--verify-max",
            str(verify_max),
            *(["--kind", kind] if kind else []),
            *special,
        ]
        r = procs.run(
            argv,
            env=system.env(),
            cwd=REPO,
            timeout=deadline + 90,
            progress=(lambda line: log(f"      {line}")) if workload in ("W4", "W5") else None,
        )
        if r.stderr.strip():
            with (system.logdir / "client.log").open("a") as f:
                f.write(f"--- {workload} n={n} rc={r.returncode}\n{r.stderr}\n")
        lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
        if lines:
            try:
                return json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
        return {
            "ok": False,
            "workload": workload,
            "n": n,
            "error": f"client rc {r.returncode}: {(r.stderr or r.stdout).strip()[-600:]}",
        }

    def warmup(self, system: System, profile: Profile) -> dict:
        n = max(20, 4 * profile.procs)
        time.sleep(0.2)
        return self.client(system, "warm", n, deadline=self.a.ready_timeout)

    def deadline_for(self, wl: str, n: int) -> float:
        if wl in ("W1", "W1C"):
            return self.a.w1_timeout
        if wl == "W2":
            return n / self.a.rate2 + 60
        if wl == "W4":  # n runs start, wait, resume and finish: generous, a stall fails sooner
            return n / 25 + 120
        if wl == "W5":
            return n / 10 + 120
        return n / self.a.slots3 * 1.0 + 90

    def run_system(self, cls: type[System], results: dict) -> None:
        a = self.a
        system = cls(self.ctx)
        rows = results["rows"]
        names = [system.name, *system.extra_rows]
        for nm in names:
            rows[nm] = {"system": system.name, "workloads": {}, "setup": {}}
        todo = [w for w in a.workloads if w in system.workloads]
        if "all" not in a.w45_on and system.name not in a.w45_on:
            todo = [w for w in todo if w not in ("W4", "W5")]
        # jobs: (row, result key, workload, extra); the key is the workload except for W5's cases
        plan: list[tuple[Profile, list[tuple[str, str, str, dict]]]] = []
        std = Profile("std", a.procs, a.slots)
        wide = Profile("wide", a.procs, a.slots3 // a.procs)
        std_jobs = [(system.name, w, w, {}) for w in todo if w in ("W1", "W1C", "W2")]
        # W6: one batch of n6 items through the batch API; reported as time to accepted.
        std_jobs += [(system.name, "W6", "W6", {"batch": a.n6}) for w in todo if w == "W6"]
        extra = [(nm, wl, wl, x) for nm, (wl, x) in system.extra_rows.items() if wl in todo]
        std_jobs += [j for j in extra if j[2] != "W3"]
        # W4 / W5 (runplane only): waiting runs, realtime subscribers
        w4_job = [(system.name, "W4", "W4", {}) for w in todo if w == "W4"]
        if a.w4_profile == "std":
            std_jobs += w4_job
        std_jobs += [
            (system.name, f"W5/{mode}/{subs}", "W5", {"subs": subs, "mode": mode})
            for w in todo
            if w == "W5"
            for mode, subs in a.w5_cases
        ]
        if std_jobs:
            plan.append((std, std_jobs))
        wide_jobs = [(system.name, "W3", "W3", {})] if "W3" in todo else []
        wide_jobs += [j for j in extra if j[2] == "W3"]
        if a.w4_profile == "wide":
            wide_jobs += w4_job
        if wide_jobs:
            plan.append((wide, wide_jobs))

        def fail_all(jobs, msg: str) -> None:
            for nm, key, _, _ in jobs:
                rows[nm]["workloads"][key] = {"ok": False, "reps": 0, "ok_reps": 0, "error": msg}

        for note in system.notes:
            log(f"   {note}")
            results["meta"].setdefault("notes", []).append(note)
        t_sys = time.monotonic()
        for nm in names:
            rows[nm]["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
        log(f"== {system.name}: starting broker(s)")
        try:
            try:
                system.start_infra()
            except Exception as e:
                log(f"   {system.name}: setup FAILED: {e}")
                for _, jobs in plan:
                    fail_all(jobs, f"setup failed: {e}"[:400])
                return
            results["meta"]["versions"][system.name] = system.versions()
            for profile, jobs in plan:
                desc = system.describe(profile)
                for nm in {j[0] for j in jobs}:
                    rows[nm]["setup"][profile.name] = desc
                log(f"   {system.name}: starting workers [{profile.name}: {desc}]")
                system.start_workers(profile)
                system.wait_ready(a.ready_timeout / 2)
                w = self.warmup(system, profile)
                if not w.get("ok"):
                    msg = f"workers not ready: {w.get('error', '')}"
                    if w.get("missing_runs"):
                        msg += f"; system says of the missing runs: {w['missing_runs']}"
                    log(f"   {system.name}: {msg}\n{system.log_tails()}")
                    fail_all(jobs, msg[:400])
                    system.stop_workers()
                    continue
                log(f"   {system.name}: workers ready (warm-up {w['n']} tasks ok)")
                for nm, key, wl, extra in jobs:
                    n = {
                        "W1": a.n1,
                        "W1C": a.n1,
                        "W2": a.n2,
                        "W3": a.n3,
                        "W4": a.n4,
                        "W6": a.n6,
                    }.get(wl, 0)
                    special: tuple[str, ...] = ()
                    if wl in ("W1", "W1C", "W4") and system.pids():
                        # W1, W1C: CPU per run of these processes; W4: their memory
                        special = ("--pids", json.dumps(system.pids()))
                    if wl == "W5":
                        n = extra["subs"]
                        kind, _, rate = extra["mode"].partition("@")
                        try:
                            system.start_realtime()  # type: ignore[attr-defined]
                            special = (
                                *("--mode", kind, "--tag-runs", str(a.w5_tag_runs)),
                                *("--tag-rate", rate or str(a.w5_tag_rate)),
                                *("--chunk-rate", str(a.w5_chunk_rate)),
                                *("--stream-s", str(a.w5_stream_s)),
                                *("--pids", json.dumps(system.pids())),  # type: ignore[attr-defined]
                            )
                        except Exception as e:
                            msg = f"realtime service failed: {e}"
                            log(f"   {nm} {key}: {msg}")
                            rows[nm]["workloads"][key] = {
                                "ok": False,
                                "reps": 0,
                                "ok_reps": 0,
                                "error": msg[:400],
                            }
                            continue
                    reps: list[dict] = []
                    t_wl, last = time.monotonic(), 0.0
                    box_key = f"{wl}+WAIT" if nm.endswith("+wait") else wl
                    box = math.inf if a.exact_reps else a.box.get(box_key, math.inf)
                    for rep in range(a.reps):
                        spent = time.monotonic() - t_wl
                        if rep > 0 and spent + last > box:
                            log(f"   {nm} {key}: time box {box:.0f} s reached after {rep} rep(s)")
                            break
                        t_rep = time.monotonic()
                        if not system.workers_alive():
                            r = {
                                "ok": False,
                                "n": n,
                                "completed": 0,
                                "error": "a worker process died",
                            }
                        else:
                            r = self.client(
                                system,
                                wl,
                                n,
                                rate=a.rate2 if wl == "W2" else 0,
                                batch=extra.get("batch", 0),
                                concurrency=self.concurrency(wl),
                                deadline=self.deadline_for(wl, n),
                                verify_max=a.verify_max,
                                kind=extra.get("kind", ""),
                                special=special,
                            )
                        reps.append(r)
                        last = time.monotonic() - t_rep
                        log(f"   {nm} {key} rep {rep + 1}/{a.reps}: {self.line(wl, r)}")
                        if not r.get("ok"):
                            tails = system.log_tails()
                            if tails:
                                log(f"   worker logs:\n{tails}")
                            break  # a failed workload is a failure; don't burn time on more reps
                        time.sleep(a.pause)
                    ideal = n / a.slots3 if wl == "W3" else None
                    rows[nm]["workloads"][key] = s = report.summarize(wl, reps, ideal)
                    s["raw"] = reps
                    results_save(results)
                system.stop_workers()
                if hasattr(system, "stop_realtime"):
                    system.stop_realtime()  # W5's realtime service: not left running for W3
        finally:
            system.stop_workers()
            try:
                system.stop_infra()
            except Exception as e:
                log(f"   {system.name}: teardown warning: {e}")
            log(f"== {system.name}: done in {time.monotonic() - t_sys:.0f} s")

    def concurrency(self, wl: str) -> int:
        """Enqueue calls in flight: W1 one at a time, W1C as an async web app triggers."""
        if wl == "W1":
            return 1
        return self.a.w1c_concurrency if wl == "W1C" else self.a.enqueue_concurrency

    @staticmethod
    def line(wl: str, r: dict) -> str:
        if not r.get("ok"):
            extra = f"; missing runs: {r['missing_runs']}" if r.get("missing_runs") else ""
            done = f"{r.get('completed', '?')}/{r.get('n', '?')} completed"
            return f"FAIL ({done}) {r.get('error', '')}{extra}"[:500]
        done_of = r.get("runs", r["n"])
        chk = f"{r['completed']}/{done_of} ok" + (f", {r['dups']} dup" if r.get("dups") else "")
        if "verify" in r:
            chk += f", {r['verify'].get('checked')} runs COMPLETED"
        if wl in ("W1", "W1C"):
            cpu = "".join(
                f", {proc} CPU {ms:.2f} ms/run" for proc, ms in r.get("cpu_ms_per_run", {}).items()
            )
            return (
                f"enqueue {r['enqueue_rate']:,.0f}/s, end-to-end {r['e2e_rate']:,.0f}/s "
                f"({r['e2e_s']:.1f} s){cpu} [{chk}]"
            )
        if wl == "W4":
            mem = "; ".join(
                f"{proc} RSS MB "
                + " -> ".join(f"{k} {v}" for k, v in r.get(f"{proc}_rss_mb", {}).items())
                + f" = {r.get(f'{proc}_kb_per_waiting_run', math.nan):.1f} KB/waiting run"
                for proc in ("executor", "scheduler")
            )
            return (
                f"all {r['n']:,} waiting after {r['all_waiting_s']:.1f} s, resumed+completed in "
                f"{r['resume_s']:.1f} s; {mem} [{chk}]"
            )
        if wl == "W5":
            lat = r["lat_ms"]
            return (
                f"{r['mode']} x{r['n']}: {r['events']:,} events, p50 {lat['50']:.1f} ms, "
                f"p99 {lat['99']:.1f} ms, max {lat['100']:.0f} ms; {r['saw_final']}/{r['n']} "
                f"subscribers saw every run COMPLETED (connect {r.get('connect_s', 0):.1f} s, "
                f"wave {r['wave_s']:.1f} s; CPU s in the wave: "
                + ", ".join(f"{k} {v:.1f}" for k, v in r.get("cpu_s", {}).items())
                + f") [{chk}]"
            )
        if wl == "W2":
            lat = r["lat_ms"]
            return (
                f"p50 {lat['50']:.1f} ms, p95 {lat['95']:.1f} ms, p99 {lat['99']:.1f} ms, "
                f"max {lat['100']:.0f} ms, offered {r['offered_rate']:.0f}/s [{chk}]"
            )
        return f"makespan {r['e2e_s']:.2f} s (enqueue {r['enqueue_s']:.1f} s) [{chk}]"


_RESULTS_PATH: Path = RESULTS / "latest.json"


def results_save(results: dict) -> None:
    _RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    tmp = _RESULTS_PATH.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(_RESULTS_PATH)


# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run (~1 min): small counts, 1 rep")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated systems (default: all): " + ",".join(system_classes()),
    )
    ap.add_argument("--skip", default="", help="comma-separated systems to leave out")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="exact repetitions per workload (default: up to 3 within --box; quick: 1)",
    )
    ap.add_argument(
        "--box",
        default="W1=45,W1C=45,W2=26,W3=28,W4=1,W5=1,W3+wait=1",
        help="without --reps: start another rep only while time spent on that "
        "system+workload plus the last rep's duration fits this many seconds",
    )
    ap.add_argument("--n1", type=int, default=None, help="W1 task count (default 10000; quick 500)")
    ap.add_argument("--n2", type=int, default=None, help="W2 task count (default 1000; quick 100)")
    ap.add_argument("--rate2", type=float, default=100.0, help="W2 enqueue rate per second")
    ap.add_argument(
        "--w1c-concurrency",
        type=int,
        default=64,
        help="W1C: the W1 tasks enqueued with this many calls in flight (sync clients: threads)",
    )
    ap.add_argument("--n3", type=int, default=None, help="W3 task count (default 1000; quick 100)")
    ap.add_argument("--slots3", type=int, default=100, help="W3 total slots (split over --procs)")
    ap.add_argument(
        "--n4", type=int, default=None, help="W4 waiting runs (default 10000; quick 500)"
    )
    ap.add_argument(
        "--w45-on",
        default=None,
        help="runplane systems that run W4 and W5 (comma-separated, or 'all'; quick: all); one "
        "by default (runplane-sqlite) to "
        "keep `make bench` short: what they measure (executor memory, realtime delivery) does "
        "not depend on the database, and SQLite fills 10,000 waiting runs fastest",
    )
    ap.add_argument(
        "--w4-profile",
        default="std",
        choices=["std", "wide"],
        help="W4's executor: std (--slots per process) or wide (--slots3 in total, as W3)",
    )
    ap.add_argument(
        "--subs5",
        default=None,
        help="W5 subscriber counts for the modes --w5-modes gives none (default 1000; quick 50)",
    )
    ap.add_argument(
        "--w5-modes",
        default=None,
        help="W5 cases, comma-separated, each MODE or MODE:N/N/...: run = one gRPC subscriber "
        "per run (subscribe_to_run); tag = all on one tag (gRPC); sse-tag = all on one tag over "
        "HTTP SSE; stream = N readers of one run stream (default "
        f"{W5_DEFAULT}; quick: each mode with 50)",
    )
    ap.add_argument(
        "--w5-tag-runs", type=int, default=10, help="W5 tag modes: runs every subscriber follows"
    )
    ap.add_argument(
        "--w5-tag-rate",
        type=float,
        default=W5_TAG_RATE,
        help="W5 tag modes: runs triggered per second (0 = one after another, as fast as "
        "triggers return)",
    )
    ap.add_argument(
        "--w5-chunk-rate", type=float, default=1000.0, help="W5 stream: chunks written per second"
    )
    ap.add_argument("--w5-stream-s", type=float, default=5.0, help="W5 stream: seconds of writing")
    ap.add_argument("--procs", type=int, default=2, help="worker processes per system")
    ap.add_argument(
        "--slots", type=int, default=8, help="W1/W2 concurrent tasks per worker process"
    )
    ap.add_argument(
        "--enqueue-concurrency",
        type=int,
        default=64,
        help="W2/W3: enqueue calls the client may have in flight (W1 is always 1 at a time)",
    )
    ap.add_argument(
        "--celery-pool",
        default="prefork",
        choices=["prefork", "threads", "solo"],
        help="Celery pool for W1/W2 (prefork: 1 worker -c PROCS; else PROCS workers)",
    )
    ap.add_argument(
        "--runplane-batch",
        type=int,
        default=500,
        help="W1 batch-trigger row size for runplane (0 = no batch row)",
    )
    ap.add_argument(
        "--verify-max",
        type=int,
        default=1000,
        help="runplane: check this many run statuses per rep (system-side check)",
    )
    ap.add_argument("--w1-timeout", type=float, default=240.0, help="W1 per-rep deadline, s")
    ap.add_argument(
        "--stall", type=float, default=30.0, help="fail a rep after this long without progress, s"
    )
    ap.add_argument(
        "--ready-timeout", type=float, default=90.0, help="workers must finish a warm-up in this, s"
    )
    ap.add_argument("--pause", type=float, default=1.0, help="pause between reps, s")
    ap.add_argument("--product-python", default=str(REPO / ".venv" / "bin" / "python"))
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    ap.add_argument("--no-chart", action="store_true")
    a = ap.parse_args(argv)
    q = a.quick
    a.exact_reps = a.reps is not None
    a.reps = a.reps or (1 if q else 3)
    try:
        a.box = {
            k.strip().upper(): float(v) for k, v in (p.split("=") for p in a.box.split(",") if p)
        }
    except ValueError:
        ap.error("--box looks like W1=45,W2=26,W3=28")
    # one rep of W4, W5 and the W3 +wait rows unless --reps or --box says otherwise
    a.box = {"W4": 1.0, "W5": 1.0, "W3+WAIT": 1.0, **a.box}
    a.n1 = a.n1 or (500 if q else 10_000)
    a.n2 = a.n2 or (100 if q else 1000)
    a.n3 = a.n3 or (100 if q else 1000)
    a.n4 = a.n4 or (500 if q else 10_000)
    a.n6 = 1000
    try:
        a.subs5 = [int(x) for x in (a.subs5 or ("50" if q else "1000")).split(",") if x]
    except ValueError:
        ap.error("--subs5 looks like 200,1000")
    modes = a.w5_modes or (",".join(W5_MODES) if q else W5_DEFAULT)
    try:
        a.w5_cases = w5_cases(modes, a.subs5)
    except ValueError as e:
        ap.error(f"--w5-modes: {e}")
    a.w5_modes = list(dict.fromkeys(mode for mode, _ in a.w5_cases))
    a.w45_on = [x.strip() for x in (a.w45_on or ("all" if q else "runplane-sqlite")).split(",")]
    if q:
        a.pause = min(a.pause, 0.3)
        a.verify_max = min(a.verify_max, 200)
    classes = system_classes()
    if set(a.w45_on) - {"all", *(s for s in classes if s.startswith("runplane"))}:
        ap.error("--w45-on: runplane systems (runplane-pg, runplane-sqlite) or 'all'")
    only = [s.strip() for s in a.only.split(",") if s.strip()] or list(classes)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = [s for s in [*only, *skip] if s not in classes]
    if bad:
        ap.error(f"unknown system(s) {bad}; known: {', '.join(classes)}")
    a.systems = [s for s in only if s not in skip]
    a.workloads = [w.strip().upper() for w in a.workloads.split(",") if w.strip()]
    badw = [w for w in a.workloads if w not in WORKLOADS]
    if badw:
        ap.error(f"unknown workload(s) {badw}; available: {','.join(WORKLOADS)}")
    if a.slots3 % a.procs:
        ap.error("--slots3 must be divisible by --procs")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    global _RESULTS_PATH
    _RESULTS_PATH = Path(a.out)

    def _sig(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _sig)
    signal.signal(signal.SIGHUP, _sig)
    atexit.register(procs.stop_all)

    log(
        f"plan: systems={','.join(a.systems)} workloads={','.join(a.workloads)} reps={a.reps} "
        f"W1 n={a.n1} | W2 n={a.n2}@{a.rate2:g}/s | W3 n={a.n3} slots={a.slots3} | "
        f"W4 n={a.n4}, W5 {' '.join(f'{m}:{n}' for m, n in a.w5_cases)} on "
        f"{','.join(a.w45_on)} | "
        f"workers: {a.procs} procs x {a.slots} slots"
    )
    peers_py = (
        ensure_peers_venv()
        if any(not s.startswith("runplane") for s in a.systems) or not a.no_chart
        else ""
    )
    ensure_system_packages(a.systems)
    workdir = Path(tempfile.mkdtemp(prefix="runplane-bench-"))
    logdir = RESULTS / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True, exist_ok=True)
    run_id = f"{os.getpid()}_{int(time.time())}"
    results: dict = {
        "meta": {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": f"{os.cpu_count()} cpu, {platform.system()} {platform.machine()}, "
            f"py {platform.python_version()}",
            "config": {k: v for k, v in vars(a).items() if k not in ("out",)},
            "completion_signal": "each task: one RPUSH '<i> <t_enq> <t_start> <t_end>' to a "
            "dedicated recorder redis-server (raw-socket client, same code in every system)",
            "versions": {},
        },
        "rows": {},
    }
    rc = 0
    pg: Postgres | None = None
    recorder: RedisServer | None = None
    try:
        recorder = RedisServer("recorder", workdir).start()
        log(f"recorder redis on {recorder.addr}")
        if any(s in ("procrastinate", "runplane-pg") for s in a.systems):
            try:
                pg = Postgres(workdir).start()
            except BrokerError as e:
                log(f"PostgreSQL unavailable: {e}")
            results["meta"]["pg_fsync_per_s"] = fsync_bound(workdir)
        ctx = Ctx(
            workdir=workdir,
            logdir=logdir,
            recorder=recorder.addr,
            peers_python=peers_py,
            product_python=a.product_python,
            pg=pg,
            run_id=run_id,
            extra={"runplane_batch": a.runplane_batch, "celery_pool": a.celery_pool},
        )
        runner = Runner(a, ctx)
        classes = system_classes()
        for name in a.systems:
            runner.run_system(classes[name], results)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping everything")
        rc = 130
    except Exception as e:
        log(f"error: {e!r}")
        rc = 1
    finally:
        procs.stop_all()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    results["meta"]["wall_s"] = round(time.monotonic() - procs.T0, 1)
    results_save(results)
    text = report.render(results)
    print("\n" + text + "\n")
    (Path(a.out).with_suffix(".txt")).write_text(text + "\n")
    log(f"wrote {a.out} and {Path(a.out).with_suffix('.txt')}")
    if not a.no_chart and peers_py:
        png = Path(a.out).with_suffix(".png")
        r = subprocess.run(
            [peers_py, str(BENCH / "chart.py"), a.out, str(png)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        log(f"wrote {png}" if r.returncode == 0 else f"chart failed: {r.stderr[-500:]}")
    failed = [
        f"{n}/{w}"
        for n, row in results["rows"].items()
        for w, s in row["workloads"].items()
        if not s["ok"]
    ]
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        rc = rc or 2
    log(f"total {results['meta']['wall_s']:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
