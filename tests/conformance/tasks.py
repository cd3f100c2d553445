"""The conformance tasks, in Python: what every worker implementation under test registers.

Each implementation mirrors these five exactly (ids, payloads, outputs), so the same tests drive
any of them; the Node one is ``clients/node/dist/conformance/worker.js``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from runplane import logger, metadata, task, wait


@task(id="conformance-echo")
async def echo(payload: Any) -> Any:
    """Returns the payload unchanged."""
    return payload


@task(id="conformance-wait")
async def wait_for(payload: dict[str, float]) -> dict[str, float]:
    """A durable wait of ``payload["seconds"]``."""
    await wait.for_(seconds=payload["seconds"])
    return {"waited": payload["seconds"]}


@task(id="conformance-token")
async def wait_for_token(payload: dict[str, str]) -> dict[str, Any]:
    """Waits on the token ``payload["token_id"]``; returns its completion data."""
    result = await wait.for_token(payload["token_id"])
    return {"token": result.unwrap()}


@task(id="conformance-sleep")
async def sleep(payload: dict[str, float]) -> dict[str, float]:
    """A plain (cancellable) sleep of ``payload["seconds"]``: no wait, the attempt keeps running."""
    await asyncio.sleep(payload["seconds"])
    return {"slept": payload["seconds"]}


@task(id="conformance-log")
async def log(payload: Any) -> str:
    """Logs info "hello" and sets metadata {"step": 1}."""
    logger.info("hello")
    metadata.set("step", 1)
    return "ok"
