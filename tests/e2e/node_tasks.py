"""Python tasks beside the Node worker (clients/node): children a Node task waits for, and the
realtime tasks the Node client's suite reads streams of."""

from __future__ import annotations

from runplane import Context, queue, task
from tests.e2e.realtime_tasks import stream_words  # noqa: F401  (registered for the executor)

# A queue the Node client's suite pauses, overrides and resets.
node_queue = queue(name="node-client-queue", concurrency_limit=3)


@task(id="py-child")
async def py_child(payload: dict[str, int], ctx: Context) -> dict[str, object]:
    """Doubles ``payload["n"]``; says whose child it is."""
    return {"doubled": payload["n"] * 2, "parent": ctx.run.parent_run_id}


@task(id="py-queued", queue=node_queue)
async def py_queued(payload: object, ctx: Context) -> object:
    return payload
