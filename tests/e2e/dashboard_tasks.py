"""Tasks for the dashboard's browser tests: a parent with a duration wait, a child run, a token
wait and log lines (a full waterfall), and a task that sleeps until cancelled."""

from __future__ import annotations

import asyncio

from runplane import Context, logger, task, wait


@task(id="dash-child")
async def dash_child(payload: dict[str, str], ctx: Context) -> str:
    logger.info("child working", parent=ctx.run.parent_run_id or "")
    await asyncio.sleep(0.3)
    return f"child of {payload['parent']}"


@task(id="dash-parent")
async def dash_parent(payload: dict[str, str], ctx: Context) -> dict[str, object]:
    """Logs, waits half a second, waits for a child run, then for the token in the payload."""
    logger.info("parent starting", token=payload["token"])
    await wait.for_(seconds=0.5)
    child = await dash_child.trigger_and_wait({"parent": ctx.run.id})
    logger.warning("the child is done; waiting for the token")
    token = await wait.for_token(payload["token"])
    logger.info("token completed", data=token.unwrap())
    return {"child": child.unwrap(), "token": token.unwrap()}


@task(id="dash-sleepy")
async def dash_sleepy(payload: dict[str, float]) -> str:
    logger.info("sleeping", seconds=payload["seconds"])
    await asyncio.sleep(payload["seconds"])
    return "woke up"
