/** The SDK's shapes of runs, batches, tokens, queues and schedules, and their conversions at the
 * edge: JSON text fields parsed, enums as names, int64 as numbers, timestamps as Dates. No
 * generated message type appears in a public signature. */
import { create } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { type Duration, type Timestamp, durationFromMs, timestampDate, timestampFromMs } from "@bufbuild/protobuf/wkt";

import { type DurationLike, toMs } from "./durations.js";
import type { Queue as QueuePb } from "./gen/runplane/v1/queue_service_pb.js";
import { type Run as RunPb, type RunError as RunErrorPb, RunStatus as RunStatusPb } from "./gen/runplane/v1/run_pb.js";
import {
  type Batch as BatchPb,
  BatchStatus as BatchStatusPb,
  DebounceMode,
  TriggerOptionsSchema,
} from "./gen/runplane/v1/run_service_pb.js";
import { type Schedule as SchedulePb, ScheduleType } from "./gen/runplane/v1/schedule_service_pb.js";
import { type WaitToken as WaitTokenPb, WaitpointStatus } from "./gen/runplane/v1/waitpoint_service_pb.js";

export type RunStatus =
  | "PENDING_VERSION"
  | "DELAYED"
  | "QUEUED"
  | "DEQUEUED"
  | "EXECUTING"
  | "WAITING"
  | "COMPLETED"
  | "CANCELED"
  | "FAILED"
  | "CRASHED"
  | "SYSTEM_FAILURE"
  | "EXPIRED"
  | "TIMED_OUT";

export const FINAL_STATUSES: ReadonlySet<RunStatus> = new Set([
  "COMPLETED",
  "CANCELED",
  "FAILED",
  "CRASHED",
  "SYSTEM_FAILURE",
  "EXPIRED",
  "TIMED_OUT",
]);

export interface RunErrorInfo {
  type: string;
  message: string;
  stackTrace: string;
}

export interface Run {
  id: string;
  taskId: string;
  status: RunStatus;
  /** True once the status is final (COMPLETED, CANCELED, FAILED, ...). */
  isFinal: boolean;
  payload: unknown;
  output: unknown;
  error: RunErrorInfo | null;
  tags: string[];
  metadata: Record<string, unknown>;
  queue: string;
  idempotencyKey: string;
  concurrencyKey: string;
  priority: number;
  attemptCount: number;
  maxAttempts: number;
  /** 1 at creation, +1 for every change. */
  version: number;
  environmentId: string;
  isTest: boolean;
  parentRunId: string;
  rootRunId: string;
  batchId: string;
  createdAt: Date | null;
  updatedAt: Date | null;
  queuedAt: Date | null;
  startedAt: Date | null;
  finishedAt: Date | null;
  delayUntil: Date | null;
  durationMs: number;
  machine: string;
  replayedFromRunId: string;
  depth: number;
  workerVersion: string;
}

export function parseJson(text: string): unknown {
  return text ? JSON.parse(text) : null;
}

/** JSON text of a value; undefined is null. */
export function toJson(value: unknown): string {
  return JSON.stringify(value === undefined ? null : value);
}

export function date(ts: Timestamp | undefined): Date | null {
  return ts === undefined ? null : timestampDate(ts);
}

export function statusName(status: RunStatusPb): RunStatus {
  return (RunStatusPb[status] ?? "UNSPECIFIED") as RunStatus;
}

export function runError(e: RunErrorPb | undefined): RunErrorInfo | null {
  return e === undefined ? null : { type: e.type, message: e.message, stackTrace: e.stackTrace };
}

export function runFromPb(r: RunPb): Run {
  const status = statusName(r.status);
  return {
    id: r.id,
    taskId: r.taskId,
    status,
    isFinal: FINAL_STATUSES.has(status),
    payload: parseJson(r.payload),
    output: parseJson(r.output),
    error: runError(r.error),
    tags: [...r.tags],
    metadata: (parseJson(r.metadata) ?? {}) as Record<string, unknown>,
    queue: r.queue,
    idempotencyKey: r.idempotencyKey,
    concurrencyKey: r.concurrencyKey,
    priority: r.priority,
    attemptCount: r.attemptCount,
    maxAttempts: r.maxAttempts,
    version: Number(r.version),
    environmentId: r.environmentId,
    isTest: r.isTest,
    parentRunId: r.parentRunId,
    rootRunId: r.rootRunId,
    batchId: r.batchId,
    createdAt: date(r.createdAt),
    updatedAt: date(r.updatedAt),
    queuedAt: date(r.queuedAt),
    startedAt: date(r.startedAt),
    finishedAt: date(r.finishedAt),
    delayUntil: date(r.delayUntil),
    durationMs: Number(r.durationMs),
    machine: r.machine,
    replayedFromRunId: r.replayedFromRunId,
    depth: r.depth,
    workerVersion: r.workerVersion,
  };
}

export interface Debounce {
  key: string;
  delay: DurationLike;
  mode?: "leading" | "trailing";
  maxDelay?: DurationLike;
}

/** Options of one trigger; durations are seconds or text ("90s", "1h30m"). */
export interface TriggerOptions {
  queue?: string;
  tags?: string | string[];
  metadata?: Record<string, unknown>;
  maxAttempts?: number;
  idempotencyKey?: string;
  idempotencyKeyTtl?: DurationLike;
  concurrencyKey?: string;
  priority?: number;
  /** Stay DELAYED this long, or until this date. */
  delay?: DurationLike | Date;
  ttl?: DurationLike;
  maxDuration?: DurationLike;
  machine?: string;
  debounce?: Debounce;
  /** Lock the run to this worker version. */
  version?: string;
  /** Set by the worker when triggering from inside a run. */
  parentRunId?: string;
}

function duration(value: DurationLike | undefined, field: string): Duration | undefined {
  return value === undefined ? undefined : durationFromMs(toMs(value, field));
}

export function triggerOptionsToPb(o: TriggerOptions = {}): MessageInitShape<typeof TriggerOptionsSchema> {
  const out = create(TriggerOptionsSchema, {
    queue: o.queue ?? "",
    tags: typeof o.tags === "string" ? [o.tags] : [...(o.tags ?? [])],
    metadata: o.metadata === undefined ? "" : toJson(o.metadata),
    maxAttempts: o.maxAttempts ?? 0,
    idempotencyKey: o.idempotencyKey ?? "",
    concurrencyKey: o.concurrencyKey ?? "",
    priority: o.priority ?? 0,
    machine: o.machine ?? "",
    parentRunId: o.parentRunId ?? "",
    version: o.version ?? "",
  });
  if (o.delay instanceof Date) out.delayUntil = timestampFromMs(o.delay.getTime());
  else out.delay = duration(o.delay, "delay");
  out.ttl = duration(o.ttl, "ttl");
  out.idempotencyKeyTtl = duration(o.idempotencyKeyTtl, "idempotencyKeyTtl");
  out.maxDuration = duration(o.maxDuration, "maxDuration");
  if (o.debounce !== undefined) {
    out.debounce = {
      $typeName: "runplane.v1.Debounce",
      key: o.debounce.key,
      delay: duration(o.debounce.delay, "debounce.delay"),
      mode: o.debounce.mode === "trailing" ? DebounceMode.TRAILING : DebounceMode.LEADING,
      maxDelay: duration(o.debounce.maxDelay, "debounce.maxDelay"),
    };
  }
  return out;
}

export interface RunHandle {
  id: string;
  /** An idempotency key matched an existing run, which this is. */
  isCached: boolean;
  /** Reads this run only, for 15 minutes: hand it to a browser. */
  publicAccessToken: string;
  run: Run;
}

export type BatchStatus = "PROCESSING" | "COMPLETED" | "PARTIAL_FAILED";

export interface Batch {
  id: string;
  status: BatchStatus;
  runCount: number;
  runIds: string[];
  idempotencyKey: string;
  createdAt: Date | null;
}

export function batchFromPb(b: BatchPb): Batch {
  return {
    id: b.id,
    status: BatchStatusPb[b.status] as BatchStatus,
    runCount: b.runCount,
    runIds: [...b.runIds],
    idempotencyKey: b.idempotencyKey,
    createdAt: date(b.createdAt),
  };
}

export interface BatchHandle {
  batchId: string;
  runs: RunHandle[];
}

export type TokenStatus = "WAITING" | "COMPLETED" | "TIMED_OUT";

export interface WaitToken {
  id: string;
  status: TokenStatus;
  /** POST a JSON body here to complete the token (the URL carries its own secret). */
  url: string;
  idempotencyKey: string;
  tags: string[];
  timeoutAt: Date | null;
  createdAt: Date | null;
  completedAt: Date | null;
  output: unknown;
  error: RunErrorInfo | null;
  isCached: boolean;
  /** Completes this token only; set on create. */
  publicAccessToken: string;
}

export function tokenFromPb(t: WaitTokenPb, isCached = false, publicAccessToken = ""): WaitToken {
  return {
    id: t.id,
    status: WaitpointStatus[t.status] as TokenStatus,
    url: t.url,
    idempotencyKey: t.idempotencyKey,
    tags: [...t.tags],
    timeoutAt: date(t.timeoutAt),
    createdAt: date(t.createdAt),
    completedAt: date(t.completedAt),
    output: parseJson(t.output),
    error: runError(t.error),
    isCached,
    publicAccessToken,
  };
}

export interface Queue {
  id: string;
  name: string;
  running: number;
  queued: number;
  paused: boolean;
  concurrencyLimit: number;
  baseConcurrencyLimit: number;
  overrideConcurrencyLimit: number | null;
  overriddenAt: Date | null;
}

export function queueFromPb(q: QueuePb): Queue {
  return {
    id: q.id,
    name: q.name,
    running: q.running,
    queued: q.queued,
    paused: q.paused,
    concurrencyLimit: q.concurrencyLimit,
    baseConcurrencyLimit: q.baseConcurrencyLimit,
    overrideConcurrencyLimit: q.overrideConcurrencyLimit ?? null,
    overriddenAt: date(q.overriddenAt),
  };
}

export interface Schedule {
  id: string;
  /** DECLARATIVE (declared with its task) or IMPERATIVE (created through the API). */
  type: "DECLARATIVE" | "IMPERATIVE";
  taskId: string;
  active: boolean;
  cron: string;
  timezone: string;
  externalId: string;
  deduplicationKey: string;
  nextRun: Date | null;
  lastRun: Date | null;
  createdAt: Date | null;
  updatedAt: Date | null;
  environmentId: string;
}

export function scheduleFromPb(s: SchedulePb): Schedule {
  return {
    id: s.id,
    type: ScheduleType[s.type] as Schedule["type"],
    taskId: s.taskId,
    active: s.active,
    cron: s.cron,
    timezone: s.timezone,
    externalId: s.externalId,
    deduplicationKey: s.deduplicationKey,
    nextRun: date(s.nextRun),
    lastRun: date(s.lastRun),
    createdAt: date(s.createdAt),
    updatedAt: date(s.updatedAt),
    environmentId: s.environmentId,
  };
}

export { toMs };
