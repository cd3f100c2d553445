/**
 * One error root, as the Python SDK has:
 *
 *   RunplaneError
 *   ├── ConfigurationError       bad settings (no key, a bad duration)
 *   ├── ApiError                 a call failed; `code` is the gRPC status name
 *   │   ├── NotFoundError, InvalidArgumentError, PermissionDeniedError, UnauthenticatedError,
 *   │   │   FailedPreconditionError, AlreadyExistsError, UnavailableError
 *   ├── TaskRunError             a child run (or a wait) failed; `type` is its error's type
 *   │   └── WaitpointTimeoutError
 *   └── AbortTaskRunError        thrown by a task: fail the run now, without retrying
 */
import { Code, ConnectError } from "@connectrpc/connect";

export class RunplaneError extends Error {
  override name = "RunplaneError";
}

export class ConfigurationError extends RunplaneError {
  override name = "ConfigurationError";
}

/** A gRPC call failed. `code` is the status name (`NOT_FOUND`), `grpcCode` its number. */
export class ApiError extends RunplaneError {
  override name = "ApiError";
  constructor(
    message: string,
    readonly code: string,
    readonly grpcCode: number,
  ) {
    super(message);
  }
}

export class NotFoundError extends ApiError {
  override name = "NotFoundError";
}
export class InvalidArgumentError extends ApiError {
  override name = "InvalidArgumentError";
}
export class PermissionDeniedError extends ApiError {
  override name = "PermissionDeniedError";
}
export class UnauthenticatedError extends ApiError {
  override name = "UnauthenticatedError";
}
export class FailedPreconditionError extends ApiError {
  override name = "FailedPreconditionError";
}
export class AlreadyExistsError extends ApiError {
  override name = "AlreadyExistsError";
}
export class UnavailableError extends ApiError {
  override name = "UnavailableError";
}

/** A failed child run or wait: its error's type, message and stack trace. */
export class TaskRunError extends RunplaneError {
  override name = "TaskRunError";
  constructor(
    readonly type: string,
    message: string,
    readonly stackTrace = "",
  ) {
    super(message);
  }
}

export class WaitpointTimeoutError extends TaskRunError {
  override name = "WaitpointTimeoutError";
  constructor(message = "the wait token timed out") {
    super("WaitpointTimeoutError", message);
  }
}

/** Throw it from a task to fail the run at once, without retrying. */
export class AbortTaskRunError extends RunplaneError {
  override name = "AbortTaskRunError";
}

const CODE_NAMES: Record<number, string> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

const BY_CODE: Partial<Record<number, typeof ApiError>> = {
  [Code.NotFound]: NotFoundError,
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.Unauthenticated]: UnauthenticatedError,
  [Code.FailedPrecondition]: FailedPreconditionError,
  [Code.AlreadyExists]: AlreadyExistsError,
  [Code.Unavailable]: UnavailableError,
};

/** The SDK's typed error for what a call threw (a ConnectError becomes an ApiError). */
export function fromCallError(error: unknown): unknown {
  if (!(error instanceof ConnectError)) return error;
  const name = CODE_NAMES[error.code] ?? "UNKNOWN";
  const Kind = BY_CODE[error.code] ?? ApiError;
  const out = new Kind(`${name}: ${error.rawMessage}`, name, error.code);
  out.cause = error;
  return out;
}
