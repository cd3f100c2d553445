/**
 * `startWorker({ tasks })`: an executor in Node, speaking WorkerService.Connect as
 * docs/worker-protocol.md describes it (version 1): Register with the manifest, Assignment →
 * AssignmentAck + AttemptStarted, heartbeats, WaitRequest/Resume with journaled replay,
 * AttemptResult, CancelAttempt, and reconnects that claim running attempts and send what was
 * buffered while disconnected. Attempts run in this process, concurrently, up to `capacity`.
 */
import { randomBytes } from "node:crypto";

import { type MessageInitShape, create } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient } from "@connectrpc/connect";

import { AbortTaskRunError, ConfigurationError } from "../errors.js";
import type { LogEntrySchema, Run as RunPb } from "../gen/runplane/v1/run_pb.js";
import {
  type Assignment,
  type ConnectRequest,
  ConnectRequestSchema,
  type ConnectResponse,
  WaitForChildrenSchema,
  WaitRequestSchema,
  WorkerService,
} from "../gen/runplane/v1/worker_service_pb.js";
import { date, toJson } from "../models.js";
import { type TlsOptions, openTransport, tlsFromEnv } from "../transport.js";
import { Journal, type WaitOutcome } from "./journal.js";
import { buildManifest } from "./manifest.js";
import { MetadataBuffer } from "./metadata.js";
import { AsyncQueue } from "./queue.js";
import { type AttemptScope, type Context, type LogRecord, type WaitSpec, attemptStorage } from "./scope.js";
import type { Task } from "./task.js";

export const PROTOCOL_VERSION = 1;

// Reports about attempts that must reach the scheduler: kept while disconnected, sent on reconnect.
const REPORTS = new Set(["started", "result", "metadata", "logs", "wait"]);
const FLUSH_INTERVAL_MS = 1000;
// Reconnect attempts back off to at most this: well within the scheduler's lease timeout (15 s
// by default, 3 s in the tests), which is all the time a worker has to claim its attempts again.
const MAX_BACKOFF_MS = 1000;

export interface WorkerOptions {
  // biome-ignore lint/suspicious/noExplicitAny: tasks of any payload and output
  tasks: Task<any, any>[];
  /** The scheduler's gRPC address: RUNPLANE_API_URL, else RUNPLANE_URL, else localhost:7070. */
  apiUrl?: string;
  /** RUNPLANE_WORKER_KEY (else RUNPLANE_SECRET_KEY, one made with --execute). */
  workerKey?: string;
  /** The worker version: RUNPLANE_VERSION, else a hash of the definitions and the tasks' source. */
  version?: string;
  /** Stable for the process: RUNPLANE_EXECUTOR_ID, else a random one. */
  executorId?: string;
  /** Attempts at once (default 10). */
  capacity?: number;
  tls?: TlsOptions;
  /** How long a cancelled attempt may take to stop before it is reported canceled (1 s). */
  cancelGraceMs?: number;
  /** The worker's own diagnostics (default: stderr). */
  log?: (message: string) => void;
}

/** The error of a stopped attempt's pending waits. */
export class AttemptStoppedError extends Error {
  override name = "AttemptStoppedError";
}

type Report = MessageInitShape<typeof ConnectRequestSchema>;
type ResultInit = Extract<NonNullable<Report["message"]>, { case: "result" }>["value"];

function errorInfo(error: unknown): { type: string; message: string; stackTrace: string } {
  if (error instanceof Error) {
    return { type: error.name || "Error", message: error.message, stackTrace: error.stack ?? "" };
  }
  return { type: "Error", message: String(error), stackTrace: "" };
}

/** The trace and span ids of a W3C traceparent ("00-<trace>-<span>-01"). */
export function traceIds(traceparent: string): { traceId: string; spanId: string } {
  const parts = traceparent.split("-");
  return parts.length === 4 ? { traceId: parts[1] as string, spanId: parts[2] as string } : { traceId: "", spanId: "" };
}

class Attempt {
  readonly abort = new AbortController();
  readonly journal = new Journal();
  readonly metadata: MetadataBuffer;
  stopReason: "canceled" | "timed_out" | "stopped" | null = null;
  private stopNow: () => void = () => {};
  readonly stopped: Promise<void>;
  private budgetMs: number;
  private clockStarted = 0;
  private timer: NodeJS.Timeout | null = null;
  private readonly logEntries: MessageInitShape<typeof LogEntrySchema>[] = [];

  constructor(
    readonly id: string,
    readonly run: RunPb,
    readonly number: number,
    readonly traceparent: string,
    maxDurationMs: number,
  ) {
    this.metadata = new MetadataBuffer((run.metadata ? JSON.parse(run.metadata) : {}) as Record<string, unknown>);
    this.stopped = new Promise((resolve) => {
      this.stopNow = resolve;
    });
    this.budgetMs = maxDurationMs;
  }

  /** Stop the attempt: abort its signal, fail its waits, and end it after `graceMs` at most. */
  stop(reason: "canceled" | "timed_out" | "stopped", graceMs: number): void {
    if (this.stopReason !== null) return;
    this.stopReason = reason;
    this.pauseClock();
    const message = reason === "timed_out" ? "the attempt ran past its max duration" : "the run was cancelled";
    this.abort.abort(new AttemptStoppedError(message));
    this.journal.close(new AttemptStoppedError(message));
    setTimeout(this.stopNow, graceMs).unref();
  }

  /** The max-duration clock runs while the attempt executes, not while it waits. */
  startClock(onExpiry: () => void): void {
    if (this.budgetMs <= 0 || this.stopReason !== null) return;
    this.clockStarted = Date.now();
    this.timer = setTimeout(onExpiry, this.budgetMs);
    this.timer.unref();
  }

  pauseClock(): void {
    if (this.timer === null) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.budgetMs = Math.max(1, this.budgetMs - (Date.now() - this.clockStarted));
  }

  log(record: LogRecord): void {
    const ids = traceIds(this.traceparent);
    this.logEntries.push({
      runId: this.run.id,
      attemptId: this.id,
      attemptNumber: this.number,
      level: record.level,
      message: record.message,
      attributes: JSON.stringify(record.attributes ?? {}),
      time: timestampFromMs(Date.now()),
      ...ids,
    });
  }

  /** The reports of changes since the last call: one MetadataUpdate, one LogBatch. */
  pendingReports(): Report[] {
    const out: Report[] = [];
    const ops = this.metadata.take();
    if (ops.length > 0) {
      out.push({
        message: {
          case: "metadata",
          value: {
            runId: this.run.id,
            attemptId: this.id,
            operations: ops.map(([type, key, value]) => ({ type, key, value })),
          },
        },
      });
    }
    if (this.logEntries.length > 0) {
      out.push({ message: { case: "logs", value: { entries: this.logEntries.splice(0) } } });
    }
    return out;
  }
}

export class Worker {
  readonly manifest;
  executorId: string;
  connected = false;
  /** Resolves once the scheduler has answered the first Register. */
  readonly ready: Promise<void>;
  private readonly tasks = new Map<string, Task<never, unknown>>();
  private readonly apiUrl: string;
  private readonly workerKey: string;
  private readonly tls: TlsOptions;
  private readonly capacity: number;
  private readonly cancelGraceMs: number;
  private readonly log: (message: string) => void;
  private sessionToken = "";
  private outgoing: AsyncQueue<ConnectRequest> | null = null;
  private unsent: ConnectRequest[] = [];
  private readonly attempts = new Map<string, Attempt>();
  private stopping = false;
  private session: AbortController | null = null;
  private loop: Promise<void> | null = null;
  private flusher: NodeJS.Timeout | null = null;
  private markReady: () => void = () => {};
  private wakeUp: () => void = () => {};

  constructor(options: WorkerOptions) {
    const env = process.env;
    for (const t of options.tasks) this.tasks.set(t.id, t as Task<never, unknown>);
    this.manifest = buildManifest([...this.tasks.values()], options.version ?? env.RUNPLANE_VERSION ?? "");
    this.apiUrl = options.apiUrl || env.RUNPLANE_API_URL || env.RUNPLANE_URL || "localhost:7070";
    this.workerKey = options.workerKey || env.RUNPLANE_WORKER_KEY || env.RUNPLANE_SECRET_KEY || "";
    if (!this.workerKey) {
      throw new ConfigurationError(
        "the worker needs a worker key: RUNPLANE_WORKER_KEY (runplane keys create --env ENV --kind worker)",
      );
    }
    this.executorId = options.executorId || env.RUNPLANE_EXECUTOR_ID || `exec_node_${randomBytes(8).toString("hex")}`;
    this.tls = tlsFromEnv(options.tls);
    this.capacity = options.capacity ?? 10;
    this.cancelGraceMs = options.cancelGraceMs ?? 1000;
    this.log = options.log ?? ((message) => process.stderr.write(`runplane worker: ${message}\n`));
    this.ready = new Promise((resolve) => {
      this.markReady = resolve;
    });
  }

  /** Attempts running (or waiting) here now. */
  get running(): number {
    return this.attempts.size;
  }

  start(): this {
    this.loop ??= this.connectForever();
    this.flusher = setInterval(() => {
      for (const attempt of this.attempts.values()) for (const r of attempt.pendingReports()) this.send(r);
    }, FLUSH_INTERVAL_MS);
    this.flusher.unref();
    return this;
  }

  /** Close the stream and stop the attempts still here (their runs go on elsewhere: a started
   * one is retried once the scheduler's lease lapses, as for a lost executor). */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.flusher !== null) clearInterval(this.flusher);
    for (const attempt of this.attempts.values()) attempt.stop("stopped", 0);
    this.session?.abort();
    this.wakeUp();
    await this.loop;
  }

  // -- the stream ----------------------------------------------------------------------------

  private send(init: Report): void {
    const message = create(ConnectRequestSchema, init);
    if (this.outgoing !== null && this.connected) this.outgoing.push(message);
    else if (message.message.case !== undefined && REPORTS.has(message.message.case)) this.unsent.push(message);
  }

  private async connectForever(): Promise<void> {
    const channel = openTransport(this.apiUrl, this.workerKey, this.tls);
    const rpc = createClient(WorkerService, channel.transport);
    let backoff = 100;
    while (!this.stopping) {
      try {
        await this.runSession(rpc);
        backoff = 100;
      } catch (error) {
        if (this.stopping) break;
        const e = ConnectError.from(error);
        if (e.code === Code.Unauthenticated || e.code === Code.PermissionDenied) {
          this.log(`the scheduler refused this worker: ${e.rawMessage}`);
        } else {
          this.log(`scheduler stream ended: ${Code[e.code]} ${e.rawMessage}`);
        }
      }
      this.connected = false;
      if (this.stopping) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, backoff);
        this.wakeUp = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
    }
    channel.close();
  }

  private async runSession(rpc: ReturnType<typeof createClient<typeof WorkerService>>): Promise<void> {
    const outgoing = new AsyncQueue<ConnectRequest>();
    const session = new AbortController();
    this.session = session;
    outgoing.push(
      create(ConnectRequestSchema, {
        message: {
          case: "register",
          value: {
            protocolVersion: PROTOCOL_VERSION,
            executorId: this.executorId,
            sessionToken: this.sessionToken,
            manifest: this.manifest,
            capacity: this.capacity,
            // Attempts with results still to report are ours too.
            runningAttemptIds: [
              ...this.attempts.keys(),
              ...this.unsent.flatMap((m) => (m.message.case === "result" ? [m.message.value.attemptId] : [])),
            ],
          },
        },
      }),
    );
    let heartbeat: NodeJS.Timeout | null = null;
    try {
      for await (const response of rpc.connect(outgoing, { signal: session.signal })) {
        this.handle(response, outgoing, (interval) => {
          if (heartbeat !== null) clearInterval(heartbeat);
          heartbeat = setInterval(() => {
            if (!outgoing.isClosed) outgoing.push(create(ConnectRequestSchema, { message: { case: "heartbeat", value: {} } }));
          }, interval);
        });
      }
    } finally {
      this.connected = false;
      this.outgoing = null;
      if (heartbeat !== null) clearInterval(heartbeat);
      // Reports the stream never took go out again on the next connection.
      for (const left of outgoing.close()) {
        if (left.message.case !== undefined && REPORTS.has(left.message.case)) this.unsent.push(left);
      }
    }
  }

  private handle(response: ConnectResponse, outgoing: AsyncQueue<ConnectRequest>, startHeartbeat: (ms: number) => void): void {
    const m = response.message;
    switch (m.case) {
      case "registered": {
        this.executorId = m.value.executorId || this.executorId;
        this.sessionToken = m.value.sessionToken;
        this.outgoing = outgoing;
        this.connected = true;
        for (const message of this.unsent.splice(0)) outgoing.push(message);
        startHeartbeat(m.value.heartbeatIntervalMs || 2000);
        this.markReady();
        break;
      }
      case "assignment":
        if (this.attempts.has(m.value.attemptId)) {
          // A duplicate of an attempt running here: acknowledged again, never run twice
          // (docs/worker-protocol.md).
          this.log(`attempt ${m.value.attemptId} assigned again: acknowledged`);
          this.send({ message: { case: "ack", value: { attemptId: m.value.attemptId } } });
          break;
        }
        this.execute(m.value).catch((error: unknown) => {
          this.log(`attempt ${m.value.attemptId} failed in the worker: ${errorInfo(error).stackTrace || String(error)}`);
        });
        break;
      case "cancel":
        this.attempts.get(m.value.attemptId)?.stop("canceled", this.cancelGraceMs);
        break;
      case "resume": {
        const attempt = this.attempts.get(m.value.attemptId);
        if (attempt === undefined) {
          // Not an attempt this worker has (it ended, or was never here): reported lost, so
          // the scheduler runs it again, replaying its journal.
          this.send({ message: { case: "result", value: { attemptId: m.value.attemptId, lost: true } } });
          break;
        }
        attempt.journal.resume(
          m.value.results.map((r) => ({
            seq: r.seq,
            ok: r.ok,
            output: r.output,
            error: r.error ? { type: r.error.type, message: r.error.message, stackTrace: r.error.stackTrace } : null,
          })),
        );
        break;
      }
      case "runCanceled":
        break; // no on_cancel hooks in the Node worker
      default:
        break; // a message of a later protocol version: ignored
    }
  }

  // -- attempts ------------------------------------------------------------------------------

  private async execute(a: Assignment): Promise<void> {
    const run = a.run as RunPb;
    const task = this.tasks.get(run.taskId);
    this.send({ message: { case: "ack", value: { attemptId: a.attemptId } } });
    const startedAt = Date.now();
    this.send({ message: { case: "started", value: { attemptId: a.attemptId, startedAt: timestampFromMs(startedAt) } } });
    if (task === undefined) {
      this.send({
        message: {
          case: "result",
          value: {
            attemptId: a.attemptId,
            outcome: { case: "error", value: { type: "UnknownTaskError", message: `this worker has no task ${run.taskId}` } },
          },
        },
      });
      return;
    }
    const maxDurationMs = run.maxDuration
      ? durationMs(run.maxDuration)
      : task.options.maxDuration !== undefined
        ? this.manifestSeconds(task.id) * 1000
        : 0;
    const attempt = new Attempt(a.attemptId, run, a.attemptNumber, a.traceparent, maxDurationMs);
    this.attempts.set(a.attemptId, attempt);
    const ctx: Context = {
      run: {
        id: run.id,
        taskId: run.taskId,
        tags: [...run.tags],
        isTest: run.isTest,
        createdAt: date(run.createdAt),
        idempotencyKey: run.idempotencyKey,
        maxAttempts: run.maxAttempts,
        parentRunId: run.parentRunId,
        rootRunId: run.rootRunId,
        batchId: run.batchId,
        queue: run.queue,
        isReplay: Boolean(run.replayedFromRunId),
      },
      attempt: { id: a.attemptId, number: a.attemptNumber },
      environment: { id: a.environmentId, slug: a.environmentSlug },
      version: run.workerVersion || this.manifest.version,
      signal: attempt.abort.signal,
    };
    const onExpiry = () => attempt.stop("timed_out", this.cancelGraceMs);
    const scope: AttemptScope = {
      ctx,
      metadata: attempt.metadata,
      log: (record) => attempt.log(record),
      flush: () => {
        for (const r of attempt.pendingReports()) this.send(r);
      },
      wait: (spec) => this.wait(attempt, spec, onExpiry),
    };
    attempt.startClock(onExpiry);
    const settled = attemptStorage
      .run(scope, async () => task.options.run((run.payload ? JSON.parse(run.payload) : null) as never, ctx))
      .then(
        (output) => ({ ok: true as const, output }),
        (error: unknown) => ({ ok: false as const, error }),
      );
    const outcome = await Promise.race([settled, attempt.stopped.then(() => null)]);
    attempt.pauseClock();
    this.attempts.delete(a.attemptId);
    if (attempt.stopReason === "stopped") return;
    for (const r of attempt.pendingReports()) this.send(r);
    const result: ResultInit = { attemptId: a.attemptId };
    if (attempt.stopReason === "canceled") {
      result.canceled = true;
      result.outcome = { case: "error", value: { type: "CanceledError", message: "the run was cancelled" } };
    } else if (attempt.stopReason === "timed_out") {
      result.timedOut = true;
      result.outcome = {
        case: "error",
        value: { type: "MaxDurationExceededError", message: `the attempt ran past its max duration (${maxDurationMs / 1000} s)` },
      };
    } else if (outcome !== null && outcome.ok) {
      try {
        result.outcome = { case: "output", value: toJson(outcome.output) };
      } catch (error) {
        result.outcome = { case: "error", value: errorInfo(error) };
        result.skipRetrying = true;
      }
    } else if (outcome !== null) {
      result.outcome = { case: "error", value: errorInfo(outcome.error) };
      result.skipRetrying = outcome.error instanceof AbortTaskRunError;
    }
    this.send({ message: { case: "result", value: result } });
  }

  private manifestSeconds(taskId: string): number {
    return this.manifest.tasks.find((t) => t.id === taskId)?.maxDurationSeconds ?? 0;
  }

  /** One wait of an attempt: its journaled result at once when a Resume already brought it,
   * else a WaitRequest and the Resume that answers it. */
  private async wait(attempt: Attempt, spec: WaitSpec, onExpiry: () => void): Promise<WaitOutcome> {
    const { seq, known, outcome } = attempt.journal.next();
    if (known !== undefined) return known;
    for (const r of attempt.pendingReports()) this.send(r);
    const request = create(WaitRequestSchema, { attemptId: attempt.id, seq, traceparent: attempt.traceparent });
    switch (spec.kind) {
      case "durationMs":
      case "untilMs":
        request.wait = { case: spec.kind, value: BigInt(spec.value) };
        request.idempotencyKey = spec.idempotencyKey ?? "";
        request.idempotencyKeyTtlMs = BigInt(spec.idempotencyKeyTtlMs ?? 0);
        break;
      case "tokenId":
        request.wait = { case: "tokenId", value: spec.value };
        break;
      case "children":
        request.wait = { case: "children", value: create(WaitForChildrenSchema, { items: spec.items }) };
        break;
    }
    attempt.pauseClock();
    this.send({ message: { case: "wait", value: request } });
    try {
      return await outcome;
    } finally {
      attempt.startClock(onExpiry);
    }
  }
}

/** Start a worker serving `tasks`; it connects (and reconnects) until `stop()`. */
export function startWorker(options: WorkerOptions): Worker {
  return new Worker(options).start();
}
