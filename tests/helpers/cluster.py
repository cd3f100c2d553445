"""Every runplane service as its own process (scheduler, realtime, executor), for end-to-end
and fault tests. Logs go to files that failures print."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import runplane
from runplane.tls import TlsSettings
from runplane_cli.dev import wait_executor_connected, wait_serving
from runplane_scheduler.keys import create_key
from runplane_scheduler.store import tables as db
from tests.helpers.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        log.write(f"--- start {' '.join(self.argv)}\n".encode())
        log.flush()
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        log.close()

    def kill(self) -> None:
        """kill -9 the whole process group (the executor's task processes too)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    async def stop(self, grace: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.process.wait), grace)
        except TimeoutError:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """Scheduler, realtime and one executor, started as processes on free ports."""

    def __init__(
        self,
        tmp: Path,
        nats_url: str,
        database_url: str,
        tasks: str | Sequence[str] = "examples.hello",
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.api_url = f"127.0.0.1:{free_port()}"
        self.realtime_url = f"127.0.0.1:{free_port()}"
        self.executor_status_url = f"127.0.0.1:{free_port()}"
        # With RUNPLANE_TLS_CERT in ``env`` every service serves TLS, and ``tls`` is what this
        # test process (the client) uses: the same files.
        self.tls = TlsSettings.from_env(env or {})
        scheme = "https" if self.tls.serves_tls else "http"
        realtime_http_listen = f"127.0.0.1:{free_port()}"
        self.realtime_http_url = f"{scheme}://{realtime_http_listen}"
        self.tasks = tasks
        self.extra: list[ServiceProcess] = []  # executors started by add_executor
        self.keys: dict[str, str] = {}
        self.worker_keys: dict[str, str] = {}
        base = dict(os.environ)
        base.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)]),
            PYTHONUNBUFFERED="1",
            RUNPLANE_DATABASE_URL=database_url,
            RUNPLANE_NATS_URL=nats_url,
            RUNPLANE_SCHEDULER_LISTEN=self.api_url,
            RUNPLANE_API_URL=self.api_url,
            RUNPLANE_REALTIME_LISTEN=self.realtime_url,
            RUNPLANE_REALTIME_URL=self.realtime_url,
            RUNPLANE_REALTIME_HTTP_LISTEN=realtime_http_listen,
            RUNPLANE_REALTIME_HTTP_URL=self.realtime_http_url,
            RUNPLANE_EXECUTOR_LISTEN=self.executor_status_url,
            RUNPLANE_LEASE_TIMEOUT="3",
            RUNPLANE_HEARTBEAT_INTERVAL="0.5",
            RUNPLANE_CANCEL_GRACE="1",
            RUNPLANE_RECONCILE_INTERVAL="1",
        )
        # The HTTP ports of /metrics, /healthz and /readyz (the scheduler's also completes
        # wait tokens by URL; the realtime one is realtime_http_url).
        base.update(
            RUNPLANE_SCHEDULER_HTTP_LISTEN=f"127.0.0.1:{free_port()}",
            RUNPLANE_EXECUTOR_HTTP_LISTEN=f"127.0.0.1:{free_port()}",
        )
        base.update(env or {})
        self.env = base
        self.scheduler_http_url = f"{scheme}://{base['RUNPLANE_SCHEDULER_HTTP_LISTEN']}"
        self.executor_http_url = f"{scheme}://{base['RUNPLANE_EXECUTOR_HTTP_LISTEN']}"
        py = sys.executable
        modules = [tasks] if isinstance(tasks, str) else list(tasks)
        self.scheduler = ServiceProcess(
            "scheduler", [py, "-m", "runplane_cli", "scheduler"], base, tmp
        )
        self.realtime = ServiceProcess(
            "realtime", [py, "-m", "runplane_cli", "realtime"], base, tmp
        )
        self.executor = ServiceProcess(
            "executor",
            [
                *(py, "-m", "runplane_cli", "executor", "--processes", "2"),
                *(arg for module in modules for arg in ("--tasks", module)),
            ],
            base,
            tmp,
        )

    async def start(self, *, executor: bool = True) -> None:
        """Create the keys and start the services; without ``executor`` the test connects
        workers of its own (``worker_keys``)."""
        engine = db.create_engine(self.database_url)
        try:
            await db.upgrade(engine)
            for env in ("dev", "prod"):
                self.keys[env] = await create_key(engine, env)
                self.worker_keys[env] = await create_key(engine, env, kind="worker")
        finally:
            await engine.dispose()
        self.executor.env = {
            **self.env,
            "RUNPLANE_SECRET_KEY": self.keys["dev"],
            "RUNPLANE_WORKER_KEY": self.worker_keys["dev"],
        }
        try:
            self.scheduler.start()
            self.realtime.start()
            await wait_serving(self.api_url, 60, self.tls)
            await wait_serving(self.realtime_url, 60, self.tls)
            if executor:
                await self.start_executor()
        except BaseException:
            print(self.logs())
            await self.stop()
            raise

    async def start_executor(self) -> None:
        self.executor.start()
        await wait_executor_connected(self.executor_status_url, 60, self.tls, key=self.executor_key)

    async def add_executor(
        self, name: str, tasks: str, *args: str, env: dict[str, str] | None = None
    ) -> tuple[ServiceProcess, str]:
        """Start another executor process (one task process) of ``tasks`` with extra command
        line ``args``, and wait until it is connected. Returns it and its admin address. It
        is stopped with the cluster; its HTTP port is a free one unless ``env`` names one
        (RUNPLANE_EXECUTOR_HTTP_LISTEN)."""
        status = f"127.0.0.1:{free_port()}"
        process = ServiceProcess(
            name,
            [
                *(sys.executable, "-m", "runplane_cli", "executor", "--processes", "1"),
                *("--tasks", tasks, *args),
            ],
            {
                **self.executor.env,
                "RUNPLANE_EXECUTOR_LISTEN": status,
                "RUNPLANE_EXECUTOR_HTTP_LISTEN": "",
                **(env or {}),
            },
            self.tmp,
        )
        self.extra.append(process)
        process.start()
        await wait_executor_connected(status, 60, self.tls, key=self.executor_key)
        return process, status

    @property
    def executor_key(self) -> str:
        """The credential the executor connects with, which its admin port also wants."""
        env = self.executor.env
        return env.get("RUNPLANE_WORKER_KEY") or env["RUNPLANE_SECRET_KEY"]

    async def restart_scheduler(self) -> None:
        await self.scheduler.stop()
        self.scheduler.start()
        await wait_serving(self.api_url, 60, self.tls)

    def client(self, env: str = "dev") -> runplane.Client:
        return runplane.Client(
            api_url=self.api_url,
            secret_key=self.keys[env],
            realtime_url=self.realtime_url,
            tls_ca=self.tls.ca,
            tls_cert=self.tls.cert,
            tls_key=self.tls.key,
        )

    def logs(self) -> str:
        return "\n".join(
            f"===== {p.name}\n{p.log()[-6000:]}"
            for p in (self.scheduler, self.realtime, self.executor, *self.extra)
        )

    async def stop(self) -> None:
        await asyncio.gather(
            self.executor.stop(), self.realtime.stop(), *(p.stop() for p in self.extra)
        )
        await self.scheduler.stop()
