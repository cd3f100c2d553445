/**
 * runplane for Node.js: a client of every public RPC (`new Client()`), and a worker that runs
 * tasks defined in TypeScript (`task`, `startWorker`), with durable waits (`wait`),
 * `triggerAndWait`, `metadata` and `logger`.
 */
export {
  Client,
  type ClientOptions,
  type BatchItem,
  type TaskBatchItem,
  type ListRunsFilter,
  type LogLine,
  type RunTimeline,
  type StreamChunk,
  type WorkerVersion,
  type CreateScheduleOptions,
  type CreateTokenOptions,
} from "./client.js";
export type { DurationLike } from "./durations.js";
export { toMs } from "./durations.js";
export {
  AbortTaskRunError,
  AlreadyExistsError,
  ApiError,
  ConfigurationError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  RunplaneError,
  TaskRunError,
  UnauthenticatedError,
  UnavailableError,
  WaitpointTimeoutError,
} from "./errors.js";
export {
  FINAL_STATUSES,
  type Batch,
  type BatchHandle,
  type BatchStatus,
  type Debounce,
  type Queue,
  type Run,
  type RunErrorInfo,
  type RunHandle,
  type RunStatus,
  type Schedule,
  type TokenStatus,
  type TriggerOptions,
  type WaitToken,
} from "./models.js";
export type { TlsOptions } from "./transport.js";
export {
  Result,
  batchTriggerAndWait,
  closeClient,
  configure,
  logger,
  metadata,
  trigger,
  triggerAndWait,
  wait,
  type WaitForOptions,
} from "./worker/api.js";
export type { Context } from "./worker/scope.js";
export { task, type QueueOptions, type RetryOptions, type Task, type TaskOptions } from "./worker/task.js";
export { PROTOCOL_VERSION, Worker, startWorker, type WorkerOptions } from "./worker/worker.js";
