"""runplane: durable background tasks for Python.

from runplane import task

@task(id="hello")
async def hello(payload: dict) -> str:
    return f"hello {payload['name']}"

handle = await hello.trigger({"name": "world"})
"""

from runplane._auth import AuthAPI
from runplane._batch import BatchAPI, batch
from runplane._client import (
    Client,
    RunsAPI,
    TagsAPI,
    TasksAPI,
    auth,
    configure,
    default_client,
    runs,
    tags,
    tasks,
)
from runplane._context import Context, Signal
from runplane._errors import (
    AbortTaskRunError,
    AlreadyExistsError,
    ApiError,
    ConfigurationError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RunplaneError,
    TaskRunError,
    UnauthenticatedError,
    UnavailableError,
    WaitpointTimeoutError,
)
from runplane._hooks import CatchErrorResult, Outcome
from runplane._idempotency import IdempotencyKey, IdempotencyKeysAPI, idempotency_keys
from runplane._logger import LogEntry, logger
from runplane._metadata import metadata
from runplane._models import (
    Batch,
    BatchHandle,
    BatchItem,
    BatchStatus,
    QueueInfo,
    Run,
    RunError,
    RunHandle,
    RunStatus,
)
from runplane._queues import QueuesAPI, queues
from runplane._schedules import Schedule, ScheduledPayload, SchedulesAPI, schedules
from runplane._streams import Stream, StreamsAPI, streams
from runplane._task import Queue, RetryOptions, Task, queue, task
from runplane._timeline import (
    RunPage,
    RunTimeline,
    TimelineAttempt,
    TimelineInterval,
    TimelineWait,
)
from runplane._wait import Result, WaitAPI, WaitToken, wait

__version__ = "0.1.0"

__all__ = [
    "AbortTaskRunError",
    "AlreadyExistsError",
    "ApiError",
    "AuthAPI",
    "Batch",
    "BatchAPI",
    "BatchHandle",
    "BatchItem",
    "BatchStatus",
    "CatchErrorResult",
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
    "Stream",
    "StreamsAPI",
    "TagsAPI",
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
    "auth",
    "batch",
    "configure",
    "default_client",
    "idempotency_keys",
    "logger",
    "metadata",
    "queue",
    "queues",
    "runs",
    "schedules",
    "streams",
    "tags",
    "task",
    "tasks",
    "wait",
]
