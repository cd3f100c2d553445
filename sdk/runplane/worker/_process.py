"""The code inside a task process: imports the task modules once, then runs many attempts
concurrently on its event loop (plain ``def`` tasks in threads), with their hooks (see
``runplane._hooks`` for the order and error rules).

Messages with the executor travel over a multiprocessing pipe (see ``_messages``). An attempt's
metadata and logs are sent before its result, so the scheduler applies them first.

An evicted attempt (a waiting one the executor drops from memory) is cancelled at its wait: its
``finally`` blocks and ``cleanup`` hooks run (they close what this execution opened; a replay runs
init and middleware again), no other hook does, ``ctx.signal`` does not fire, and it is reported
lost, so the scheduler replays the run when its waits complete.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import os
import resource
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from opentelemetry import trace

from runplane import telemetry
from runplane._context import (
    AttemptContext,
    Context,
    DeploymentContext,
    EnvironmentContext,
    MachineContext,
    QueueContext,
    RunContext,
    TaskContext,
    set_current_context,
)
from runplane._errors import AbortTaskRunError
from runplane._hooks import GLOBAL_HOOKS, CatchErrorResult, Outcome, call_hook
from runplane._logger import logger
from runplane._metadata import AttemptMetadata
from runplane._serde import dumps, loads
from runplane._task import DEFAULT_MACHINE, MACHINES, Task, registered_tasks
from runplane._wait import WAITER
from runplane.worker._messages import (
    Attempt,
    AttemptResult,
    Cancel,
    CancelHooks,
    ErrorInfo,
    Evict,
    Failed,
    FromProcess,
    Kind,
    Logs,
    Metadata,
    Ready,
    Result,
    Resume,
    Run,
    Started,
    Stop,
    Timeout,
    ToProcess,
)
from runplane.worker._waiter import AttemptWaiter

log = logging.getLogger("runplane.executor.taskproc")

FLUSH_INTERVAL = 1.0  # seconds between flushes of buffered metadata and logs (reference §9.2)
MAX_ATTEMPTS_CAP = 250
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


def build_context(attempt: Attempt, task: Task[Any]) -> Context:
    run = attempt["run"]
    machine = attempt.get("machine") or task.machine_name
    cpu, memory = MACHINES.get(machine, MACHINES[DEFAULT_MACHINE])
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
            max_duration=attempt.get("max_duration", 0),
        ),
        attempt=AttemptContext(
            id=attempt["attempt_id"], number=attempt["number"], started_at=datetime.now(UTC)
        ),
        task=TaskContext(id=task.id),
        queue=QueueContext(name=run["queue"]),
        environment=EnvironmentContext(
            id=attempt.get("environment_id") or f"env_{slug}",
            slug=slug,
            type=ENV_TYPES.get(slug, slug.upper()),
        ),
        machine=MachineContext(name=machine, cpu=cpu, memory=memory),
        deployment=DeploymentContext(version=attempt.get("version", "")),
    )


def error_info(error: BaseException) -> ErrorInfo:
    return {
        "type": type(error).__name__,
        "message": str(error),
        "stack_trace": "".join(traceback.format_exception(error)),
    }


def error_result(error: BaseException, *, skip_retrying: bool = False) -> AttemptResult:
    return {"error": error_info(error), "skip_retrying": skip_retrying}


def timeout_result(max_duration: float) -> AttemptResult:
    return {
        "error": {
            "type": "MaxDurationExceededError",
            "message": f"the attempt ran longer than its max_duration of {max_duration:g} s",
            "stack_trace": "",
        },
        "skip_retrying": True,
        "timed_out": True,
    }


# The result of an evicted attempt: lost, so the scheduler replays the run (not a failure).
EVICTED: AttemptResult = {"lost": True, "evicted": True}


class PayloadValidationError(Exception):
    """The payload does not match the task's payload model: never retried."""


@dataclass
class _Attempt:
    attempt: Attempt
    task: asyncio.Task[None] | None = None
    ctx: Context | None = None
    timed_out: bool = False
    cancelling: bool = False
    evicted: bool = False


# The scheduler's default output limit (RUNPLANE_LIMIT_OUTPUT_BYTES); the executor passes the
# one it is configured with.
DEFAULT_OUTPUT_LIMIT = 10 * 1024 * 1024


class OutputTooLargeError(AbortTaskRunError):
    """A task returned more than the output limit (not retried: it would again)."""


def check_output_size(text: str, limit: int) -> None:
    """The scheduler refuses larger outputs too; checked here so the run fails with a clear
    error."""
    if len(text) * 4 <= limit:  # at most 4 bytes a character: surely within
        return
    size = len(text.encode())
    if size > limit:
        raise OutputTooLargeError(
            f"the output is {size} bytes, over the output limit of {limit} bytes"
        )


class TaskProcess:
    """Runs attempts on this process's event loop."""

    def __init__(
        self,
        conn: Connection,
        tasks: dict[str, Task[Any]],
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        self.conn = conn
        self.tasks = tasks
        self.output_limit = output_limit
        self.loop = asyncio.get_running_loop()
        self.running: dict[str, _Attempt] = {}
        self.send_lock = threading.Lock()
        self.stopped = asyncio.Event()
        self.logs: list[dict[str, Any]] = []
        self.logs_lock = threading.Lock()
        self._background: set[asyncio.Task[Any]] = set()

    def send(self, message: FromProcess) -> None:
        with self.send_lock:
            self.conn.send(message)

    def receive_forever(self) -> None:
        """Reader thread: raises signals at once (even while user code blocks the event loop),
        then hands each message to the event loop."""
        try:
            while True:
                message: ToProcess = self.conn.recv()
                if isinstance(message, Cancel | Timeout):
                    entry = self.running.get(message.attempt_id)
                    if entry is not None and entry.ctx is not None:
                        entry.ctx.signal.trigger(
                            "cancelled" if message.kind == Kind.CANCEL else "timeout"
                        )
                self.loop.call_soon_threadsafe(self.handle, message)
        except (EOFError, OSError):
            self.loop.call_soon_threadsafe(self.stopped.set)

    def handle(self, message: ToProcess) -> None:
        entry: _Attempt | None
        match message:
            case Run(attempt=attempt):
                entry = _Attempt(attempt)
                self.running[attempt["attempt_id"]] = entry
                entry.task = self.loop.create_task(self.run_attempt(entry))
            case Cancel(attempt_id=attempt_id):
                entry = self.running.get(attempt_id)
                if entry is not None and not entry.cancelling:
                    entry.cancelling = True
                    self._spawn(self.cancel_attempt(entry))
            case CancelHooks(attempt=attempt):
                self._spawn(self.cancel_hooks(attempt))
            case Timeout(attempt_id=attempt_id):
                entry = self.running.get(attempt_id)
                if entry is not None and entry.task is not None:
                    entry.timed_out = True
                    entry.task.cancel()
            case Resume(attempt_id=attempt_id, results=results):
                entry = self.running.get(attempt_id)
                if entry is not None and entry.ctx is not None and not entry.evicted:
                    entry.ctx.extra[WAITER].resume(results)
            case Evict(attempt_id=attempt_id):
                entry = self.running.get(attempt_id)
                if entry is not None and entry.task is not None and entry.ctx is not None:
                    entry.evicted = True
                    entry.ctx.extra[WAITER].evicted = True
                    entry.task.cancel()
            case Stop():
                self.stopped.set()

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- metadata and logs -------------------------------------------------------------------

    def log_sink(self, entry: dict[str, Any]) -> None:
        with self.logs_lock:
            self.logs.append(entry)

    def flush_metadata(self, attempt_id: str) -> None:
        entry = self.running.get(attempt_id)
        md = entry.ctx.extra.get("metadata") if entry and entry.ctx else None
        if isinstance(md, AttemptMetadata):
            for run_id, operations in md.take_pending().items():
                self.send(
                    Metadata(
                        Kind.METADATA,
                        attempt_id,
                        {
                            "run_id": run_id,
                            # Encoded here, where the values are, not on the executor's loop.
                            "operations": [
                                (op, key, dumps(value)) for op, key, value in operations
                            ],
                        },
                    )
                )

    def flush_logs(self) -> None:
        with self.logs_lock:
            entries, self.logs = self.logs, []
        if entries:
            self.send(Logs(Kind.LOGS, entries))

    async def flush_forever(self) -> None:
        """About once a second: each attempt's metadata updates (one update per run) and logs."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            for attempt_id in list(self.running):
                self.flush_metadata(attempt_id)
            self.flush_logs()

    # -- one attempt ---------------------------------------------------------------------------

    async def run_attempt(self, entry: _Attempt) -> None:
        attempt = entry.attempt
        attempt_id = attempt["attempt_id"]
        task = self.tasks.get(attempt["run"]["task_id"])
        result: AttemptResult
        if task is None:
            error = LookupError(f"task {attempt['run']['task_id']!r} is not defined here")
            result = error_result(error, skip_retrying=True)
        else:
            ctx = build_context(attempt, task)
            ctx.extra.update(
                metadata=AttemptMetadata(ctx.run.id, loads(attempt["run"]["metadata"]) or {}),
                log_sink=self.log_sink,
                flush_metadata=lambda: self.flush_metadata(attempt_id),
                oom_retry_machine=attempt.get("oom_retry_machine", ""),
            )
            ctx.extra[WAITER] = AttemptWaiter(attempt_id, self.send, self.wait_hooks(task, ctx))
            entry.ctx = ctx
            set_current_context(ctx)  # this attempt's asyncio task has its own copy
            self.send(Started(Kind.STARTED, attempt_id))
            with telemetry.tracer().start_as_current_span(
                f"attempt {task.id}",
                context=telemetry.context_from_traceparent(attempt.get("traceparent", "")),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "runplane.run_id": ctx.run.id,
                    "runplane.attempt": ctx.attempt.number,
                    "runplane.task_id": task.id,
                    "runplane.machine": ctx.machine.name,
                },
            ):
                result = await self.execute(entry, task, ctx)
            self.flush_metadata(attempt_id)
        self.running.pop(attempt_id, None)
        self.flush_logs()
        self.send(Result(Kind.RESULT, attempt_id, result))

    async def cancel_hooks(self, attempt: Attempt) -> None:
        """on_cancel for a run cancelled while queued, delayed or waiting without its attempt:
        ``ctx.attempt.number`` is 0 and ``ctx.signal`` is already set."""
        task = self.tasks.get(attempt["run"]["task_id"])
        if task is None:
            return
        ctx = build_context(attempt, task)
        ctx.extra.update(log_sink=self.log_sink)
        ctx.signal.trigger("cancelled")
        set_current_context(ctx)  # this hook's own asyncio task
        try:
            payload = self.parse_payload(task, attempt["run"]["payload"])
        except Exception:
            payload = loads(attempt["run"]["payload"])
        await self.hooks(task, "on_cancel", payload, ctx)
        self.flush_logs()

    def wait_hooks(
        self, task: Task[Any], ctx: Context
    ) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
        """The on_wait/on_resume hooks of an attempt, as its waiter calls them."""

        async def call(name: str, wait: dict[str, Any]) -> None:
            await self.hooks(task, name, ctx.extra.get("payload"), wait, ctx)

        return call

    async def execute(self, entry: _Attempt, task: Task[Any], ctx: Context) -> AttemptResult:
        payload: Any = None
        try:
            payload = self.parse_payload(task, entry.attempt["run"]["payload"])
            ctx.extra["payload"] = payload
            output = await self.run_with_middleware(task, payload, ctx)
            text = dumps(output)
            check_output_size(text, self.output_limit)
        except asyncio.CancelledError:
            if entry.timed_out:
                return timeout_result(ctx.run.max_duration)
            await self.hooks(task, "cleanup", payload, ctx)
            return EVICTED if entry.evicted else {"canceled": True}
        except Exception as error:
            if entry.timed_out:
                return timeout_result(ctx.run.max_duration)
            if entry.evicted:  # user code turned the cancel into an error: still evicted
                await self.hooks(task, "cleanup", payload, ctx)
                return EVICTED
            return await self.failed(task, payload, error, ctx)
        if entry.evicted:  # user code swallowed the cancel and returned: still evicted
            await self.hooks(task, "cleanup", payload, ctx)
            return EVICTED
        await self.hooks(task, "on_success", payload, output, ctx)
        await self.hooks(task, "on_complete", payload, Outcome(ok=True, output=output), ctx)
        await self.hooks(task, "cleanup", payload, ctx)
        return {"output": text}

    @staticmethod
    def parse_payload(task: Task[Any], text: str) -> Any:
        payload = loads(text)
        validate = getattr(task.payload_type, "model_validate", None)
        if validate is None:
            return payload
        try:
            return validate(payload)
        except Exception as error:
            raise PayloadValidationError(str(error)) from error

    async def run_with_middleware(self, task: Task[Any], payload: Any, ctx: Context) -> Any:
        """Global middlewares, the task's, then init, on_start, on_start_attempt and run."""
        chain = [*GLOBAL_HOOKS["middleware"], *task.hooks["middleware"]]

        async def body() -> Any:
            for fn in [*GLOBAL_HOOKS["init"], *task.hooks["init"]]:
                ctx.extra["init"] = await call_hook(fn, payload, ctx)
            if ctx.attempt.number == 1:
                for fn in [*GLOBAL_HOOKS["on_start"], *task.hooks["on_start"]]:
                    await call_hook(fn, payload, ctx)
            for fn in [*GLOBAL_HOOKS["on_start_attempt"], *task.hooks["on_start_attempt"]]:
                await call_hook(fn, payload, ctx)
            return await self.call(task, payload, ctx)

        async def step(i: int) -> Any:
            if i == len(chain):
                return await body()
            return await chain[i](payload, ctx, lambda: step(i + 1))

        return await step(0)

    async def hooks(self, task: Task[Any], name: str, *args: Any) -> None:
        """Run the global then the task's ``name`` hooks; their errors are logged, not raised."""
        for fn in [*GLOBAL_HOOKS[name], *task.hooks[name]]:
            try:
                await call_hook(fn, *args)
            except Exception as error:
                logger.error(
                    f"{name} hook {getattr(fn, '__qualname__', fn)!r} failed: {error!r}",
                    hook=name,
                    error_type=type(error).__name__,
                    stack_trace="".join(traceback.format_exception(error)),
                )

    async def catch_error(
        self, task: Task[Any], payload: Any, error: Exception, ctx: Context
    ) -> CatchErrorResult | None:
        """The task's catch_error, then the global ones: the first that returns something."""
        for fn in [*task.hooks["catch_error"], *GLOBAL_HOOKS["catch_error"]]:
            try:
                value = await call_hook(fn, payload, error, ctx)
                if value is not None:
                    return CatchErrorResult.parse(value)
            except Exception as hook_error:
                logger.error(
                    f"catch_error hook failed: {hook_error!r}",
                    hook="catch_error",
                    stack_trace="".join(traceback.format_exception(hook_error)),
                )
        return None

    async def failed(
        self, task: Task[Any], payload: Any, error: Exception, ctx: Context
    ) -> AttemptResult:
        """The attempt raised: ask catch_error, decide whether the run is retried, call
        on_failure/on_complete when it is not, then cleanup."""
        oom = isinstance(error, MemoryError)
        skip = isinstance(error, AbortTaskRunError | PayloadValidationError)
        result: AttemptResult = {}
        decision = None if oom else await self.catch_error(task, payload, error, ctx)
        if decision is not None:
            skip = skip or decision.skip_retrying
            if decision.error is not None:
                error = decision.error  # type: ignore[assignment]
            if decision.retry_at is not None:
                result["retry_at_ms"] = int(decision.retry_at.timestamp() * 1000)
            if decision.retry_delay is not None:
                result["retry_delay_ms"] = max(0, int(decision.retry_delay * 1000))
        if oom:
            result["out_of_memory"] = True
            retry_machine = ctx.extra.get("oom_retry_machine") or ""
            result["retry_machine"] = retry_machine
            skip = not retry_machine
        info = error_info(error)
        if oom:
            info["type"] = "OutOfMemoryError"
            info["message"] = (
                f"the attempt ran out of its machine's memory ({ctx.machine.name}, "
                f"{ctx.machine.memory:g} GB): {info['message'] or 'MemoryError'}"
            )
        result["error"], result["skip_retrying"] = info, skip
        retried = not skip and ctx.attempt.number < min(ctx.run.max_attempts, MAX_ATTEMPTS_CAP)
        if not retried and not oom:  # an out-of-memory run ends CRASHED: no on_failure
            await self.hooks(task, "on_failure", payload, error, ctx)
        if not retried:
            await self.hooks(task, "on_complete", payload, Outcome(ok=False, error=error), ctx)
        await self.hooks(task, "cleanup", payload, ctx)
        return result

    async def cancel_attempt(self, entry: _Attempt) -> None:
        """An executing attempt is cancelled: its on_cancel hooks run, then it is stopped."""
        ctx = entry.ctx
        task = self.tasks.get(entry.attempt["run"]["task_id"])
        if ctx is not None and task is not None:
            set_current_context(ctx)  # this is its own asyncio task: its own copy
            await self.hooks(task, "on_cancel", loads(entry.attempt["run"]["payload"]), ctx)
        if entry.task is not None:
            entry.task.cancel()

    async def call(self, task: Task[Any], payload: Any, ctx: Context) -> Any:
        args = (payload, ctx) if task.wants_context else (payload,)
        if task.is_async:
            return await task.fn(*args)
        # The thread sees this attempt's context variables (current_context()).
        thread = self.loop.run_in_executor(None, contextvars.copy_context().run, task.fn, *args)
        try:
            return await asyncio.shield(thread)
        except asyncio.CancelledError:
            # A thread can't be interrupted: report only once it ends. If it never does, the
            # executor kills this process after the grace period.
            await thread
            raise


async def _main(conn: Connection, modules: list[str], output_limit: int) -> None:
    telemetry.setup_from_env("runplane-executor")
    try:
        tasks = import_task_modules(modules)
    except BaseException as error:
        conn.send(Failed(Kind.FAILED, "".join(traceback.format_exception(error))))
        return
    proc = TaskProcess(conn, tasks, output_limit)
    threading.Thread(target=proc.receive_forever, name="taskproc-reader", daemon=True).start()
    flusher = asyncio.create_task(proc.flush_forever(), name="flush")
    proc.send(Ready(Kind.READY, sorted(tasks)))
    await proc.stopped.wait()
    flusher.cancel()
    proc.flush_logs()
    telemetry.shutdown()


def main(
    conn: Connection,
    modules: list[str],
    memory_limit: int = 0,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
) -> None:
    """Entry point of a task process. ``memory_limit`` (bytes, 0: none) caps the process's data
    segment (RLIMIT_DATA: heap and private writable mappings, which is where Python objects
    live; unlike RLIMIT_AS it does not count reserved-but-unused address space such as malloc
    arenas), so an allocation past it raises MemoryError in the attempt that made it.
    ``output_limit`` (bytes) fails an attempt whose output is larger."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor decides when we stop
    if memory_limit:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    asyncio.run(_main(conn, modules, output_limit))
    os._exit(0)  # don't wait for threads stuck in user code
