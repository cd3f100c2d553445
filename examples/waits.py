"""Tasks that wait: durations, tokens and child runs (used by tests/e2e/test_waits.py and
tests/faults/test_wait_faults.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from runplane import Context, batch, queue, task, wait

one_at_a_time = queue(name="one-at-a-time", concurrency_limit=1)


@task(id="sleeper", queue=one_at_a_time)
async def sleeper(payload: dict[str, Any]) -> dict[str, float]:
    """Waits ``seconds`` durably; returns when it started and resumed (epoch seconds)."""
    before = time.time()
    await wait.for_(seconds=payload["seconds"])
    return {"before": before, "after": time.time()}


@task(id="quick", queue=one_at_a_time)
async def quick(payload: Any) -> dict[str, float]:
    return {"at": time.time()}


@task(id="token-waiter")
async def token_waiter(payload: dict[str, Any]) -> dict[str, Any]:
    """Waits on the token in the payload, or on a new one with ``timeout``."""
    token_id = payload.get("token")
    if token_id is None:
        token = await wait.create_token(timeout=payload["timeout"])
        token_id = token.id
    result = await wait.for_token(token_id)
    if result.ok:
        return {"ok": True, "output": result.output}
    return {"ok": False, "error": type(result.error).__name__, "message": str(result.error)}


@task(id="child", retry={"max_attempts": 1})
async def child(payload: dict[str, Any]) -> Any:
    if payload.get("fail"):
        raise ValueError(f"child {payload.get('n')} failed on purpose")
    if payload.get("seconds"):
        await asyncio.sleep(payload["seconds"])
    return {"n": payload.get("n"), "double": 2 * payload.get("n", 0)}


@task(id="parent")
async def parent(payload: dict[str, Any]) -> Any:
    """``mode``: one (trigger_and_wait), batch (batch_trigger_and_wait), gather (three
    trigger_and_wait at once), unwrap (unwrap a failed child's result)."""
    mode = payload["mode"]
    tag = payload.get("tag", "children")
    if mode == "one":
        r = await child.trigger_and_wait(payload["child"], tags=[tag])
        return {"ok": r.ok, "output": r.output, "error": str(r.error) if r.error else None}
    if mode == "unwrap":
        r = await child.trigger_and_wait({"n": 1, "fail": True}, tags=[tag])
        try:
            r.unwrap()
        except Exception as error:
            return {"raised": type(error).__name__, "message": str(error)}
        return {"raised": None}
    if mode == "batch":
        results = await child.batch_trigger_and_wait(
            [{"payload": {"n": i}, "options": {"tags": [tag]}} for i in range(payload["count"])]
        )
        return [r.output["n"] if r.ok else None for r in results]
    if mode == "batch-by-id":
        results = await batch.trigger_and_wait(
            [{"id": "child", "payload": {"n": i, "fail": i == 1}} for i in range(3)]
        )
        return [{"ok": r.ok, "output": r.output} for r in results]
    if mode == "gather":
        results = await asyncio.gather(
            child.trigger_and_wait({"n": 1, "seconds": 0.5}, tags=[tag]),
            child.trigger_and_wait({"n": 2}, tags=[tag]),
            wait.for_(seconds=1),
            child.trigger_and_wait({"n": 3, "seconds": 0.2}, tags=[tag]),
        )
        return [r.output["n"] for r in results if r is not None]
    raise ValueError(f"unknown mode {mode!r}")


@task(id="child-then-token")
async def child_then_token(payload: dict[str, Any]) -> Any:
    """Triggers a child and waits for it, then waits on a token: the durability test's run."""
    first = await child.trigger_and_wait({"n": 21}, tags=[payload["tag"]])
    second = await wait.for_token(payload["token"])
    return {"child": first.unwrap(), "token": second.unwrap()}


@task(id="keyed-sleeper", retry={"max_attempts": 2, "min_timeout": 0.1, "randomize": False})
async def keyed_sleeper(payload: dict[str, Any], ctx: Context) -> int:
    """Attempt 1 waits with an idempotency key and fails; attempt 2 (a retry: a fresh journal)
    waits with the same key again, which ends when the first wait ended."""
    await wait.for_(seconds=payload["seconds"], idempotency_key="keyed-sleep")
    if ctx.attempt.number == 1:
        raise RuntimeError("fail the first attempt after its wait")
    return ctx.attempt.number


@task(id="pid-then-token")
async def pid_then_token(payload: dict[str, Any]) -> Any:
    """Writes its task process's pid to ``pid_file``, then waits on the token: the test kills
    that process while the run waits."""
    first = await child.trigger_and_wait({"n": 5}, tags=[payload["tag"]])
    Path(payload["pid_file"]).write_text(str(os.getpid()))
    second = await wait.for_token(payload["token"])
    return {"child": first.unwrap(), "token": second.unwrap()}


_HOOK_CALLS: dict[str, list[str]] = {}


def _record(name: str) -> Any:
    def hook(payload: Any, wait: dict[str, Any], ctx: Context) -> None:
        _HOOK_CALLS.setdefault(ctx.run.id, []).append(f"{name}:{wait['type']}")

    return hook


@task(id="hooked-wait", on_wait=_record("on_wait"), on_resume=_record("on_resume"))
async def hooked_wait(payload: Any, ctx: Context) -> list[str]:
    """Waits twice; returns the on_wait/on_resume calls it saw (they run in this process)."""
    await wait.for_(seconds=0.2)
    _HOOK_CALLS.setdefault(ctx.run.id, []).append("between")
    await wait.for_(seconds=0.2)
    return _HOOK_CALLS.pop(ctx.run.id, [])


def _note_cancel(payload: dict[str, Any], ctx: Context) -> None:
    Path(payload["file"]).write_text(f"attempt={ctx.attempt.number} signal={ctx.signal.cancelled}")


@task(id="cancel-hooked", queue=one_at_a_time, on_cancel=_note_cancel)
async def cancel_hooked(payload: dict[str, Any]) -> None:
    """Waits on a token that never comes; its on_cancel hook writes ``payload["file"]``."""
    token = await wait.create_token()
    await wait.for_token(token)
