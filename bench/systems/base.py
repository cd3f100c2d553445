"""What every benchmarked system adapter provides, plus shared helpers."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.brokers import Postgres

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Profile:
    """Worker pool shape: ``procs`` worker processes x ``slots`` concurrent tasks each."""

    name: str
    procs: int
    slots: int

    @property
    def total(self) -> int:
        return self.procs * self.slots


@dataclass
class Ctx:
    workdir: Path  # temp dir for broker data, sqlite files
    logdir: Path  # per-process logs
    recorder: str  # host:port of the recorder redis
    peers_python: str
    product_python: str
    pg: Postgres | None
    run_id: str
    extra: dict = field(default_factory=dict)


class SystemError_(RuntimeError):
    pass


class System:
    name = "?"
    workloads = ("W1", "W1C", "W2", "W3")
    # extra result rows: row name -> (workload, client args), run with the std profile
    extra_rows: dict[str, tuple[str, dict]] = {}
    notes: list[str] = []  # e.g. rows skipped because a feature is missing

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.workers: list[subprocess.Popen[bytes]] = []
        self.worker_logs: list[Path] = []
        self.logdir = ctx.logdir / self.name
        self.logdir.mkdir(parents=True, exist_ok=True)

    # --- to implement -------------------------------------------------------
    @property
    def python(self) -> str:
        return self.ctx.peers_python

    client_module = "?"

    def start_infra(self) -> None: ...
    def stop_infra(self) -> None: ...
    def spawn_workers(self, profile: Profile) -> None: ...
    def describe(self, profile: Profile) -> str:
        return ""

    def broker_env(self) -> dict[str, str]:
        return {}

    def pids(self) -> dict[str, int]:
        """Process trees whose CPU per run W1 and W1C report (runplane: scheduler, executor)."""
        return {}

    def versions(self) -> dict[str, str]:
        return {}

    # --- shared -------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(k, None)
        env["PYTHONPATH"] = str(REPO) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["BENCH_RECORDER"] = self.ctx.recorder
        env["BENCH_CLIENT"] = self.client_module
        env.update(self.broker_env())
        return env

    def spawn_worker(self, tag: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.logdir / f"{tag}.log"
        self.worker_logs.append(log)
        p = procs.spawn(f"{self.name}:{tag}", argv, env=env or self.env(), cwd=REPO, log_path=log)
        self.workers.append(p)

    def start_workers(self, profile: Profile) -> None:
        self.worker_logs = []
        self.spawn_workers(profile)

    def wait_ready(self, timeout: float) -> None:
        """Optional readiness signal before the warm-up (the warm-up is the real check)."""

    def workers_alive(self) -> bool:
        return all(p.poll() is None for p in self.workers)

    def stop_workers(self) -> None:
        for p in reversed(self.workers):
            procs.stop(p, grace=1.5)  # all benchmark tasks are done by now; no need to wait long
        self.workers = []

    def log_tails(self, n: int = 12) -> str:
        return "\n".join(
            f"    {p.name}:\n{procs.tail(p, n)}" for p in self.worker_logs if p.exists()
        )

    def pip_versions(self, *names: str) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, sys\n"
            "out={}\nfor n in sys.argv[1:]:\n"
            "    try: out[n]=m.version(n)\n    except Exception: out[n]='?'\n"
            "print(json.dumps(out))"
        )
        r = procs.run([self.python, "-c", code, *names], timeout=30)
        import json

        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except Exception:
            return {}
