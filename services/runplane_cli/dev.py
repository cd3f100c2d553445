"""``runplane dev``: NATS, the scheduler, an executor, the realtime service and the web dashboard
on one machine, each its own process, supervised (a process that dies is restarted, and the
restart is shown)."""

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
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runplane import Client, ConfigurationError
from runplane.tls import TlsSettings, open_channel
from runplane.v1 import executor_service_pb2, executor_service_pb2_grpc
from runplane.worker import run_async
from runplane_common.auth import RIGHT_API, RIGHT_EXECUTE
from runplane_scheduler.keys import KeyAuthenticator, create_key
from runplane_scheduler.store import tables as db

STATE_DIR = Path(".runplane")
# What the services write under STATE_DIR (the database with the signing key, NATS's store) is
# for the user alone, as is dev.env with the keys.
PRIVATE_UMASK = 0o077
COLORS = {"nats": 35, "scheduler": 36, "executor": 33, "realtime": 32, "dashboard": 34, "dev": 1}


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


async def wait_serving(address: str, timeout: float = 60.0, tls: TlsSettings | None = None) -> None:
    """Wait until the gRPC server at ``address`` reports SERVING (``tls``: see
    :func:`runplane.tls.open_channel`; plaintext when None)."""
    deadline = time.monotonic() + timeout
    async with open_channel(address, tls or TlsSettings()) as channel:
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


async def wait_executor_connected(
    address: str, timeout: float = 60.0, tls: TlsSettings | None = None, *, key: str
) -> None:
    """Wait until the executor whose admin port is ``address`` is connected to the scheduler;
    ``key`` is the executor's own credential (its RUNPLANE_WORKER_KEY)."""
    deadline = time.monotonic() + timeout
    async with open_channel(address, tls or TlsSettings()) as channel:
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


async def wait_http(url: str, timeout: float = 60.0, tls: TlsSettings | None = None) -> None:
    """Wait until ``url`` answers 200 (the dashboard's login page)."""
    deadline = time.monotonic() + timeout
    tls = tls or TlsSettings()
    ssl = tls.client_ssl_context() if url.startswith("https:") else False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) as http:
        while True:
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become ready in {timeout:.0f} s")
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


@dataclass(frozen=True)
class DevCertificates:
    """The throwaway CA and certificates of ``runplane dev --tls`` (paths of PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def server(self) -> TlsSettings:
        """For the services: the server certificate (it serves as their client one too)."""
        return TlsSettings(cert=str(self.server_cert), key=str(self.server_key), ca=str(self.ca))

    @property
    def client(self) -> TlsSettings:
        return TlsSettings(cert=str(self.client_cert), key=str(self.client_key), ca=str(self.ca))


def make_dev_certificates(directory: Path, days: int = 30) -> DevCertificates:
    """A new CA, a server certificate for 127.0.0.1 and localhost, and a client certificate,
    written to ``directory`` (keys and certificates mode 0600)."""
    # Only ``--tls`` needs these; cryptography's x509 is slow to import.
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "runplane dev"),
                x509.NameAttribute(NameOID.COMMON_NAME, common),
            ]
        )

    def write(path: Path, data: bytes) -> Path:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path.absolute()

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
        return write(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("runplane dev CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, usages: list[x509.ObjectIdentifier], server: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    # The services present the server certificate to each other as clients too.
    server, server_key = leaf(
        "runplane dev server",
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        server=True,
    )
    client, client_key = leaf("runplane dev client", [ExtendedKeyUsageOID.CLIENT_AUTH], False)
    pem = serialization.Encoding.PEM  # the CA's key is not kept: nothing more is signed
    return DevCertificates(
        ca=write(directory / "ca.pem", ca.public_bytes(pem)),
        server_cert=write(directory / "server.pem", server.public_bytes(pem)),
        server_key=write_key(directory / "server.key", server_key),
        client_cert=write(directory / "client.pem", client.public_bytes(pem)),
        client_key=write_key(directory / "client.key", client_key),
    )


def tls_env(tls: TlsSettings) -> dict[str, str]:
    return {"RUNPLANE_TLS_CERT": tls.cert, "RUNPLANE_TLS_KEY": tls.key, "RUNPLANE_TLS_CA": tls.ca}


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


async def dev(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``runplane dev``: the services as child processes, which inherit ``environ``."""
    secure_state_dir()
    python = sys.executable
    env = dict(environ)
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
            # One server keeps one copy, whatever a deploy's environment asks of a cluster.
            env["RUNPLANE_NATS_REPLICAS"] = "1"
        say("dev", f"NATS at {env['RUNPLANE_NATS_URL']}")
        say("dev", f"database {database_url}")
        key, worker_key = await ensure_dev_keys(database_url)
        env["RUNPLANE_SECRET_KEY"] = key
        env["RUNPLANE_WORKER_KEY"] = worker_key
        # dev's own calls, and with --tls what dev.env tells clients: the dev client cert.
        client_tls = TlsSettings.from_env(env)
        if args.tls:
            certs = make_dev_certificates(STATE_DIR / "tls")
            env.update(tls_env(certs.server))
            client_tls = certs.client
            say("dev", f"TLS: a throwaway CA and certificates in {STATE_DIR / 'tls'}")
        http = "https" if args.tls else "http"

        api_port = free_port(args.port)
        realtime_port = free_port()
        executor_port = free_port()
        api_url = f"127.0.0.1:{api_port}"
        realtime_url = f"127.0.0.1:{realtime_port}"
        realtime_http_listen = f"127.0.0.1:{free_port()}"
        realtime_http_url = f"{http}://{realtime_http_listen}"
        # The scheduler's and the executor's HTTP ports (/metrics, /healthz, /readyz; the
        # scheduler's also completes wait tokens by URL).
        scheduler_http_listen = f"127.0.0.1:{free_port()}"
        scheduler_http_url = f"{http}://{scheduler_http_listen}"
        executor_http_listen = f"127.0.0.1:{free_port()}"
        executor_http_url = f"{http}://{executor_http_listen}"
        env.update(
            RUNPLANE_SCHEDULER_HTTP_LISTEN=scheduler_http_listen,
            # Also its announced URL: one left in the environment by an earlier dev.env is stale.
            RUNPLANE_SCHEDULER_HTTP_URL=scheduler_http_url,
            RUNPLANE_EXECUTOR_HTTP_LISTEN=executor_http_listen,
        )
        dashboard_listen = f"127.0.0.1:{free_port()}"
        dashboard_url = f"{http}://{dashboard_listen}"
        env.update(
            RUNPLANE_REALTIME_HTTP_URL=realtime_http_url,
            RUNPLANE_REALTIME_HTTP_LISTEN=realtime_http_listen,
            RUNPLANE_SCHEDULER_LISTEN=api_url,
            RUNPLANE_API_URL=api_url,
            RUNPLANE_REALTIME_URL=realtime_url,
            RUNPLANE_REALTIME_LISTEN=realtime_url,
            RUNPLANE_EXECUTOR_LISTEN=f"127.0.0.1:{executor_port}",
            RUNPLANE_DASHBOARD_LISTEN=dashboard_listen,
        )
        tasks_args = [arg for module in args.tasks for arg in ("--tasks", module)]
        for name, argv in (
            ("scheduler", [python, "-m", "runplane_cli", "scheduler"]),
            ("realtime", [python, "-m", "runplane_cli", "realtime"]),
            ("executor", [python, "-m", "runplane_cli", "executor", *tasks_args]),
            ("dashboard", [python, "-m", "runplane_cli", "dashboard"]),
        ):
            umask = -1 if name == "executor" else PRIVATE_UMASK
            service = Service(name, argv, env, umask=umask)
            await service.start()
            services.append(service)
        supervisors = [asyncio.create_task(s.supervise()) for s in services]
        ready: asyncio.Future[object] = asyncio.ensure_future(
            _all(
                wait_serving(api_url, tls=client_tls),
                wait_serving(realtime_url, tls=client_tls),
                wait_executor_connected(
                    f"127.0.0.1:{executor_port}", tls=client_tls, key=worker_key
                ),
                wait_http(f"{dashboard_url}/login", tls=client_tls),
            )
        )
        stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped in done:
            ready.cancel()
            return 130
        ready.result()
        settings = {
            "RUNPLANE_API_URL": api_url,
            "RUNPLANE_REALTIME_URL": realtime_url,
            "RUNPLANE_REALTIME_HTTP_URL": realtime_http_url,
            "RUNPLANE_SCHEDULER_HTTP_URL": scheduler_http_url,
            "RUNPLANE_EXECUTOR_HTTP_URL": executor_http_url,
            "RUNPLANE_DASHBOARD_URL": dashboard_url,
            "RUNPLANE_SECRET_KEY": key,
            "RUNPLANE_WORKER_KEY": worker_key,
            **(tls_env(client_tls) if args.tls else {}),
        }
        write_private(STATE_DIR / "dev.env", "".join(f"{k}={v}\n" for k, v in settings.items()))
        say(
            "dev",
            f"ready: API {api_url}, realtime {realtime_url} (HTTP {realtime_http_url}); "
            f"settings in {STATE_DIR / 'dev.env'}",
        )
        say(
            "dev",
            f"metrics and health (/metrics, /healthz, /readyz): scheduler {scheduler_http_url}, "
            f"executor {executor_http_url}, realtime {realtime_http_url}",
        )
        say(
            "dev",
            f"dashboard: {dashboard_url} (log in with RUNPLANE_SECRET_KEY from "
            f"{STATE_DIR / 'dev.env'})",
        )
        say(
            "dev",
            "trigger with: set -a; . .runplane/dev.env; "
            "runplane trigger TASK --payload '{...}' --wait",
        )
        if args.trigger:
            code = await _trigger_and_show(
                args.trigger, args.payload, api_url, realtime_url, key, client_tls
            )
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
    task_id: str, payload_text: str, api_url: str, realtime_url: str, key: str, tls: TlsSettings
) -> int:
    client = Client(
        api_url=api_url,
        secret_key=key,
        realtime_url=realtime_url,
        tls_ca=tls.ca,
        tls_cert=tls.cert,
        tls_key=tls.key,
    )
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


def run_dev(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    return run_async(dev(args, environ))
