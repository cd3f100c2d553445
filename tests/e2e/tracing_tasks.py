"""Tasks for the tracing end-to-end test: a parent that waits on two children, one of which
fails once and is retried."""

from __future__ import annotations

from typing import Any

from examples.hello import flaky, hello_world  # noqa: F401  (registered for the executor)
from runplane import task


@task(id="trace-parent")
async def trace_parent(payload: Any) -> list[str]:
    """Waits on two ``flaky`` children: the first succeeds at once, the second on its retry.
    Returns the children's run ids in item order."""
    results = await flaky.batch_trigger_and_wait(
        [{"payload": {"succeed_on": 1}}, {"payload": {"succeed_on": 2}}]
    )
    assert all(r.ok for r in results), [str(r.error) for r in results]
    return [r.id for r in results]
