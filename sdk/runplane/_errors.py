"""The SDK's error tree, rooted in :class:`RunplaneError`.

RunplaneError
├── ApiError                       a call to runplane failed (gRPC status + details)
│   ├── InvalidArgumentError       (also ValueError) names the field in ``.field``
│   ├── NotFoundError              (also LookupError)
│   ├── AlreadyExistsError
│   ├── FailedPreconditionError
│   ├── UnauthenticatedError
│   ├── PermissionDeniedError
│   ├── UnavailableError           (also ConnectionError)
│   └── DeadlineExceededError      (also TimeoutError)
├── AbortTaskRunError              raise in a task to fail the run without retrying
├── TaskRunError                   a run's recorded error, raised by Result.unwrap()
├── WaitpointTimeoutError          a wait token timed out (Result.error of wait.for_token)
└── ConfigurationError             missing or bad settings (no secret key, ...)
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class RunplaneError(Exception):
    """Root of every error the runplane SDK raises."""


class ConfigurationError(RunplaneError):
    pass


class AbortTaskRunError(RunplaneError):
    """Raise inside a task to fail the run at once, skipping all retries."""


class TaskRunError(RunplaneError):
    """A run's error: ``type``, ``message`` and ``stack_trace`` as recorded."""

    def __init__(self, type: str, message: str, stack_trace: str = "") -> None:
        super().__init__(f"{type}: {message}" if type else message)
        self.type = type
        self.message = message
        self.stack_trace = stack_trace


class WaitpointTimeoutError(RunplaneError):
    """A wait token was not completed before its timeout."""


class ApiError(RunplaneError):
    """A runplane API call failed. ``code`` is the gRPC status code; ``field`` the request field
    the server named as invalid; ``reason`` and ``info`` its machine-readable reason (the
    status's ``google.rpc.ErrorInfo``); ``retry_after`` the seconds the server asks a retry to
    wait (its ``google.rpc.RetryInfo``, on UNAVAILABLE), or None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field: str = "",
        reason: str = "",
        info: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.reason = reason
        self.info = info or {}
        self.retry_after = retry_after


class InvalidArgumentError(ApiError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ApiError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ApiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(ApiError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ApiError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
    )
}


def from_rpc_error(error: Any) -> ApiError:
    """The typed error for a ``grpc.RpcError``, with the violated field when the server named it."""
    code = error.code()
    message = error.details() or code.name
    field, reason, info, retry_after = "", "", {}, None
    try:
        status = rpc_status.from_call(error)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    if bad.field_violations:
                        field = bad.field_violations[0].field
                elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    error_info = error_details_pb2.ErrorInfo()
                    detail.Unpack(error_info)
                    reason, info = error_info.reason, dict(error_info.metadata)
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    except Exception:  # details are a bonus; the status alone is enough
        pass
    return _BY_CODE.get(code, ApiError)(
        message, code=code, field=field, reason=reason, info=info, retry_after=retry_after
    )
