"""Version locking in the engine: a queued run whose version's executors are gone, after a
deploy, leaves its queue for PENDING_VERSION (it does not hold back the current version's runs)
and comes back with an executor of its version; an operator's migrate moves such runs to another
version or fails them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from runplane.v1 import worker_service_pb2 as wpb
from runplane_common.errors import FailedPrecondition, InvalidArgument, NotFound
from runplane_scheduler.specs import TriggerSpec
from tests.helpers.engine import ENV, EngineHarness, FakeExecutor, engine_on_sqlite

pytestmark = pytest.mark.timeout(60)

TASK = wpb.TaskDefinition(id="work")


async def _stranded_v1_run(h: EngineHarness) -> tuple[str, str, FakeExecutor]:
    """A v1 executor busy with one run and another v1 run queued behind it; then v2 registers
    (and, promotion being automatic, becomes current) and v1's executor goes away. Returns
    (the busy run, the queued run, v2's executor)."""
    v1 = await h.executor(TASK, capacity=1, version="v1")
    busy, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
    assignment = await v1.next("assignment")
    v1.ack_and_start(assignment.attempt_id)
    queued, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
    await h.status_becomes(queued["id"], "QUEUED")
    assert (await h.run(queued["id"])).worker_version == "v1"
    v2 = await h.executor(TASK, capacity=2, version="v2")
    h.engine.executor_disconnected(v1.state)
    return busy["id"], queued["id"], v2


async def test_a_queued_run_of_a_replaced_version_parks_and_the_queue_moves_on(
    tmp_path: Path,
) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        _, stranded, v2 = await _stranded_v1_run(h)
        parked = await h.status_becomes(stranded, "PENDING_VERSION")
        assert parked.parked_from == "QUEUED" and parked.worker_version == "v1"

        # A run of the current version behind it in the same queue is not held back.
        new, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
        assert (await v2.next("assignment")).run.id == new["id"]

        # v1 is back: the parked run queues again and runs there, still on v1.
        v1_again = await h.executor(TASK, capacity=1, version="v1")
        assignment = await v1_again.next("assignment")
        assert assignment.run.id == stranded
        row = await h.run(stranded)
        assert (row.status, row.worker_version, row.parked_from) == ("DEQUEUED", "v1", None)


async def test_a_queued_run_of_the_current_version_stays_queued_while_its_executors_restart(
    tmp_path: Path,
) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        v1 = await h.executor(TASK, capacity=1, version="v1")
        await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
        v1.ack_and_start((await v1.next("assignment")).attempt_id)
        queued, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
        h.engine.executor_disconnected(v1.state)
        # A new run triggered meanwhile waits in PENDING_VERSION, as before any executor came.
        other, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work"))
        await h.settled()
        assert (await h.run(queued["id"])).status == "QUEUED"
        assert (await h.run(other["id"])).status == "PENDING_VERSION"

        v1_again = await h.executor(TASK, capacity=2, version="v1")
        first = (await v1_again.next("assignment")).run.id
        second = (await v1_again.next("assignment")).run.id
        assert {first, second} == {queued["id"], other["id"]}


async def test_an_operator_moves_a_parked_run_to_another_version_or_fails_it(
    tmp_path: Path,
) -> None:
    async with engine_on_sqlite(tmp_path) as h:
        busy, stranded, v2 = await _stranded_v1_run(h)
        await h.status_becomes(stranded, "PENDING_VERSION")
        pinned, _ = await h.engine.trigger(ENV, TriggerSpec(task_id="work", version="v1"))
        await h.status_becomes(pinned["id"], "PENDING_VERSION")

        # Refused as a whole, changing nothing.
        with pytest.raises(InvalidArgument, match="to_version"):
            await h.engine.migrate_runs(ENV, [stranded], "", "v9")
        with pytest.raises(NotFound, match=r"run_ids\[1\]"):
            await h.engine.migrate_runs(ENV, [stranded, "run_nobody"], "", "v2")
        await h.executor(wpb.TaskDefinition(id="other"), version="v3")
        with pytest.raises(FailedPrecondition, match="does not define task 'work'"):
            await h.engine.migrate_runs(ENV, [stranded], "", "v3")
        assert (await h.run(stranded)).status == "PENDING_VERSION"

        # To v2: it queues there and is assigned to v2's executor. A run asked for that is not
        # parked is skipped.
        moved, skipped = await h.engine.migrate_runs(ENV, [stranded, busy], "", "v2")
        assert (moved, skipped) == ([stranded], [busy])
        assert (await v2.next("assignment")).run.id == stranded
        assert (await h.run(stranded)).worker_version == "v2"

        # Every parked run of v1 fails.
        moved, skipped = await h.engine.migrate_runs(ENV, [], "v1", "")
        assert (moved, skipped) == ([pinned["id"]], [])
        failed = await h.run(pinned["id"])
        assert failed.status == "FAILED"
        assert orjson.loads(failed.error)["type"] == "VERSION_UNAVAILABLE"
