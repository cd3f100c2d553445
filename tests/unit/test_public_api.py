"""The public API is frozen: changing it must be deliberate."""

from __future__ import annotations

import inspect

import runplane

PUBLIC = [
    "AbortTaskRunError",
    "AlreadyExistsError",
    "ApiError",
    "Batch",
    "BatchAPI",
    "BatchHandle",
    "BatchItem",
    "BatchStatus",
    "CatchErrorResult",
    "AuthAPI",
    "Client",
    "ConfigurationError",
    "Context",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "IdempotencyKey",
    "IdempotencyKeysAPI",
    "InvalidArgumentError",
    "LogEntry",
    "NotFoundError",
    "Outcome",
    "PermissionDeniedError",
    "Queue",
    "QueueInfo",
    "QueuesAPI",
    "Result",
    "RetryOptions",
    "Run",
    "RunError",
    "RunHandle",
    "RunPage",
    "RunStatus",
    "RunTimeline",
    "RunplaneError",
    "RunsAPI",
    "Schedule",
    "ScheduledPayload",
    "SchedulesAPI",
    "Signal",
    "TagsAPI",
    "Stream",
    "StreamsAPI",
    "Task",
    "TaskRunError",
    "TasksAPI",
    "TimelineAttempt",
    "TimelineInterval",
    "TimelineWait",
    "UnauthenticatedError",
    "UnavailableError",
    "WaitAPI",
    "WaitToken",
    "WaitpointTimeoutError",
    "__version__",
    "batch",
    "auth",
    "configure",
    "default_client",
    "idempotency_keys",
    "logger",
    "metadata",
    "queue",
    "queues",
    "runs",
    "tags",
    "schedules",
    "streams",
    "task",
    "tasks",
    "wait",
]


NAMESPACES: tuple[type, ...] = (
    runplane.RunsAPI,
    runplane.TasksAPI,
    runplane.TagsAPI,
    runplane.BatchAPI,
    runplane.QueuesAPI,
    runplane.IdempotencyKeysAPI,
    runplane.WaitAPI,
)

# Waits that block the calling run: only meaningful on the run's own event loop, so no twin.
IN_RUN_ONLY = {"for_", "until", "for_token", "trigger_and_wait", "trigger_by_task_and_wait"}


def test_all_is_frozen() -> None:
    assert sorted(runplane.__all__) == sorted(PUBLIC)
    for name in runplane.__all__:
        assert hasattr(runplane, name), name


def test_no_protobuf_type_in_public_signatures() -> None:
    for cls in (*NAMESPACES, runplane.Client, runplane.Task):
        for name, member in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_"):
                continue
            annotations = str(inspect.signature(member))
            assert "_pb2" not in annotations, f"{cls.__name__}.{name}{annotations}"


def test_errors_share_one_root_and_mix_in_stdlib_types() -> None:
    assert issubclass(runplane.InvalidArgumentError, ValueError)
    assert issubclass(runplane.NotFoundError, LookupError)
    assert issubclass(runplane.UnavailableError, ConnectionError)
    assert issubclass(runplane.DeadlineExceededError, TimeoutError)
    for name in runplane.__all__:
        obj = getattr(runplane, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, runplane.RunplaneError), name


def test_every_client_call_has_a_sync_twin() -> None:
    for cls in NAMESPACES:
        for name, member in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") or name.endswith("_sync") or name in IN_RUN_ONLY:
                continue
            if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
                assert hasattr(cls, f"{name}_sync"), f"{cls.__name__}.{name} has no _sync twin"
