"""Tasks for the version tests (``--tasks tests.e2e.version_tasks``): each answers with the
worker version of the code that ran it."""

from __future__ import annotations

from typing import Any

from runplane import Context, task, wait


@task(id="version-echo")
async def version_echo(payload: Any, ctx: Context) -> dict[str, Any]:
    return {"version": ctx.version, "deployment": ctx.deployment.version}


@task(id="version-waiter", retry={"max_attempts": 1})
async def version_waiter(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Waits on the token in the payload; answers with its version and the token's data."""
    result = await wait.for_token(payload["token"])
    return {"version": ctx.version, "data": result.output, "attempt": ctx.attempt.number}
