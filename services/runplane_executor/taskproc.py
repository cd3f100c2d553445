"""The code inside a task process: imports the task modules once, then runs many attempts
concurrently on its event loop (plain ``def`` tasks in threads).

Messages with the executor travel over a multiprocessing pipe as tuples:
executor -> process: ("run", attempt) | ("cancel", attempt_id) | ("stop",)
                     | ("resume", attempt_id, results)
process -> executor: ("ready", task_ids) | ("started", attempt_id) | ("result", attempt_id, result)
                     | ("wait", attempt_id, seq, request)
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import os
import signal
import sys
import threading
import traceback
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from runplane._context import (
    AttemptContext,
    Context,
    EnvironmentContext,
    MachineContext,
    QueueContext,
    RunContext,
    TaskContext,
    set_current_context,
)
from runplane._errors import AbortTaskRunError
from runplane._serde import dumps, loads
from runplane._task import MACHINES, Task, registered_tasks
from runplane._wait import WAITER
from runplane_executor.waits import AttemptWaiter

ENV_TYPES = {"dev": "DEVELOPMENT", "staging": "STAGING", "prod": "PRODUCTION"}


def import_task_modules(modules: list[str]) -> dict[str, Task[Any]]:
    """Import the user's task modules (from the working directory too) and return their tasks."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        importlib.import_module(name)
    return registered_tasks()


def _ms_to_dt(ms: int) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, tz=UTC) if ms else None


def build_context(attempt: dict[str, Any], task: Task[Any]) -> Context:
    run = attempt["run"]
    cpu, memory = MACHINES.get(task.machine, MACHINES["small-1x"])
    slug = attempt.get("environment_slug", "dev")
    return Context(
        run=RunContext(
            id=run["id"],
            tags=run["tags"],
            is_test=run["is_test"],
            is_replay=bool(run.get("replayed_from_run_id")),
            created_at=_ms_to_dt(run["created_at"]),
            started_at=_ms_to_dt(run["started_at"]) or datetime.now(UTC),
            idempotency_key=run["idempotency_key"] or None,
            max_attempts=run["max_attempts"],
            priority=run["priority"],
            parent_run_id=run["parent_run_id"] or None,
            root_run_id=run["root_run_id"] or None,
            batch_id=run["batch_id"] or None,
        ),
        attempt=AttemptContext(
            id=attempt["attempt_id"], number=attempt["number"], started_at=datetime.now(UTC)
        ),
        task=TaskContext(id=task.id),
        queue=QueueContext(name=run["queue"]),
        environment=EnvironmentContext(
            id=f"env_{slug}", slug=slug, type=ENV_TYPES.get(slug, slug.upper())
        ),
        machine=MachineContext(name=task.machine, cpu=cpu, memory=memory),
    )


def error_result(error: BaseException, *, skip_retrying: bool = False) -> dict[str, Any]:
    return {
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "stack_trace": "".join(traceback.format_exception(error)),
        },
        "skip_retrying": skip_retrying,
    }


class TaskProcess:
    """Runs attempts on this process's event loop."""

    def __init__(self, conn: Connection, tasks: dict[str, Task[Any]]) -> None:
        self.conn = conn
        self.tasks = tasks
        self.loop = asyncio.get_running_loop()
        self.running: dict[str, tuple[asyncio.Task[None], Context]] = {}
        self.send_lock = threading.Lock()
        self.stopped = asyncio.Event()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.send_lock:
            self.conn.send(message)

    def receive_forever(self) -> None:
        """Reader thread: hands each message to the event loop."""
        try:
            while True:
                message = self.conn.recv()
                self.loop.call_soon_threadsafe(self.handle, message)
        except (EOFError, OSError):
            self.loop.call_soon_threadsafe(self.stopped.set)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "run":
            attempt = message[1]
            task = self.loop.create_task(self.run_attempt(attempt))
            self.running[attempt["attempt_id"]] = (task, None)  # type: ignore[assignment]
        elif kind == "cancel":
            entry = self.running.get(message[1])
            if entry is not None:
                task, ctx = entry
                if ctx is not None:
                    ctx.signal.trigger("cancelled")
                task.cancel()
        elif kind == "resume":
            entry = self.running.get(message[1])
            if entry is not None and entry[1] is not None:
                entry[1].extra[WAITER].resume(message[2])
        elif kind == "stop":
            self.stopped.set()

    async def run_attempt(self, attempt: dict[str, Any]) -> None:
        from opentelemetry import trace

        from runplane_server import telemetry

        attempt_id = attempt["attempt_id"]
        task = self.tasks.get(attempt["run"]["task_id"])
        try:
            if task is None:
                raise LookupError(
                    f"task {attempt['run']['task_id']!r} is not defined in this executor"
                )
            ctx = build_context(attempt, task)
            ctx.extra[WAITER] = AttemptWaiter(attempt_id, self.send)
            self.running[attempt_id] = (self.running[attempt_id][0], ctx)
            set_current_context(ctx)  # this attempt's asyncio task has its own copy
            self.send(("started", attempt_id))
            with telemetry.tracer().start_as_current_span(
                f"attempt {task.id}",
                context=telemetry.context_from_traceparent(attempt.get("traceparent", "")),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "runplane.run_id": ctx.run.id,
                    "runplane.attempt": ctx.attempt.number,
                    "runplane.task_id": task.id,
                },
            ):
                output = await self.call(task, attempt["run"]["payload"], ctx)
            result: dict[str, Any] = {"output": dumps(output)}
        except asyncio.CancelledError:
            result = {"canceled": True}
        except AbortTaskRunError as error:
            result = error_result(error, skip_retrying=True)
        except Exception as error:
            result = error_result(error)
        finally:
            self.running.pop(attempt_id, None)
        self.send(("result", attempt_id, result))

    async def call(self, task: Task[Any], payload_text: str, ctx: Context) -> Any:
        payload = loads(payload_text)
        model = task.payload_type
        validate = getattr(model, "model_validate", None)
        if validate is not None:
            payload = validate(payload)
        args = (payload, ctx) if task.wants_context else (payload,)
        if task.is_async:
            return await task.fn(*args)
        # The thread sees this attempt's context variables (current_context()).
        thread = self.loop.run_in_executor(None, contextvars.copy_context().run, task.fn, *args)
        try:
            return await asyncio.shield(thread)
        except asyncio.CancelledError:
            # A thread can't be interrupted: report only once it ends. If it never does, the
            # executor kills this process after the cancel grace period.
            await thread
            raise


async def _main(conn: Connection, modules: list[str]) -> None:
    from runplane_server import telemetry

    telemetry.setup("runplane-executor")
    try:
        tasks = import_task_modules(modules)
    except BaseException as error:
        conn.send(("failed", "".join(traceback.format_exception(error))))
        return
    proc = TaskProcess(conn, tasks)
    threading.Thread(target=proc.receive_forever, name="taskproc-reader", daemon=True).start()
    proc.send(("ready", sorted(tasks)))
    await proc.stopped.wait()
    telemetry.shutdown()


def main(conn: Connection, modules: list[str]) -> None:
    """Entry point of a task process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor decides when we stop
    asyncio.run(_main(conn, modules))
    os._exit(0)  # don't wait for threads stuck in user code
