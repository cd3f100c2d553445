"""``runplane dev``: NATS, the scheduler, an executor and the realtime service on one machine,
each its own process, supervised (a process that dies is restarted, and the restart is shown)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runplane._errors import ConfigurationError

STATE_DIR = Path(".runplane")
# What the services write under STATE_DIR (the database with the signing key, NATS's store) is
# for the user alone, as is dev.env with the keys.
PRIVATE_UMASK = 0o077
COLORS = {"nats": 35, "scheduler": 36, "executor": 33, "realtime": 32, "dev": 1}


def say(name: str, line: str) -> None:
    color = COLORS.get(name, 0)
    tty = sys.stderr.isatty()
    label = f"\033[{color}m{name:>9}\033[0m" if tty else f"{name:>9}"
    print(f"{label} | {line}", file=sys.stderr, flush=True)


def free_port(preferred: int = 0) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


def find_nats_server() -> str:
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if found is None:
        raise ConfigurationError(
            "nats-server not found: install it (`apt-get install nats-server`) "
            "or set RUNPLANE_NATS_URL"
        )
    return found


@dataclass
class Service:
    """One supervised child process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    # The child's umask; -1 keeps this process's (the executor's: task code's files are the
    # user's business).
    umask: int = -1
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    stopping: bool = False
    _pump: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self) -> None:
        # The child inherits the umask it starts with (uvloop has no ``umask=``); nothing else
        # in this process creates files meanwhile.
        previous = os.umask(self.umask) if self.umask >= 0 else -1
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if previous >= 0:
                os.umask(previous)
        self._pump = asyncio.create_task(self._forward())
        say(self.name, f"started (pid {self.process.pid})")

    async def _forward(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            say(self.name, raw.decode(errors="replace").rstrip())

    async def supervise(self) -> None:
        while not self.stopping:
            assert self.process is not None
            code = await self.process.wait()
            if self.stopping:
                return
            self.restarts += 1
            say(self.name, f"exited with code {code}; restarting (restart #{self.restarts})")
            await asyncio.sleep(min(5.0, 0.5 * self.restarts))
            await self.start()

    async def stop(self, grace: float = 5.0) -> None:
        self.stopping = True
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 1)
        say(self.name, "stopped")


async def wait_serving(address: str, timeout: float = 60.0) -> None:
    """Wait until the gRPC server at ``address`` reports SERVING."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become ready in {timeout:.0f} s")
            await asyncio.sleep(0.1)


async def wait_executor_connected(address: str, timeout: float = 60.0, *, key: str) -> None:
    """Wait until the executor whose admin port is ``address`` is connected to the scheduler;
    ``key`` is the executor's own credential (its RUNPLANE_WORKER_KEY)."""
    from runplane.v1 import executor_service_pb2, executor_service_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = executor_service_pb2_grpc.ExecutorServiceStub(channel)
        while True:
            try:
                reply = await stub.GetExecutorStatus(
                    executor_service_pb2.GetExecutorStatusRequest(),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=1,
                )
                if reply.status.connected:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the executor did not connect in {timeout:.0f} s")
            await asyncio.sleep(0.1)


def read_env_file(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def secure_state_dir(path: Path = STATE_DIR) -> None:
    """Make ``path`` (0700) or tighten it and what it holds: directories 0700, files 0600."""
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o600)


def write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only, whatever its mode was."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


async def ensure_dev_keys(database_url: str) -> tuple[str, str]:
    """The dev secret key and worker key from .runplane/dev.env if the database still accepts
    them, else new ones."""
    from runplane_server import db
    from runplane_server.auth import RIGHT_API, RIGHT_EXECUTE, KeyAuthenticator, create_key

    engine = db.create_engine(database_url)
    try:
        await db.upgrade(engine)
        previous = read_env_file(STATE_DIR / "dev.env")
        authenticate = KeyAuthenticator(engine)
        keys: list[str] = []
        for name, kind, right in (
            ("RUNPLANE_SECRET_KEY", "secret", RIGHT_API),
            ("RUNPLANE_WORKER_KEY", "worker", RIGHT_EXECUTE),
        ):
            key = previous.get(name, "")
            try:
                usable = bool(key) and right in (await authenticate(key)).rights
            except Exception:
                usable = False
            if not usable:
                key = await create_key(engine, "dev", kind=kind, name=f"runplane dev ({kind})")
            keys.append(key)
        return keys[0], keys[1]
    finally:
        await engine.dispose()


async def dev(args: argparse.Namespace) -> int:
    secure_state_dir()
    python = sys.executable
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    database_url = (
        env.get("RUNPLANE_DATABASE_URL")
        or f"sqlite+aiosqlite:///{(STATE_DIR / 'runplane.db').absolute()}"
    )
    env["RUNPLANE_DATABASE_URL"] = database_url
    services: list[Service] = []
    supervisors: list[asyncio.Task[None]] = []

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    try:
        if not env.get("RUNPLANE_NATS_URL"):
            nats_port = free_port()
            store = (STATE_DIR / "nats").absolute()
            nats = Service(
                "nats",
                [
                    find_nats_server(),
                    "-js",
                    "-sd",
                    str(store),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(nats_port),
                ],
                env,
                umask=PRIVATE_UMASK,
            )
            await nats.start()
            services.append(nats)
            env["RUNPLANE_NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
        say("dev", f"NATS at {env['RUNPLANE_NATS_URL']}")
        say("dev", f"database {database_url}")
        key, worker_key = await ensure_dev_keys(database_url)
        env["RUNPLANE_SECRET_KEY"] = key
        env["RUNPLANE_WORKER_KEY"] = worker_key

        api_port = free_port(args.port)
        realtime_port = free_port()
        executor_port = free_port()
        api_url = f"127.0.0.1:{api_port}"
        realtime_url = f"127.0.0.1:{realtime_port}"
        realtime_http_url = f"http://127.0.0.1:{free_port()}"
        env.update(
            RUNPLANE_REALTIME_HTTP_URL=realtime_http_url,
            RUNPLANE_REALTIME_HTTP_LISTEN=realtime_http_url.removeprefix("http://"),
            RUNPLANE_SCHEDULER_LISTEN=api_url,
            RUNPLANE_API_URL=api_url,
            RUNPLANE_REALTIME_URL=realtime_url,
            RUNPLANE_REALTIME_LISTEN=realtime_url,
            RUNPLANE_EXECUTOR_LISTEN=f"127.0.0.1:{executor_port}",
        )
        tasks_args = [arg for module in args.tasks for arg in ("--tasks", module)]
        for name, argv in (
            ("scheduler", [python, "-m", "runplane", "scheduler"]),
            ("realtime", [python, "-m", "runplane", "realtime"]),
            ("executor", [python, "-m", "runplane", "executor", *tasks_args]),
        ):
            umask = -1 if name == "executor" else PRIVATE_UMASK
            service = Service(name, argv, env, umask=umask)
            await service.start()
            services.append(service)
        supervisors = [asyncio.create_task(s.supervise()) for s in services]
        ready: asyncio.Future[object] = asyncio.ensure_future(
            _all(
                wait_serving(api_url),
                wait_serving(realtime_url),
                wait_executor_connected(f"127.0.0.1:{executor_port}", key=worker_key),
            )
        )
        stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped in done:
            ready.cancel()
            return 130
        ready.result()
        write_private(
            STATE_DIR / "dev.env",
            f"RUNPLANE_API_URL={api_url}\nRUNPLANE_REALTIME_URL={realtime_url}\n"
            f"RUNPLANE_REALTIME_HTTP_URL={realtime_http_url}\nRUNPLANE_SECRET_KEY={key}\n"
            f"RUNPLANE_WORKER_KEY={worker_key}\n",
        )
        say(
            "dev",
            f"ready: API {api_url}, realtime {realtime_url} (HTTP {realtime_http_url}); "
            f"settings in {STATE_DIR / 'dev.env'}",
        )
        say(
            "dev",
            "trigger with: set -a; . .runplane/dev.env; "
            "runplane trigger TASK --payload '{...}' --wait",
        )
        if args.trigger:
            code = await _trigger_and_show(args.trigger, args.payload, api_url, realtime_url, key)
            if args.exit:
                return code
        say("dev", "running; Ctrl-C stops everything")
        await stop.wait()
        return 0
    finally:
        say("dev", "stopping")
        for service in reversed(services):
            service.stopping = True
        for task in supervisors:
            task.cancel()
        for service in reversed(services):
            await service.stop()


async def _trigger_and_show(
    task_id: str, payload_text: str, api_url: str, realtime_url: str, key: str
) -> int:
    import orjson

    from runplane._client import Client

    client = Client(api_url=api_url, secret_key=key, realtime_url=realtime_url)
    handle = await client.tasks.trigger(task_id, orjson.loads(payload_text))
    say("dev", f"triggered {task_id}: run {handle.id}")
    async for run in client.runs.subscribe_to_run(handle.id):
        say("dev", f"run {run.id} v{run.version}: {run.status}")
        if run.is_completed:
            if run.is_success:
                say("dev", f"output: {orjson.dumps(run.output).decode()}")
                return 0
            say("dev", f"error: {run.error}")
            return 1
    return 1


async def _all(*aws: Coroutine[Any, Any, None]) -> object:
    return await asyncio.gather(*aws)


def run_dev(args: argparse.Namespace) -> int:
    from runplane._log import run_async

    return run_async(dev(args))
