"""runplane adapter: scheduler + N executors, PostgreSQL or SQLite, own nats-server.

Contract used (see bench/README.md):
  runplane db upgrade                      env RUNPLANE_DATABASE_URL
  runplane keys create --env dev --execute prints the secret key (last stdout line)
  runplane scheduler                       env RUNPLANE_DATABASE_URL, RUNPLANE_NATS_URL,
                                           RUNPLANE_SCHEDULER_LISTEN=127.0.0.1:<port>;
                                           ready when grpc.health.v1.Health/Check = SERVING
  runplane executor --tasks bench.tasks_runplane [--processes P] [--capacity C]
                                           env RUNPLANE_API_URL, RUNPLANE_SECRET_KEY
  (one executor = a control process + a warm pool of P task processes running up to C attempts at
  once; the benchmark uses P = --procs and C = --procs x slots, like the peers' process x slots)
Client: runplane.Client(api_url, secret_key).tasks.trigger(id, payload) -> .id;
        .runs.retrieve(id).status == "COMPLETED".
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from bench import procs
from bench.brokers import NatsServer
from bench.systems.base import REPO, Profile, System, SystemError_


class Runplane(System):
    client_module = "runplane_client"
    backend = "pg"
    workloads = ("W1", "W1C", "W2", "W3", "W4", "W5", "W6")
    # Scheduler replicas: the first leads; the others stand by and forward. The client spreads
    # its calls over all of them and the executor connects through the last one.
    replicas = 1
    suffix = ""

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        self.name = f"runplane-{self.backend}{self.suffix}"
        super().__init__(ctx)
        self.scheduler = None
        self.standbys: list = []
        self.standby_ports: list[int] = []
        self.realtime = None
        self.realtime_port = 0
        self.realtime_http_port = 0
        self.key = ""
        self.port = 0
        self.db = ""
        self.url = ""
        self._flags: set[str] = set()
        self._connected_seen = 0
        self.extra_rows = {}
        self.notes: list[str] = []
        if ctx.extra.get("runplane_batch", 0) > 0:
            if self._sdk_has("TasksAPI", "batch_trigger"):
                self.extra_rows = {
                    f"{self.name}+batch": ("W1", {"batch": ctx.extra["runplane_batch"]})
                }
            else:
                self.notes.append(
                    f"{self.name}+batch: skipped, the SDK has no tasks.batch_trigger yet"
                )
        # W3 with a durable wait (`wait.for_(seconds=1)` frees the slot while waiting)
        self.extra_rows[f"{self.name}+wait"] = ("W3", {"kind": "wait"})
        if self.replicas > 1:  # the replicas rows are W1 and W1C only
            self.extra_rows = {}

    def _sdk_has(self, cls: str, attr: str) -> bool:
        code = f"import runplane; print(hasattr(getattr(runplane, {cls!r}, None), {attr!r}))"
        r = procs.run([self.ctx.product_python, "-c", code], cwd=REPO, timeout=60)
        return r.stdout.strip().endswith("True")

    @property
    def python(self) -> str:
        return self.ctx.product_python

    @property
    def exe(self) -> list[str]:
        b = Path(self.ctx.product_python).parent / "runplane"
        if b.exists():
            return [str(b)]
        return [self.ctx.product_python, "-m", "runplane_cli"]

    def broker_env(self) -> dict[str, str]:
        env = {
            "RUNPLANE_DATABASE_URL": self.url,
            "RUNPLANE_NATS_URL": self.nats.url,
            "RUNPLANE_SCHEDULER_LISTEN": f"127.0.0.1:{self.port}",
            "RUNPLANE_API_URL": f"127.0.0.1:{self.port}",
        }
        if self.key:
            env["RUNPLANE_SECRET_KEY"] = self.key
        if self.standby_ports:
            urls = [f"127.0.0.1:{p}" for p in (self.port, *self.standby_ports)]
            env["BENCH_RUNPLANE_API_URLS"] = ",".join(urls)
        if self.realtime_port:
            env["RUNPLANE_REALTIME_LISTEN"] = env["RUNPLANE_REALTIME_URL"] = (
                f"127.0.0.1:{self.realtime_port}"
            )
            # the SSE endpoints (W5 sse-tag)
            env["RUNPLANE_REALTIME_HTTP_LISTEN"] = f"127.0.0.1:{self.realtime_http_port}"
            env["BENCH_REALTIME_HTTP"] = f"http://127.0.0.1:{self.realtime_http_port}"
        return env

    def _cli(self, *args: str, timeout: float = 120) -> str:
        r = procs.run([*self.exe, *args], env=self.env(), cwd=REPO, timeout=timeout)
        with (self.logdir / "cli.log").open("a") as f:
            out = "<secret key not logged>" if args[:1] == ("keys",) else r.stdout
            f.write(f"$ runplane {' '.join(args)}  -> rc {r.returncode}\n{out}\n{r.stderr}\n")
        if r.returncode != 0:
            raise SystemError_(
                f"`runplane {' '.join(args)}` failed (rc {r.returncode}): "
                f"{(r.stderr or r.stdout).strip()[-800:]}"
            )
        return r.stdout

    def start_infra(self) -> None:
        if not Path(self.ctx.product_python).exists():
            raise SystemError_(f"product venv python not found: {self.ctx.product_python}")
        self.nats = NatsServer(self.name, self.ctx.workdir).start()
        if self.backend == "pg":
            if self.ctx.pg is None:
                raise SystemError_("PostgreSQL not available")
            self.db = self.ctx.pg.create_db(
                f"bench_{self.name.replace('-', '_')}_{self.ctx.run_id}"
            )
            pg = self.ctx.pg
            self.url = f"postgresql+asyncpg://{pg.user}@{pg.host}:{pg.port}/{self.db}"
        else:
            path = self.ctx.workdir / f"{self.name}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            self.url = f"sqlite+aiosqlite:///{path}"  # path is absolute -> 4 slashes
        self.port = procs.free_port()
        self._cli("db", "upgrade")
        # --execute: the same key triggers (the client) and connects the executors.
        out = self._cli("keys", "create", "--env", "dev", "--execute").strip().splitlines()
        if not out:
            raise SystemError_("`runplane keys create --env dev` printed no key")
        self.key = out[-1].strip()
        log = self.logdir / "scheduler.log"
        self.scheduler = procs.spawn(
            f"{self.name}:scheduler",
            [*self.exe, "scheduler"],
            env=self.env(),
            cwd=REPO,
            log_path=log,
        )
        r = procs.run(
            [self.python, "-m", "bench.clients.grpc_health", f"127.0.0.1:{self.port}", "60"],
            env=self.env(),
            cwd=REPO,
            timeout=75,
        )
        if r.returncode != 0 or self.scheduler.poll() is not None:
            raise SystemError_(
                f"scheduler not SERVING on 127.0.0.1:{self.port}: {r.stderr.strip()}\n"
                f"{procs.tail(log)}"
            )
        for n in range(1, self.replicas):
            self._start_standby(n)
        # which executor pool flags this CLI has (env vars are set as well)
        r = procs.run([*self.exe, "executor", "--help"], env=self.env(), cwd=REPO, timeout=30)
        helptext = r.stdout + r.stderr
        self._flags = {
            f
            for f in ("--processes", "--capacity")
            if re.search(rf"(^|\s){re.escape(f)}[\s=]", helptext)
        }

    def _start_standby(self, n: int) -> None:
        port = procs.free_port()
        env = {**self.env(), "RUNPLANE_SCHEDULER_LISTEN": f"127.0.0.1:{port}"}
        env["RUNPLANE_REPLICA_ID"] = f"standby-{n}"
        log = self.logdir / f"standby-{n}.log"
        standby = procs.spawn(
            f"{self.name}:standby-{n}", [*self.exe, "scheduler"], env=env, cwd=REPO, log_path=log
        )
        self.standbys.append(standby)
        self.standby_ports.append(port)
        r = procs.run(
            [self.python, "-m", "bench.clients.grpc_health", f"127.0.0.1:{port}", "60"],
            env=env,
            cwd=REPO,
            timeout=75,
        )
        if r.returncode != 0 or standby.poll() is not None:
            raise SystemError_(f"standby {n} not SERVING on 127.0.0.1:{port}\n{procs.tail(log)}")

    def start_realtime(self) -> None:
        """The realtime service (W5 only): `runplane realtime` on a free port."""
        if self.realtime is not None:
            return
        self.realtime_port = procs.free_port()
        self.realtime_http_port = procs.free_port()
        log = self.logdir / "realtime.log"
        self.realtime = procs.spawn(
            f"{self.name}:realtime", [*self.exe, "realtime"], env=self.env(), cwd=REPO, log_path=log
        )
        addr = f"127.0.0.1:{self.realtime_port}"
        r = procs.run(
            [self.python, "-m", "bench.clients.grpc_health", addr, "60"],
            env=self.env(),
            cwd=REPO,
            timeout=75,
        )
        if r.returncode != 0 or self.realtime.poll() is not None:
            raise SystemError_(
                f"realtime not SERVING on {addr}: {r.stderr.strip()}\n{procs.tail(log)}"
            )
        self.worker_logs.append(log)

    def stop_realtime(self) -> None:
        if self.realtime is not None:
            procs.stop(self.realtime)
            self.realtime = None
        self.realtime_port = 0
        self.realtime_http_port = 0

    def pids(self) -> dict[str, int]:
        """The process trees W4 measures: the executor (control process + task processes)
        and the scheduler (W5: and the realtime service and nats-server, for their CPU time)."""
        out = {}
        if self.workers:
            out["executor"] = self.workers[0].pid
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.pid
        for n, standby in enumerate(self.standbys, 1):
            out[f"standby-{n}"] = standby.pid
        if self.realtime is not None:
            out["realtime"] = self.realtime.pid
            nats = getattr(getattr(self, "nats", None), "proc", None)
            if nats is not None:
                out["nats"] = nats.pid
        return out

    def stop_infra(self) -> None:
        self.stop_realtime()
        for standby in self.standbys:
            procs.stop(standby)
        self.standbys, self.standby_ports = [], []
        if self.scheduler is not None:
            procs.stop(self.scheduler)
            self.scheduler = None
        if getattr(self, "nats", None):
            self.nats.stop()
        if self.db and self.ctx.pg is not None:
            self.ctx.pg.drop_db(self.db)
            self.db = ""

    def spawn_workers(self, profile: Profile) -> None:
        self.worker_logs.append(self.logdir / "scheduler.log")
        env = self.env()
        env["RUNPLANE_EXECUTOR_PROCESSES"] = str(profile.procs)
        env["RUNPLANE_EXECUTOR_CAPACITY"] = str(profile.total)
        if self.standby_ports:  # through a standby, which forwards its session to the leader
            env["RUNPLANE_API_URL"] = f"127.0.0.1:{self.standby_ports[-1]}"
        argv = [*self.exe, "executor", "--tasks", "bench.tasks_runplane"]
        if "--processes" in self._flags:
            argv += ["--processes", str(profile.procs)]
        if "--capacity" in self._flags:
            argv += ["--capacity", str(profile.total)]
        self.spawn_worker(f"{profile.name}-executor", argv, env=env)

    def wait_ready(self, timeout: float) -> None:
        """Wait until the scheduler logs that the new executor connected (bounded).

        Runs triggered while an executor is still registering can stay PENDING_VERSION
        (seen here); the benchmark measures steady state, so it waits for the registration.
        """
        log = self.logdir / "scheduler.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if text.count(" connected: ") > self._connected_seen:
                self._connected_seen = text.count(" connected: ")
                return
            if not self.workers_alive():
                return
            time.sleep(0.1)
        procs.log(
            f"   {self.name}: no 'executor ... connected' in scheduler.log after {timeout:.0f} s"
        )

    def workers_alive(self) -> bool:
        return (
            super().workers_alive() and self.scheduler is not None and self.scheduler.poll() is None
        )

    def describe(self, profile: Profile) -> str:
        db = "PostgreSQL (asyncpg)" if self.backend == "pg" else "SQLite (aiosqlite)"
        schedulers = (
            f"{self.replicas} scheduler replicas (1 leads; calls spread over all, forwarded)"
            if self.replicas > 1
            else "1 scheduler"
        )
        return (
            f"{schedulers} + 1 executor --processes {profile.procs} --capacity {profile.total}; "
            f"{db}; own nats-server -js"
        )

    def versions(self) -> dict[str, str]:
        return self.pip_versions("runplane", "grpcio", "nats-py", "SQLAlchemy")


class RunplanePG(Runplane):
    backend = "pg"


class RunplaneSQLite(Runplane):
    backend = "sqlite"


class RunplanePG2(RunplanePG):
    """W1 and W1C with 2 scheduler replicas (a leader and a standby that forwards)."""

    replicas = 2
    suffix = "-2rep"
    workloads = ("W1", "W1C")


class RunplanePG3(RunplanePG):
    replicas = 3
    suffix = "-3rep"
    workloads = ("W1", "W1C")
