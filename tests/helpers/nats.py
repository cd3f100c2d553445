"""A real ``nats-server`` with JetStream, as a subprocess on a free loopback port; and a cluster
of them (:class:`NatsCluster`), routed to each other on loopback ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import nats
import orjson
from nats.aio.client import Client as NATS

from tests.helpers.ports import free_port

HOST = "127.0.0.1"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def _die_with_parent() -> list[str]:
    """A command prefix that has Linux kill the server when the test process ends, so a killed
    test run leaves no server behind. ``setpriv`` sets it before exec: a Python ``preexec_fn``
    would run Python in a forked child of a process with gRPC threads, which can crash."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv and sys.platform == "linux" else []


_PREFIX = _die_with_parent()


class NatsServerError(RuntimeError):
    """The server could not be started, or it exited on its own."""


def find_binary() -> str | None:
    """``$RUNPLANE_NATS_SERVER``, else ``nats-server`` on PATH, else Debian's /usr/sbin one."""
    if explicit := os.environ.get("RUNPLANE_NATS_SERVER"):
        return explicit
    if found := shutil.which("nats-server"):
        return found
    return "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None


class NatsServer:
    """One ``nats-server -js`` process; restarts keep its port and store directory.

    ``start``/``stop`` are async; ``start_blocking``/``stop_blocking`` serve sync fixtures.
    The server counts as up once it greets a TCP client with ``INFO`` announcing JetStream.
    Start it from the thread that owns it (the event loop's): on Linux it dies with that thread.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        args: Sequence[str] = (),
    ):
        """``args``: more command-line options (a cluster member's name and routes)."""
        self.store_dir = store_dir
        self.args = tuple(args)
        self.binary = binary or find_binary() or "nats-server"
        self.port = port or 0
        self._fixed_port = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        self._started = False

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.store_dir.parent / f"{self.store_dir.name}.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it accepts clients with JetStream enabled."""
        for last_try in self._tries():
            self._launch()
            try:
                deadline = time.monotonic() + timeout
                while not await self._greets_async():
                    self._check_alive(deadline)
                    await asyncio.sleep(0.01)
            except NatsServerError:
                if last_try:
                    raise
                self.port = 0
                continue
            self._started = True
            return

    def start_blocking(self, timeout: float = START_TIMEOUT) -> None:
        """``start`` for synchronous callers."""
        for last_try in self._tries():
            self._launch()
            try:
                deadline = time.monotonic() + timeout
                while not self._greets():
                    self._check_alive(deadline)
                    time.sleep(0.01)
            except NatsServerError:
                if last_try:
                    raise
                self.port = 0
                continue
            self._started = True
            return

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop gracefully (SIGTERM) and wait for the process to exit; JetStream data stays."""
        process = self._take_process()
        if process is None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
            raise NatsServerError(f"nats-server did not stop within {timeout:g}s") from None

    def stop_blocking(self, timeout: float = STOP_TIMEOUT) -> None:
        """``stop`` for synchronous callers."""
        process = self._take_process()
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise NatsServerError(f"nats-server did not stop within {timeout:g}s") from None

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crash would; ``start`` brings it back."""
        process = self._take_process()
        if process is not None:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _tries(self) -> list[bool]:
        """One flag per try, true for the last one.

        A port from free_port() may be taken before the server binds it, so the first start may
        move to another port; later starts must keep the URL that clients already have.
        """
        tries = 1 if self._fixed_port or self._started else 3
        return [n == tries - 1 for n in range(tries)]

    def _launch(self) -> None:
        if self.running:
            raise NatsServerError(f"nats-server is already running on {self.url}")
        if not self.port:
            self.port = free_port(HOST)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [
            *(self.binary, "-js", "-sd", str(self.store_dir), "-a", HOST, "-p", str(self.port)),
            *self.args,
        ]
        with self.log_path.open("ab") as log:
            log.write(f"--- {' '.join(command)}\n".encode())
            log.flush()
            try:
                self._process = subprocess.Popen(
                    [*_PREFIX, *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            except FileNotFoundError:
                raise NatsServerError(f"no nats-server binary at {self.binary!r}") from None

    def _check_alive(self, deadline: float) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            self._process = None
            raise NatsServerError(
                f"nats-server exited while starting on port {self.port}:\n{self.log_tail()}"
            )
        if time.monotonic() > deadline:
            self.kill()
            raise NatsServerError(f"nats-server not ready on {self.url}:\n{self.log_tail()}")

    def _take_process(self) -> subprocess.Popen[bytes] | None:
        process, self._process = self._process, None
        return process

    def _greets(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
                return _is_jetstream_info(sock.makefile("rb").readline(65536))
        except OSError:
            return False

    async def _greets_async(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 1.0)
        except (OSError, TimeoutError):
            return False
        try:
            return _is_jetstream_info(await asyncio.wait_for(reader.readline(), 1.0))
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()


def _is_jetstream_info(line: bytes) -> bool:
    return line.startswith(b"INFO ") and b'"jetstream":true' in line


class NatsCluster:
    """``size`` nats-servers with JetStream in one cluster (named ``n0``, ``n1``, ...), each
    routed to the others on loopback ports. Nodes stop, start and are killed one at a time
    through :attr:`nodes`; their ports and stores stay, so a restarted node rejoins."""

    NAME = "runplane-test"

    def __init__(self, root: Path, *, size: int = 3, binary: str | None = None) -> None:
        client_ports = [free_port(HOST) for _ in range(size)]
        route_ports = [free_port(HOST) for _ in range(size)]
        self.monitor_ports = [free_port(HOST) for _ in range(size)]
        # Every node gets every route, its own too (which it ignores).
        routes = ",".join(f"nats://{HOST}:{port}" for port in route_ports)
        self.nodes = [
            NatsServer(
                root / f"n{i}",
                port=client_ports[i],
                binary=binary,
                args=(
                    *("--name", f"n{i}", "--cluster_name", self.NAME),
                    *("--cluster", f"nats://{HOST}:{route_ports[i]}", "--routes", routes),
                    *("-m", str(self.monitor_ports[i])),
                ),
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (as RUNPLANE_NATS_URL takes them)."""
        return ",".join(self.urls)

    def node(self, name: str) -> NatsServer:
        """The node of that server name (``n0``, ...)."""
        return self.nodes[int(name.removeprefix("n"))]

    async def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every node and wait until JetStream has a meta leader."""
        await asyncio.gather(*(node.start(timeout) for node in self.nodes))
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until every running node answers JetStream API requests (the cluster has a meta
        leader, and each running node knows it)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.running:
                continue
            while not await _jetstream_answers(node.url):
                if time.monotonic() > deadline:
                    raise NatsServerError(
                        f"JetStream on {node.url} never answered:\n{node.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    async def connect(self) -> NATS:
        """A client of the running nodes."""
        return await nats.connect(
            servers=[node.url for node in self.nodes if node.running], connect_timeout=2
        )

    async def stream_leader(self, stream: str, timeout: float = 30.0) -> NatsServer:
        """The node that leads ``stream`` now, once it has a leader (after an election)."""
        deadline = time.monotonic() + timeout
        nc = await self.connect()
        try:
            while True:
                try:
                    info = await nc.jetstream(timeout=1).stream_info(stream)
                    if info.cluster is not None and info.cluster.leader:
                        return self.node(info.cluster.leader)
                except Exception:  # no leader to answer yet
                    pass
                if time.monotonic() > deadline:
                    raise NatsServerError(f"{stream} has no leader after {timeout:g}s")
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def serving(self, client_name: str) -> NatsServer:
        """The node the client connection named ``client_name`` is connected to now (from
        each running node's ``/connz`` monitoring endpoint)."""

        def names(port: int) -> set[str]:
            url = f"http://{HOST}:{port}/connz?limit=1024"
            with urllib.request.urlopen(url, timeout=2) as response:
                return {c.get("name", "") for c in orjson.loads(response.read())["connections"]}

        for node, port in zip(self.nodes, self.monitor_ports, strict=True):
            if node.running and client_name in await asyncio.to_thread(names, port):
                return node
        raise NatsServerError(f"no node serves a client named {client_name!r}")

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(f"--- {node.url}\n{node.log_tail(lines)}" for node in self.nodes)


async def _jetstream_answers(url: str) -> bool:
    try:
        nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False)
    except Exception:  # not up yet
        return False
    try:
        reply = await nc.request("$JS.API.INFO", b"", timeout=1)
        return "error" not in orjson.loads(reply.data)
    except Exception:  # no meta leader yet: no answer, or an error answer
        return False
    finally:
        await nc.close()
