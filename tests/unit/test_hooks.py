"""Hooks, catch_error, timeouts and metadata inside a task process, driven in memory (the pipe is
a list), plus the pure pieces: metadata operations, catch_error results, retry options."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

import runplane.worker._process as taskproc
from runplane import AbortTaskRunError, CatchErrorResult, ConfigurationError, Context, Outcome
from runplane import metadata as md
from runplane._hooks import Hooks
from runplane._task import RetryOptions, Task, task
from runplane.worker import Kind, Run, Timeout
from runplane_core.metadata import apply_operations

pytestmark = pytest.mark.timeout(30)


class Pipe:
    """What the task process sends, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.sent.append(message)

    def kinds(self) -> list[str]:
        return [m[0] for m in self.sent]


def attempt(t: Task[Any], payload: str = "{}", number: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "attempt_id": f"attempt_{t.id}_{number}",
        "number": number,
        "traceparent": "",
        "environment_slug": "dev",
        "environment_id": "env_dev",
        "machine": t.machine_name,
        "memory_limit": 0,
        "max_duration": 0,
        "oom_retry_machine": "",
        "run": {
            "id": f"run_{t.id}",
            "task_id": t.id,
            "payload": payload,
            "metadata": '{"a": 1}',
            "tags": [],
            "is_test": False,
            "created_at": 0,
            "started_at": 0,
            "idempotency_key": "",
            "max_attempts": 2,
            "priority": 0,
            "parent_run_id": "run_parent",
            "root_run_id": "run_root",
            "batch_id": "",
            "queue": f"task/{t.id}",
            "replayed_from_run_id": "",
        },
        **extra,
    }


async def run(t: Task[Any], a: dict[str, Any], *, then: Any = None) -> tuple[dict[str, Any], Pipe]:
    pipe = Pipe()
    proc = taskproc.TaskProcess(pipe, {t.id: t})  # type: ignore[arg-type]
    proc.handle(Run(Kind.RUN, a))
    if then is not None:
        await asyncio.sleep(0.05)
        proc.handle(then)
    for _ in range(500):
        if "result" in pipe.kinds():
            break
        await asyncio.sleep(0.01)
    result = next(m for m in pipe.sent if m[0] == "result")
    return result[2], pipe


@pytest.fixture(autouse=True)
def no_global_hooks(monkeypatch: pytest.MonkeyPatch) -> Hooks:
    hooks = Hooks()
    monkeypatch.setattr(taskproc, "GLOBAL_HOOKS", hooks)
    return hooks


async def test_hooks_run_in_order_and_a_failing_on_success_is_only_logged(
    no_global_hooks: Hooks,
) -> None:
    calls: list[str] = []

    async def mw(payload: Any, ctx: Context, next: Any) -> Any:
        calls.append("middleware")
        return await next()

    no_global_hooks.add("middleware", mw)
    no_global_hooks.add("on_success", lambda p, o, ctx: calls.append("global_on_success"))

    @task(id="unit-order", init=lambda p, ctx: calls.append("init") or 7)
    async def t(payload: Any, ctx: Context) -> Any:
        calls.append("run")
        return ctx.init

    t.on_start(lambda p, ctx: calls.append("on_start"))
    t.on_start_attempt(lambda p, ctx: calls.append("on_start_attempt"))

    @t.on_success
    async def boom(payload: Any, output: Any, ctx: Context) -> None:
        calls.append(f"on_success({output})")
        raise RuntimeError("boom")

    @t.on_complete
    async def complete(payload: Any, outcome: Outcome, ctx: Context) -> None:
        calls.append(f"on_complete({outcome.ok})")

    t.cleanup(lambda p, ctx: calls.append("cleanup"))
    result, pipe = await run(t, attempt(t))
    assert result == {"output": "7"}
    assert calls == [
        "middleware", "init", "on_start", "on_start_attempt", "run",
        "global_on_success", "on_success(7)", "on_complete(True)", "cleanup",
    ]  # fmt: skip
    logs = [e for m in pipe.sent if m[0] == "logs" for e in m.entries]
    assert [e["level"] for e in logs] == ["error"]
    assert "on_success" in logs[0]["message"] and "boom" in logs[0]["message"]
    assert pipe.kinds().index("logs") < pipe.kinds().index("result")


async def test_on_start_runs_on_the_first_attempt_only() -> None:
    calls: list[str] = []

    @task(id="unit-on-start", on_start=lambda p, ctx: calls.append(f"on_start{ctx.attempt.number}"))
    async def t(payload: Any) -> None:
        return None

    await run(t, attempt(t, number=2))
    assert calls == []


async def test_catch_error_task_hook_first_then_global_first_answer_wins(
    no_global_hooks: Hooks,
) -> None:
    seen: list[str] = []

    def task_hook(payload: Any, error: Exception, ctx: Context) -> None:
        seen.append("task")

    def global_hook(payload: Any, error: Exception, ctx: Context) -> dict[str, Any]:
        seen.append("global")
        return {"retry_delay": 2.5, "error": KeyError("replaced")}

    no_global_hooks.add("catch_error", global_hook)
    no_global_hooks.add("catch_error", lambda p, e, ctx: seen.append("never"))

    @task(id="unit-catch", catch_error=task_hook)
    async def t(payload: Any) -> None:
        raise RuntimeError("original")

    result, _ = await run(t, attempt(t))
    assert seen == ["task", "global"]
    assert result["retry_delay_ms"] == 2500
    assert result["skip_retrying"] is False
    assert result["error"]["type"] == "KeyError"


async def test_on_failure_only_when_the_run_will_not_be_retried() -> None:
    failures: list[int] = []

    @task(id="unit-failure", on_failure=lambda p, e, ctx: failures.append(ctx.attempt.number))
    async def t(payload: Any) -> None:
        raise RuntimeError("nope")

    await run(t, attempt(t, number=1))  # max_attempts 2: retried
    assert failures == []
    await run(t, attempt(t, number=2))
    assert failures == [2]


async def test_abort_and_skip_retrying_are_not_retried_and_call_on_failure() -> None:
    failures: list[str] = []

    @task(id="unit-abort", on_failure=lambda p, e, ctx: failures.append(type(e).__name__))
    async def t(payload: Any) -> None:
        raise AbortTaskRunError("stop")

    result, _ = await run(t, attempt(t))
    assert result["skip_retrying"] is True
    assert failures == ["AbortTaskRunError"]


async def test_an_init_error_fails_the_attempt_like_a_run_error() -> None:
    ran: list[str] = []

    def init(payload: Any, ctx: Context) -> None:
        raise ValueError("no database")

    @task(id="unit-init-fails", init=init)
    async def t(payload: Any) -> None:
        ran.append("run")

    result, _ = await run(t, attempt(t))
    assert result["error"]["type"] == "ValueError"
    assert result["skip_retrying"] is False
    assert ran == []


async def test_memory_error_is_out_of_memory_retried_only_on_a_named_machine() -> None:
    @task(id="unit-oom")
    async def t(payload: Any) -> None:
        raise MemoryError()

    result, _ = await run(t, attempt(t))
    assert result["out_of_memory"] is True and result["skip_retrying"] is True
    assert result["error"]["type"] == "OutOfMemoryError"
    result, _ = await run(t, attempt(t, oom_retry_machine="large-1x"))
    assert result["skip_retrying"] is False and result["retry_machine"] == "large-1x"


async def test_timeout_fires_the_signal_and_reports_timed_out_without_hooks() -> None:
    calls: list[str] = []

    @task(id="unit-timeout", cleanup=lambda p, ctx: calls.append("cleanup"))
    async def t(payload: Any, ctx: Context) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            calls.append(f"signal({ctx.signal.reason})")

    a = attempt(t, max_duration=1)
    pipe = Pipe()
    proc = taskproc.TaskProcess(pipe, {t.id: t})  # type: ignore[arg-type]
    proc.handle(Run(Kind.RUN, a))
    await asyncio.sleep(0.05)
    proc.running[a["attempt_id"]].ctx.signal.trigger("timeout")  # type: ignore[union-attr]
    proc.handle(Timeout(Kind.TIMEOUT, a["attempt_id"]))
    for _ in range(500):
        if "result" in pipe.kinds():
            break
        await asyncio.sleep(0.01)
    result = next(m for m in pipe.sent if m[0] == "result")[2]
    assert result["timed_out"] is True and result["skip_retrying"] is True
    assert result["error"]["type"] == "MaxDurationExceededError"
    assert calls == ["signal(timeout)"]


async def test_metadata_updates_are_one_flush_per_run_before_the_result() -> None:
    @task(id="unit-metadata")
    async def t(payload: Any) -> Any:
        md.set("x", 1).increment("n", 2).append("log", "a")
        md.parent.set("from_child", True)
        md.root.increment("children")
        return md.current()

    result, pipe = await run(t, attempt(t))
    assert result == {"output": '{"a":1,"x":1,"n":2,"log":["a"]}'}
    updates = [m for m in pipe.sent if m[0] == "metadata"]
    assert [(u[2]["run_id"], len(u[2]["operations"])) for u in updates] == [
        ("run_unit-metadata", 3),
        ("run_parent", 1),
        ("run_root", 1),
    ]
    assert pipe.kinds().index("metadata") < pipe.kinds().index("result")


def test_metadata_calls_outside_a_run_are_no_ops() -> None:
    md.set("x", 1).append("y", 2)
    md.parent.set("z", 3)
    assert md.get("x") is None
    assert md.current() == {}


def test_metadata_operations() -> None:
    doc = {"n": 1, "list": [1, 2, 1], "scalar": "s"}
    ops = [
        ("increment", "n", 2),
        ("increment", "new", -1),
        ("append", "list", 3),
        ("append", "scalar", "t"),
        ("append", "fresh", "x"),
        ("remove", "list", 1),
        ("set", "k", {"v": True}),
        ("delete", "n", None),
    ]
    assert apply_operations(doc, ops) == {
        "list": [2, 3],
        "scalar": ["s", "t"],
        "new": -1,
        "fresh": ["x"],
        "k": {"v": True},
    }
    assert doc["n"] == 1  # not changed in place
    assert apply_operations(doc, [("replace", "", {"only": 1})]) == {"only": 1}
    with pytest.raises(ValueError):
        apply_operations(doc, [("explode", "k", 1)])
    with pytest.raises(TypeError):
        apply_operations(doc, [("increment", "scalar", "x")])


def test_catch_error_results_parse_from_dicts_and_refuse_unknown_keys() -> None:
    assert CatchErrorResult.parse({"skip_retrying": True}) == CatchErrorResult(skip_retrying=True)
    with pytest.raises(TypeError):
        CatchErrorResult.parse({"retry_in": 3})
    with pytest.raises(TypeError):
        CatchErrorResult.parse(42)


def test_middleware_must_be_async() -> None:
    with pytest.raises(TypeError):
        Hooks().add("middleware", lambda payload, ctx, next: next())
    with pytest.raises(ValueError):
        Hooks().add("on_wait_forever", lambda: None)


def test_retry_out_of_memory_names_a_known_machine() -> None:
    options = RetryOptions.parse({"max_attempts": 2, "out_of_memory": {"machine": "large-1x"}})
    assert options.out_of_memory_machine == "large-1x"
    assert RetryOptions.parse({}).out_of_memory_machine is None
    with pytest.raises(ConfigurationError):
        RetryOptions.parse({"out_of_memory": {"machine": "huge"}})


class Order(BaseModel):
    quantity: int


async def test_a_payload_that_fails_validation_is_not_retried() -> None:
    @task(id="unit-validated")
    async def t(payload: Order) -> int:
        return payload.quantity

    result, _ = await run(t, attempt(t, payload='{"quantity": "many"}'))
    assert result["skip_retrying"] is True
    assert result["error"]["type"] == "PayloadValidationError"
    assert "quantity" in result["error"]["message"]
    result, _ = await run(t, attempt(t, payload='{"quantity": 3}'))
    assert result == {"output": "3"}
