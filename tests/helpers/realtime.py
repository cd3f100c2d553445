"""The realtime service's tests' stand-ins for the scheduler: a fake ``RunService`` (``GetRun``
over a dict, with the scheduler's refusals) and the keys it knows, RunEvents published on NATS as
the scheduler publishes them, and a ``Subscriber`` that drains a subscription in the background.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
import nats
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError

from runplane.v1 import events_pb2, run_pb2, run_service_pb2, run_service_pb2_grpc
from runplane_common import subjects
from runplane_common.grpcserver import bearer_token
from tests.helpers.wait import eventually

DEV_KEY = "rp_dev_test"
PROD_KEY = "rp_prod_test"
KEYS = {DEV_KEY: "env_dev", PROD_KEY: "env_prod"}
DEV = (("authorization", f"Bearer {DEV_KEY}"),)
PROD = (("authorization", f"Bearer {PROD_KEY}"),)

S = run_pb2.RunStatus
QUEUED, DEQUEUED, EXECUTING = S.RUN_STATUS_QUEUED, S.RUN_STATUS_DEQUEUED, S.RUN_STATUS_EXECUTING
COMPLETED, FAILED = S.RUN_STATUS_COMPLETED, S.RUN_STATUS_FAILED
# A successful run's life: version n has status LIFE[n - 1].
LIFE = [QUEUED, DEQUEUED, EXECUTING, COMPLETED]

_event_ids = itertools.count(1)


class FakeScheduler(run_service_pb2_grpc.RunServiceServicer):
    """``GetRun`` over ``runs``, with the scheduler's refusals: an unknown key is UNAUTHENTICATED,
    a run of another environment NOT_FOUND."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}
        self.calls = 0
        self.address = ""

    async def GetRun(self, request: Any, context: Any) -> Any:
        self.calls += 1
        environment = KEYS.get(bearer_token(context.invocation_metadata()))
        if environment is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown secret key")
        found = self.runs.get(request.run_id)
        if found is None or found.environment_id != environment:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id}")
        return run_service_pb2.GetRunResponse(run=found)


class Subscriber:
    """Drains a subscription in the background, so a test can wait for what it has seen."""

    def __init__(self, runs: AsyncIterator[Any]) -> None:
        self.runs: list[Any] = []
        self.task = asyncio.create_task(self._drain(runs))

    async def _drain(self, runs: AsyncIterator[Any]) -> None:
        async for item in runs:
            self.runs.append(item)

    @property
    def versions(self) -> list[int]:
        return [r.version for r in self.runs]

    async def saw(self, versions: list[int], timeout: float = 15.0) -> None:
        """Wait until exactly ``versions`` have arrived."""

        def arrived() -> bool:
            assert self.versions == versions, f"sent so far: {self.versions}"
            return True

        await eventually(arrived, timeout, description=f"versions {versions}")

    async def ends_with(self, versions: list[int], timeout: float = 15.0) -> None:
        """Wait for the subscription to end, having sent exactly ``versions``."""
        await asyncio.wait_for(asyncio.shield(self.task), timeout)
        assert self.versions == versions

    async def still_open(self) -> bool:
        # A round trip to the event loop lets a just-ended stream finish its task.
        await asyncio.sleep(0)
        return not self.task.done()

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def ensure_run_events_stream(js: JetStreamContext) -> None:
    """The stream the scheduler creates at startup, with its name and subjects."""
    config = StreamConfig(
        name=subjects.RUN_EVENTS_STREAM,
        subjects=subjects.run_events_subjects(),
        storage=StorageType.FILE,
    )
    try:
        await js.add_stream(config)
    except BadRequestError:
        await js.update_stream(config)


async def publish(js: JetStreamContext, *runs: Any) -> None:
    """Publish each run as the scheduler does: a RunEvent on its subject, keyed by event id."""
    for each in runs:
        event_id = f"evt_{next(_event_ids)}"
        event = events_pb2.RunEvent(event_id=event_id, type="changed", run=each)
        await js.publish(
            subjects.run_event(each.environment_id, each.id),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": event_id},
        )


async def publish_when_back(js: JetStreamContext, *runs: Any) -> None:
    """``publish`` once the test's own connection is back after a NATS restart."""

    async def published() -> bool:
        try:
            await publish(js, *runs)
        except (nats.errors.Error, TimeoutError):
            return False
        return True

    await eventually(published, 15.0, description="publish after the NATS restart")
