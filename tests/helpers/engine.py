"""An engine on a migrated SQLite file with a manual clock, and a fake executor on its worker
plane: for tests that drive the engine systems directly, without gRPC or NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runplane.v1 import run_pb2
from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.config import SchedulerSettings
from runplane_scheduler.api import worker
from runplane_scheduler.dispatch import ExecutorState
from runplane_scheduler.engine import RunEngine
from runplane_scheduler.engine.clock import ManualClock
from runplane_scheduler.store import RunRow, Store
from runplane_scheduler.store import tables as db
from runplane_scheduler.worker_messages import ToExecutor
from tests.helpers.wait import eventually

ENV = "env_dev"


@dataclass
class FakeExecutor:
    """One executor connection: what the engine sends it, and reports it sends back, as the
    WorkerService servicer converts them (protobuf here, no gRPC)."""

    engine: RunEngine
    state: ExecutorState
    outbox: asyncio.Queue[ToExecutor]

    async def next(self, kind: str, timeout: float = 5.0) -> Any:
        """The next message the engine sends of ``kind`` (others before it are dropped)."""

        async def take() -> Any:
            while True:
                msg = worker.response(await self.outbox.get())
                if msg.WhichOneof("message") == kind:
                    return getattr(msg, kind)

        return await asyncio.wait_for(take(), timeout)

    def nothing_sent(self) -> bool:
        return self.outbox.empty()

    def send(self, **message: Any) -> None:
        request = wpb.ConnectRequest(**message)
        self.engine.on_message(self.state, worker.report(request, self.engine.settings.limits))

    def ack_and_start(self, attempt_id: str) -> None:
        self.send(ack=wpb.AssignmentAck(attempt_id=attempt_id))
        self.send(started=wpb.AttemptStarted(attempt_id=attempt_id))

    def fail(self, attempt_id: str, message: str = "boom") -> None:
        error = run_pb2.RunError(type="Error", message=message)
        self.send(result=wpb.AttemptResult(attempt_id=attempt_id, error=error))


@dataclass
class EngineHarness:
    engine: RunEngine
    clock: ManualClock
    store: Store

    async def executor(
        self, *tasks: wpb.TaskDefinition, capacity: int = 10, version: str = ""
    ) -> FakeExecutor:
        outbox: asyncio.Queue[ToExecutor] = asyncio.Queue()
        register = wpb.Register(
            capacity=capacity, manifest=wpb.Manifest(tasks=list(tasks), version=version)
        )
        state = await self.engine.register_executor(ENV, worker.registration(register), outbox)
        return FakeExecutor(self.engine, state, outbox)

    async def run(self, run_id: str) -> RunRow:
        row = await self.store.get_run(ENV, run_id)
        assert row is not None, run_id
        return row

    async def status_becomes(self, run_id: str, status: str, timeout: float = 5.0) -> RunRow:
        async def check() -> bool:
            return bool((await self.run(run_id)).status == status)

        await eventually(check, timeout, description=f"run {run_id} becomes {status}")
        return await self.run(run_id)

    async def settled(self) -> None:
        """Let the engine's loops and the writer catch up with what happened so far."""
        for _ in range(20):
            await asyncio.sleep(0.01)


@asynccontextmanager
async def engine_on_sqlite(
    tmp_path: Path, *, lease_timeout: float = 15.0, ack_timeout: float = 10.0
) -> AsyncIterator[EngineHarness]:
    """A started engine over a migrated SQLite file, its clock standing still."""
    database = db.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}")
    await db.upgrade(database)
    store = Store(database, on_commit=lambda events: None)
    clock = ManualClock()
    settings = SchedulerSettings(lease_timeout=lease_timeout, ack_timeout=ack_timeout)
    engine = RunEngine(store, settings, clock=clock)
    await engine.start()
    try:
        yield EngineHarness(engine, clock, store)
    finally:
        await engine.stop()
        await database.dispose()
