"""Tasks that exercise the run engine's queueing rules (used by
tests/e2e/test_triggering_and_queueing.py).

The tasks record what they see in files named by their payload, so a test reads what actually
happened inside the executor rather than inferring it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from runplane import Context, queue, task

limited = queue(name="limited", concurrency_limit=2)
per_key = queue(name="per-key", concurrency_limit=1)
serial = queue(name="serial", concurrency_limit=1)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[dict[str, Any]]:
    """The JSON state in ``path``, read and written back under an exclusive lock."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(Path(path).read_text()) if os.path.exists(path) else {}
        yield state
        Path(path).write_text(json.dumps(state))


@contextlib.contextmanager
def _counted(path: str, key: str) -> Iterator[None]:
    """Count this run as executing under ``key`` (and in total) while the block runs,
    recording the highest counts seen."""
    with _locked(path) as s:
        for k in (key, "*"):
            s[k] = s.get(k, 0) + 1
            s[f"max:{k}"] = max(s.get(f"max:{k}", 0), s[k])
    try:
        yield
    finally:
        with _locked(path) as s:
            for k in (key, "*"):
                s[k] -= 1


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


async def _hold(payload: dict[str, Any]) -> None:
    """Sleep ``seconds``, or until the file ``release`` exists."""
    if release := payload.get("release"):
        while not os.path.exists(release):
            await asyncio.sleep(0.02)
    else:
        await asyncio.sleep(payload.get("seconds", 0.3))


@task(id="limited-work", queue=limited)
async def limited_work(payload: dict[str, Any], ctx: Context) -> str:
    with _counted(payload["file"], "limited"):
        await _hold(payload)
    return ctx.run.id


@task(id="per-key-work", queue=per_key)
async def per_key_work(payload: dict[str, Any], ctx: Context) -> str:
    with _counted(payload["file"], payload["key"]):
        await _hold(payload)
    return payload["key"]


@task(id="serial-work", queue=serial)
async def serial_work(payload: dict[str, Any], ctx: Context) -> str:
    """Appends its label to ``order`` when it starts, then holds the queue's one slot."""
    if order := payload.get("order"):
        _append(order, payload["label"])
    await _hold(payload)
    return str(payload.get("label", ""))


@task(id="echo")
async def echo(payload: Any, ctx: Context) -> dict[str, Any]:
    return {"payload": payload, "is_replay": ctx.run.is_replay, "attempt": ctx.attempt.number}


@task(id="always-fails", retry={"max_attempts": 1})
async def always_fails(payload: Any) -> None:
    raise RuntimeError("no")


@task(id="parent-of-sleeper")
async def parent_of_sleeper(payload: dict[str, Any], ctx: Context) -> str:
    """Triggers a long child run (its child, through the SDK inside the run), then sleeps."""
    child = await echo_sleeper.trigger({"seconds": payload.get("seconds", 60)})
    if path := payload.get("child_file"):
        Path(path).write_text(child.id)
    await asyncio.sleep(payload.get("seconds", 60))
    return child.id


@task(id="echo-sleeper")
async def echo_sleeper(payload: dict[str, Any]) -> float:
    await asyncio.sleep(payload.get("seconds", 60))
    return float(payload.get("seconds", 60))


rated = queue(name="rated", rate_limit={"limit": 2, "period": "1s"})
capped = queue(name="capped", concurrency_limit=2, total_concurrency_limit=3)


@task(id="rated-work", queue=rated)
async def rated_work(payload: dict[str, Any]) -> float:
    """Records when it started (wall clock) in ``file``."""
    started = time.time()
    _append(payload["file"], repr(started))
    return started


@task(id="capped-work", queue=capped)
async def capped_work(payload: dict[str, Any]) -> str:
    with _counted(payload["file"], payload["key"]):
        await _hold(payload)
    return payload["key"]


@task(id="short-lived", queue=serial, ttl="1s")
async def short_lived(payload: Any) -> Any:
    return payload


@task(id="debounced")
async def debounced(payload: Any) -> Any:
    return payload


class Order(BaseModel):
    sku: str
    quantity: int


@task(id="typed-order")
async def typed_order(payload: Order) -> int:
    """Its payload model's JSON Schema is registered: bad payloads never make a run."""
    return payload.quantity


@task(id="big-output", retry={"max_attempts": 3, "min_timeout": 0.1})
async def big_output(payload: dict[str, int]) -> str:
    return "x" * payload["size"]
