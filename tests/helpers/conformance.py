"""Worker protocol conformance: a scripted scheduler, and the worker implementations it drives.

:class:`ScriptedScheduler` is a real ``WorkerService`` (a ``grpc.aio`` server on a free loopback
port) whose ``Connect`` streams a test plays by hand: it says exactly what the worker receives
(``Registered``, ``Assignment``, a duplicate of it, ``Resume``, ``CancelAttempt``, a dropped
stream, a refused registration) and checks what the worker sends, each expectation with a
timeout and a failure naming the message it waited for and what came instead.

:data:`IMPLEMENTATIONS` are the workers under test, each a way to start a worker process against
a scheduler address with a worker key (see ``tests/conformance/README.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import orjson

from runplane.v1 import run_pb2, worker_service_pb2_grpc
from runplane.v1 import worker_service_pb2 as wpb
from tests.helpers.cluster import ROOT, ServiceProcess
from tests.helpers.ports import free_port

# How long any expectation waits: generous, since a worker may start processes first. Tests
# never assert how fast a worker is, only what it sends.
TIMEOUT = 30.0
# The first Register of a freshly started worker process.
START_TIMEOUT = 90.0

# The worker version every conformance worker registers (RUNPLANE_VERSION).
VERSION = "conformance-1"

Predicate = Callable[[wpb.ConnectRequest], bool]
# start(address, key, **env): a started worker process of the implementation under test.
StartWorker = Callable[..., Awaitable[ServiceProcess]]


def attempt_of(message: wpb.ConnectRequest) -> str:
    """The attempt a worker's message is about ('' for register, heartbeat and logs)."""
    kind = message.WhichOneof("message")
    if kind in ("ack", "started", "result", "wait", "metadata"):
        return str(getattr(message, kind).attempt_id)
    return ""


def summary(message: wpb.ConnectRequest) -> str:
    kind = message.WhichOneof("message")
    body = " ".join(str(getattr(message, kind or "register")).split())
    return f"{kind}({body[:160]})"


class _End:
    """Ends a stream: with ``code`` as an error status, or cleanly when None."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        self.code = code
        self.details = details


class WorkerStream:
    """One ``Connect`` call of the worker, as the test sees it."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.received: list[wpb.ConnectRequest] = []
        self._taken: set[int] = set()
        self._arrived = asyncio.Event()
        self._outbox: asyncio.Queue[wpb.ConnectResponse | _End] = asyncio.Queue()
        self.closed = asyncio.Event()  # the worker ended its side, or the stream ended
        self.register: wpb.Register | None = None
        self.batches = 0  # ReportBatches received (their reports are in ``received``)

    # -- what the worker receives ------------------------------------------------------------

    def send(self, response: wpb.ConnectResponse) -> None:
        self._outbox.put_nowait(response)

    def registered(
        self,
        executor_id: str = "",
        session_token: str = "token-1",
        heartbeat_interval_ms: int = 500,
        protocol_version: int = 1,
    ) -> wpb.Registered:
        """Answer the Register: with ``executor_id`` (default: the one the worker asked for, or
        a new one), ``session_token`` and the protocol version the stream speaks."""
        assert self.register is not None
        registered = wpb.Registered(
            executor_id=executor_id or self.register.executor_id or "exec_conformance",
            session_token=session_token,
            heartbeat_interval_ms=heartbeat_interval_ms,
            protocol_version=protocol_version,
        )
        self.send(wpb.ConnectResponse(registered=registered))
        return registered

    def assign(
        self,
        attempt_id: str,
        task_id: str,
        payload: Any = None,
        *,
        run_id: str = "",
        attempt_number: int = 1,
        send: bool = True,
    ) -> wpb.Assignment:
        assignment = wpb.Assignment(
            run=run_pb2.Run(
                id=run_id or f"run_{attempt_id}",
                task_id=task_id,
                payload=orjson.dumps(payload).decode(),
                metadata="{}",
                queue=f"task/{task_id}",
                max_attempts=3,
                root_run_id=run_id or f"run_{attempt_id}",
            ),
            attempt_id=attempt_id,
            attempt_number=attempt_number,
            environment_slug="dev",
            environment_id="env_conformance",
        )
        if send:
            self.send(wpb.ConnectResponse(assignment=assignment))
        return assignment

    def batch(self, *messages: wpb.ConnectResponse) -> None:
        """Send ``messages`` as one ResponseBatch (protocol version 2)."""
        self.send(wpb.ConnectResponse(batch=wpb.ResponseBatch(messages=messages)))

    def resume(self, attempt_id: str, *results: wpb.WaitResult) -> None:
        self.send(wpb.ConnectResponse(resume=wpb.Resume(attempt_id=attempt_id, results=results)))

    def cancel(self, attempt_id: str, run_id: str = "") -> None:
        self.send(
            wpb.ConnectResponse(
                cancel=wpb.CancelAttempt(
                    attempt_id=attempt_id, run_id=run_id or f"run_{attempt_id}"
                )
            )
        )

    def drop(self, details: str = "the scheduler went away (scripted)") -> None:
        """End the stream with UNAVAILABLE, as a scheduler restart or the network would."""
        self._outbox.put_nowait(_End(grpc.StatusCode.UNAVAILABLE, details))

    def refuse(self, code: grpc.StatusCode, details: str) -> None:
        """End the stream with ``code`` (e.g. ALREADY_EXISTS for a refused session token)."""
        self._outbox.put_nowait(_End(code, details))

    # -- what the worker sends ---------------------------------------------------------------

    def sent(self, kind: str, attempt_id: str | None = None) -> list[wpb.ConnectRequest]:
        """Every message of ``kind`` (about ``attempt_id``) received so far."""
        return [
            m
            for m in self.received
            if m.WhichOneof("message") == kind
            and (attempt_id is None or attempt_of(m) == attempt_id)
        ]

    async def expect(
        self,
        kinds: str | Sequence[str],
        attempt_id: str | None = None,
        where: Predicate | None = None,
        *,
        timeout: float = TIMEOUT,
        what: str = "",
    ) -> wpb.ConnectRequest:
        """The next message of one of ``kinds`` (about ``attempt_id``, matching ``where``) not
        returned by an earlier ``expect``; messages of other kinds in between are left alone.
        Fails after ``timeout`` naming the message it waited for and what the worker sent."""
        wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i, message in enumerate(self.received):
                if i in self._taken or message.WhichOneof("message") not in wanted:
                    continue
                if attempt_id is not None and attempt_of(message) != attempt_id:
                    continue
                if where is not None and not where(message):
                    continue
                self._taken.add(i)
                return message
            left = deadline - loop.time()
            if left <= 0 or self.closed.is_set():
                described = what or " or ".join(wanted)
                about = f" about attempt {attempt_id}" if attempt_id else ""
                seen = "\n  ".join(summary(m) for m in self.received[-15:]) or "nothing"
                ended = " (the stream has ended)" if self.closed.is_set() else ""
                raise AssertionError(
                    f"expected {described}{about} from the worker within {timeout:g}s{ended}; "
                    f"it sent (last 15):\n  {seen}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    async def result(self, attempt_id: str, *, timeout: float = TIMEOUT) -> wpb.AttemptResult:
        return (await self.expect("result", attempt_id, timeout=timeout)).result

    async def wait_request(
        self, attempt_id: str, seq: int | None = None, *, timeout: float = TIMEOUT
    ) -> wpb.WaitRequest:
        message = await self.expect(
            "wait",
            attempt_id,
            timeout=timeout,
            what="WaitRequest" if seq is None else f"WaitRequest(seq={seq})",
        )
        if seq is not None:
            assert message.wait.seq == seq, f"wait seq {message.wait.seq}, expected {seq}"
        return message.wait

    def end(self) -> None:
        """End the stream cleanly (the scheduler stopping)."""
        self._outbox.put_nowait(_End(None, ""))

    async def serve(
        self,
        request_iterator: AsyncIterator[wpb.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """The scheduler's side of the call: keep what the worker sends, write what the test
        sends, until the test ends the stream or the worker does."""

        async def read() -> None:
            try:
                async for message in request_iterator:
                    if message.WhichOneof("message") == "batch":  # protocol version 2
                        self.batches += 1
                        self.received.extend(message.batch.reports)
                    else:
                        self.received.append(message)
                    self._arrived.set()
            finally:
                self._ended()

        reader = asyncio.create_task(read())
        try:
            while True:
                get = asyncio.ensure_future(self._outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    return  # the worker ended its side
                item = get.result()
                if isinstance(item, _End):
                    if item.code is not None:
                        await context.abort(item.code, item.details)
                    return
                await context.write(item)
        finally:
            self._ended()
            reader.cancel()

    def _ended(self) -> None:
        self.closed.set()
        self._arrived.set()


@dataclass
class ScriptedScheduler:
    """A ``WorkerService`` on a free loopback port whose streams the test scripts; ``key`` is the
    only worker key it accepts (others get UNAUTHENTICATED)."""

    key: str = "wk_conformance"
    address: str = ""
    streams: list[WorkerStream] = field(default_factory=list)
    _new: asyncio.Queue[WorkerStream] = field(default_factory=asyncio.Queue)
    _server: grpc.aio.Server | None = None

    async def start(self) -> str:
        self._server = grpc.aio.server()
        worker_service_pb2_grpc.add_WorkerServiceServicer_to_server(_Servicer(self), self._server)
        for _ in range(20):
            port = free_port()
            try:
                self._server.add_insecure_port(f"127.0.0.1:{port}")
            except RuntimeError:
                continue
            break
        else:
            raise RuntimeError("no free port for the scripted scheduler")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def stop(self) -> None:
        for stream in self.streams:
            stream.end()
        if self._server is not None:
            await self._server.stop(grace=0.5)

    def opened(self, stream: WorkerStream) -> None:
        """The worker opened ``stream`` (called by the servicer)."""
        self.streams.append(stream)
        self._new.put_nowait(stream)

    async def connection(self, *, timeout: float = TIMEOUT) -> WorkerStream:
        """The worker's next stream, once its first message (a Register) has arrived; not yet
        answered."""
        try:
            stream = await asyncio.wait_for(self._new.get(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"expected the worker to open a Connect stream within {timeout:g}s "
                f"({len(self.streams)} opened before)"
            ) from None
        first = await stream.expect(("register",), timeout=timeout, what="Register (first)")
        assert stream.received[0] is first, (
            f"the first message must be a Register; got {summary(stream.received[0])}"
        )
        stream.register = first.register
        return stream

    async def registered(self, *, timeout: float = START_TIMEOUT, **answer: Any) -> WorkerStream:
        """The worker's next stream, answered with Registered (``answer``: its fields)."""
        stream = await self.connection(timeout=timeout)
        stream.registered(**answer)
        return stream


class _Servicer(worker_service_pb2_grpc.WorkerServiceServicer):
    def __init__(self, scheduler: ScriptedScheduler) -> None:
        self.scheduler = scheduler

    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[wpb.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        if metadata.get("authorization") != f"Bearer {self.scheduler.key}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not the conformance worker key")
        stream = WorkerStream(metadata)
        self.scheduler.opened(stream)
        await stream.serve(request_iterator, context)


# -- the implementations under test ----------------------------------------------------------------


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Implementation:
    """A worker implementation: ``command`` started from the repository root with ``env(address,
    key)`` added to the environment runs a worker of the conformance tasks against the scheduler
    at ``address`` (host:port) with the worker key ``key``."""

    name: str
    command: Callable[[], list[str]]
    env: Callable[[str, str], dict[str, str]]
    # Why it cannot run here (None: it can), and whether that fails rather than skips.
    unavailable: Callable[[], tuple[str, bool] | None] = lambda: None

    def process(
        self, address: str, key: str, log_dir: Path, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        """The worker process (not started); ``env`` adds to (or overrides) its environment."""
        full = {**os.environ, **self.env(address, key), **(env or {})}
        return ServiceProcess(f"worker-{self.name}", self.command(), full, log_dir)


def _python_env(address: str, key: str) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "sdk"), str(ROOT / "services"), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
        "RUNPLANE_API_URL": address,
        "RUNPLANE_WORKER_KEY": key,
        "RUNPLANE_SECRET_KEY": "",
        "RUNPLANE_EXECUTOR_LISTEN": "127.0.0.1:0",
        "RUNPLANE_EXECUTOR_HTTP_LISTEN": "",
        "RUNPLANE_CANCEL_GRACE": "1",
    }


PYTHON = Implementation(
    name="python",
    command=lambda: [
        *(sys.executable, "-m", "runplane_cli", "executor", "--processes", "1"),
        *("--tasks", "tests.conformance.tasks"),
    ],
    env=_python_env,
)

NODE_WORKER = ROOT / "clients" / "node" / "dist" / "conformance" / "worker.js"


def _node_unavailable() -> tuple[str, bool] | None:
    if shutil.which("node") is None:
        return "node is not installed", False
    if not NODE_WORKER.exists():
        # Skipped locally until it is built; in CI a missing build is a failure.
        return f"{NODE_WORKER.relative_to(ROOT)} is missing (build clients/node)", _ci()
    return None


NODE = Implementation(
    name="node",
    command=lambda: [shutil.which("node") or "node", str(NODE_WORKER)],
    env=lambda address, key: {"RUNPLANE_URL": address, "RUNPLANE_WORKER_KEY": key},
    unavailable=_node_unavailable,
)

IMPLEMENTATIONS: list[Implementation] = [PYTHON, NODE]
