"""runplane: durable background tasks for Python.

from runplane import task

@task(id="hello")
async def hello(payload: dict) -> str:
    return f"hello {payload['name']}"

handle = await hello.trigger({"name": "world"})
"""

from runplane._auth import AuthAPI
from runplane._client import (
    Client,
    RunsAPI,
    TasksAPI,
    auth,
    configure,
    default_client,
    runs,
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
)
from runplane._models import Run, RunError, RunHandle, RunStatus
from runplane._streams import Stream, StreamsAPI, streams
from runplane._task import Queue, RetryOptions, Task, queue, task

__version__ = "0.1.0"

__all__ = [
    "AbortTaskRunError",
    "AlreadyExistsError",
    "ApiError",
    "AuthAPI",
    "Client",
    "ConfigurationError",
    "Context",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Queue",
    "RetryOptions",
    "Run",
    "RunError",
    "RunHandle",
    "RunStatus",
    "RunplaneError",
    "RunsAPI",
    "Signal",
    "Stream",
    "StreamsAPI",
    "Task",
    "TaskRunError",
    "TasksAPI",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
    "auth",
    "configure",
    "default_client",
    "queue",
    "runs",
    "streams",
    "task",
    "tasks",
]
