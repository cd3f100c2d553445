"""Tasks for tests/e2e/test_evict.py: each execution of a run appends what it did (its start,
its hooks) to ``<dir>/<run id>``, so the test can count executions and check the hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runplane import Context, task, wait


def _note(payload: dict[str, Any], ctx: Context, line: str) -> None:
    with (Path(payload["dir"]) / ctx.run.id).open("a") as f:
        f.write(f"{line}\n")


def _hook(name: str) -> Any:
    def hook(payload: dict[str, Any], *args: Any) -> None:
        ctx = args[-1]
        what = f":{args[0]['type']}" if name in ("on_wait", "on_resume") else ""
        _note(payload, ctx, f"{name}{what}")

    return hook


@task(id="evict-child", retry={"max_attempts": 1})
async def evict_child(payload: dict[str, Any]) -> dict[str, int]:
    return {"double": 2 * payload["n"]}


@task(
    id="evict-parent",
    retry={"max_attempts": 3},
    on_wait=_hook("on_wait"),
    on_resume=_hook("on_resume"),
    on_success=_hook("on_success"),
    on_failure=_hook("on_failure"),
    on_cancel=_hook("on_cancel"),
    cleanup=_hook("cleanup"),
)
async def evict_parent(payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Triggers a child and waits for it (journaled), then waits on ``token`` or for
    ``seconds``."""
    _note(payload, ctx, f"start attempt={ctx.attempt.number}")
    child = await evict_child.trigger_and_wait({"n": payload["n"]}, tags=[payload["tag"]])
    got = None
    if "token" in payload:
        got = (await wait.for_token(payload["token"])).unwrap()
    else:
        await wait.for_(seconds=payload["seconds"])
    return {"n": payload["n"], "child": child.unwrap(), "token": got}
