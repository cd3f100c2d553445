"""End to end: schedules with every service its own process, a real executor running the
scheduled tasks of ``examples.scheduled``, and the ``runplane schedules`` CLI.

The scheduler's schedule clock runs 60 times faster than real time
(``RUNPLANE_SCHEDULE_CLOCK_SPEED``), so the minutely schedule ticks every second.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from runplane import Run, RunStatus
from tests.helpers.cluster import Cluster
from tests.helpers.wait import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


CLUSTER_TASKS = "examples.scheduled"


def CLUSTER_ENV() -> dict[str, str]:
    """A schedule clock 60 times faster than real time, starting now."""
    return {
        "RUNPLANE_SCHEDULE_CLOCK_SPEED": "60",
        "RUNPLANE_SCHEDULE_CLOCK_EPOCH_MS": str(time.time_ns() // 1_000_000),
    }


async def test_a_declarative_schedule_runs_its_task_with_the_scheduled_payload(
    cluster: Cluster,
) -> None:
    client = cluster.client()
    found = {s.task_id: s async for s in client.schedules.list()}
    assert set(found) == {"minutely-report", "weekday-digest"}
    assert all(s.type == "DECLARATIVE" and s.active for s in found.values())
    assert found["weekday-digest"].timezone == "Europe/London"

    async def completed() -> Run:
        runs = [r async for r in client.runs.list(task="minutely-report")]
        done = [r for r in runs if r.status is RunStatus.COMPLETED]
        assert done, [r.status for r in runs]
        return done[-1]

    run = await eventually(completed, 90)
    output = run.output
    assert output["schedule_id"] == found["minutely-report"].id
    assert output["type"] == "DECLARATIVE"
    assert output["run"] == run.id
    tick = datetime.fromisoformat(output["timestamp"])
    assert (tick.second, tick.microsecond) == (0, 0)  # the nominal tick
    upcoming = [datetime.fromisoformat(t) for t in output["upcoming"]]
    assert upcoming == [tick + timedelta(minutes=i) for i in range(1, 6)]


async def _cli(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    env = {**cluster.env, "RUNPLANE_SECRET_KEY": cluster.keys["dev"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runplane_cli", "schedules", *args,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_schedules_cli_creates_lists_shows_changes_and_deletes(cluster: Cluster) -> None:
    code, out, err = await _cli(
        cluster, "create", "user-reminder", "--cron", "0 8 * * *",
        "--timezone", "Europe/London", "--external-id", "user-42", "--dedup-key", "r-42",
    )  # fmt: skip
    assert code == 0, err
    schedule_id = out.split()[0]
    assert schedule_id.startswith("sched_") and "'0 8 * * *'" in out and "active" in out
    # The same key updates the one schedule (all of it: the external id is gone).
    code, out, err = await _cli(
        cluster, "create", "user-reminder", "--cron", "30 8 * * *", "--dedup-key", "r-42"
    )
    assert code == 0, err
    assert out.split()[0] == schedule_id

    code, out, _ = await _cli(cluster, "ls", "--task", "user-reminder")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["SCHEDULE", schedule_id]
    code, out, _ = await _cli(cluster, "show", schedule_id)
    assert code == 0
    assert '"cron": "30 8 * * *"' in out and '"external_id": null' in out

    code, out, _ = await _cli(cluster, "deactivate", schedule_id)
    assert code == 0 and "inactive" in out
    code, out, _ = await _cli(cluster, "activate", schedule_id)
    assert code == 0 and " active " in out
    code, out, _ = await _cli(cluster, "delete", schedule_id)
    assert code == 0
    code, _, err = await _cli(cluster, "show", schedule_id)
    assert code != 0 and "not found" in err

    # Bad input: a clear one-line error and a non-zero exit, nothing made.
    code, _, err = await _cli(cluster, "create", "user-reminder", "--cron", "61 * * * *")
    assert code != 0
    assert err.count("\n") == 1 and "cron" in err and "minute '61'" in err
    code, _, err = await _cli(
        cluster, "create", "user-reminder", "--cron", "0 * * * *", "--timezone", "Moon/Base"
    )
    assert code != 0 and "timezone" in err and "Moon/Base" in err
    code, out, _ = await _cli(cluster, "ls", "--task", "user-reminder")
    assert code == 0 and out.split() == [
        "SCHEDULE",
        "TASK",
        "CRON",
        "TIMEZONE",
        "STATE",
        "NEXT",
        "TYPE",
    ]
