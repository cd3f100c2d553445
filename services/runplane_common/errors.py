"""The services' error tree. Servicers (and the engine under them) raise these; one interceptor
(``grpcserver``) maps them to gRPC statuses with ``google.rpc`` details, and realtime's HTTP
endpoints to HTTP statuses. This module imports neither grpc nor protobuf, so domain code can
raise them without depending on the transport.

    ServiceError             INTERNAL
    ├── InvalidArgument      INVALID_ARGUMENT, names the field (a BadRequest detail)
    ├── NotFound             NOT_FOUND
    ├── AlreadyExists        ALREADY_EXISTS
    ├── FailedPrecondition   FAILED_PRECONDITION
    ├── Unauthenticated      UNAUTHENTICATED
    ├── PermissionDenied     PERMISSION_DENIED
    └── Unavailable          UNAVAILABLE

An UNAVAILABLE error carries a ``RetryInfo`` detail (its :attr:`Unavailable.retry_after_seconds`).
An error with a :attr:`ServiceError.reason` also carries an ``ErrorInfo`` detail (domain
:data:`ERROR_DOMAIN`, that reason, and :attr:`ServiceError.info` as its metadata).
"""

from __future__ import annotations

import enum

# The domain of the ErrorInfo details this project's errors carry.
ERROR_DOMAIN = "runplane.dev"


class Code(enum.Enum):
    """The status an error answers with: the gRPC status code of the same name and number."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ServiceError(Exception):
    code: Code = Code.INTERNAL
    # A machine-readable reason (an ErrorInfo detail) and its metadata; "" for none.
    reason: str = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.info: dict[str, str] = {}


class InvalidArgument(ServiceError):
    code = Code.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(ServiceError):
    code = Code.NOT_FOUND


class AlreadyExists(ServiceError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = Code.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = Code.PERMISSION_DENIED


class Unavailable(ServiceError):
    """Worth a retry: the status carries a ``RetryInfo`` detail saying when."""

    code = Code.UNAVAILABLE

    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
