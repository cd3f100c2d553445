/**
 * `new Client()`: every public RPC of runplane, grouped as the Python SDK groups them
 * (`client.trigger`, `client.runs.retrieve`, `client.queues.pause`, `client.wait.createToken`,
 * `client.runs.subscribeToRun`, `client.streams.read`, ...). Payloads, outputs and metadata are
 * JSON values; every failed call throws an ApiError (see errors.ts).
 */
import { durationFromMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Client as ConnectClient, type Transport, createClient } from "@connectrpc/connect";

import { type DurationLike, toMs } from "./durations.js";
import { ConfigurationError, RunplaneError, fromCallError } from "./errors.js";
import { AuthService } from "./gen/runplane/v1/auth_service_pb.js";
import { MetaService } from "./gen/runplane/v1/meta_service_pb.js";
import { QueueService } from "./gen/runplane/v1/queue_service_pb.js";
import { RealtimeService } from "./gen/runplane/v1/realtime_service_pb.js";
import { type LogEntry, RunStatus as RunStatusPb, type Run as RunPb } from "./gen/runplane/v1/run_pb.js";
import { RunService } from "./gen/runplane/v1/run_service_pb.js";
import { ScheduleService } from "./gen/runplane/v1/schedule_service_pb.js";
import { VersionService, type WorkerVersion as WorkerVersionPb } from "./gen/runplane/v1/version_service_pb.js";
import { WaitpointService, WaitpointStatus } from "./gen/runplane/v1/waitpoint_service_pb.js";
import {
  type Batch,
  type BatchHandle,
  type Queue,
  type Run,
  type RunErrorInfo,
  type RunHandle,
  type RunStatus,
  type Schedule,
  type TriggerOptions,
  type WaitToken,
  batchFromPb,
  date,
  queueFromPb,
  runError,
  runFromPb,
  scheduleFromPb,
  toJson,
  tokenFromPb,
  triggerOptionsToPb,
} from "./models.js";
import { type Channel, type TlsOptions, openTransport, tlsFromEnv } from "./transport.js";

export const DEFAULT_API_URL = "localhost:7070";

export interface ClientOptions {
  /** The scheduler's gRPC address; RUNPLANE_API_URL, else localhost:7070. */
  apiUrl?: string;
  /** A secret key or a public access token; RUNPLANE_SECRET_KEY. */
  secretKey?: string;
  /** The realtime service; RUNPLANE_REALTIME_URL, else what the scheduler announces. */
  realtimeUrl?: string;
  /** RUNPLANE_TLS_CA, RUNPLANE_TLS_CERT, RUNPLANE_TLS_KEY where not given. */
  tls?: TlsOptions;
  /** Deadline of a unary call, ms (default 30 s). */
  timeoutMs?: number;
}

/** One item of a batch trigger of one task. */
export interface BatchItem {
  payload?: unknown;
  options?: TriggerOptions;
}

/** One item of a batch trigger across tasks. */
export interface TaskBatchItem extends BatchItem {
  id: string;
}

export interface ListRunsFilter {
  status?: RunStatus | RunStatus[];
  taskId?: string | string[];
  tag?: string | string[];
  createdAfter?: Date;
  createdBefore?: Date;
  batch?: string;
  version?: string;
  /** Stop after this many runs. */
  limit?: number;
}

export interface LogLine {
  runId: string;
  attemptId: string;
  attemptNumber: number;
  level: string;
  message: string;
  attributes: Record<string, unknown>;
  time: Date | null;
}

export interface StreamChunk {
  index: number;
  data: unknown;
}

export interface WorkerVersion {
  version: string;
  taskIds: string[];
  currentFor: string[];
  createdAt: Date | null;
  promotedAt: Date | null;
  rolledBack: boolean;
  executors: number;
  activeRuns: number;
}

function versionFromPb(v: WorkerVersionPb): WorkerVersion {
  return {
    version: v.version,
    taskIds: [...v.taskIds],
    currentFor: [...v.currentFor],
    createdAt: date(v.createdAt),
    promotedAt: date(v.promotedAt),
    rolledBack: v.rolledBack,
    executors: v.executors,
    activeRuns: Number(v.activeRuns),
  };
}

function logLine(e: LogEntry): LogLine {
  return {
    runId: e.runId,
    attemptId: e.attemptId,
    attemptNumber: e.attemptNumber,
    level: e.level,
    message: e.message,
    attributes: (e.attributes ? JSON.parse(e.attributes) : {}) as Record<string, unknown>,
    time: date(e.time),
  };
}

/** A run's waterfall (`client.runs.timeline`). */
export interface RunTimeline {
  run: Run;
  attempts: { id: string; number: number; status: string; createdAt: Date | null; startedAt: Date | null; finishedAt: Date | null; error: RunErrorInfo | null }[];
  /** kind: DURATION, TOKEN or BATCH; status: PENDING or COMPLETED. */
  waits: { id: string; kind: string; status: string; attemptNumber: number; startedAt: Date | null; finishedAt: Date | null; target: string; dueAt: Date | null; childRunIds: string[] }[];
  /** kind: QUEUED or DELAYED. */
  queueIntervals: { kind: string; startedAt: Date | null; finishedAt: Date | null }[];
  children: Run[];
  logs: LogLine[];
  /** More log lines exist than `logs` has (page through `runs.logs`). */
  logsTruncated: boolean;
}

function list<T>(value: T | T[] | undefined): T[] {
  return value === undefined ? [] : Array.isArray(value) ? value : [value];
}

function handle(run: RunPb | undefined, isCached: boolean, publicAccessToken = ""): RunHandle {
  const r = runFromPb(run as RunPb);
  return { id: r.id, isCached, publicAccessToken, run: r };
}

/** Await a call; a failure becomes the SDK's typed error. */
async function call<T>(promise: Promise<T>): Promise<T> {
  try {
    return await promise;
  } catch (error) {
    throw fromCallError(error);
  }
}

/** Iterate a server stream, typed errors, and cancel the call when the consumer stops. */
async function* stream<T>(open: (signal: AbortSignal) => AsyncIterable<T>): AsyncGenerator<T> {
  const abort = new AbortController();
  try {
    for await (const item of open(abort.signal)) yield item;
  } catch (error) {
    if (!abort.signal.aborted) throw fromCallError(error);
  } finally {
    abort.abort();
  }
}

export class Client {
  readonly apiUrl: string;
  readonly secretKey: string;
  realtimeUrl: string;
  readonly tls: TlsOptions;
  readonly timeoutMs: number;
  private readonly channel: Channel;
  private realtimeChannel: Channel | null = null;
  /** The generated connect clients, for what the SDK does not wrap. */
  readonly rpc: {
    runs: ConnectClient<typeof RunService>;
    queues: ConnectClient<typeof QueueService>;
    schedules: ConnectClient<typeof ScheduleService>;
    waitpoints: ConnectClient<typeof WaitpointService>;
    versions: ConnectClient<typeof VersionService>;
    auth: ConnectClient<typeof AuthService>;
    meta: ConnectClient<typeof MetaService>;
  };
  readonly runs: RunsAPI;
  readonly batch: BatchAPI;
  readonly queues: QueuesAPI;
  readonly schedules: SchedulesAPI;
  readonly wait: TokensAPI;
  readonly streams: StreamsAPI;
  readonly versions: VersionsAPI;
  readonly auth: AuthAPI;
  readonly idempotencyKeys: IdempotencyKeysAPI;
  readonly tags: TagsAPI;

  constructor(options: ClientOptions = {}) {
    this.apiUrl = options.apiUrl || process.env.RUNPLANE_API_URL || DEFAULT_API_URL;
    this.secretKey = options.secretKey ?? process.env.RUNPLANE_SECRET_KEY ?? "";
    this.realtimeUrl = options.realtimeUrl || process.env.RUNPLANE_REALTIME_URL || "";
    this.tls = tlsFromEnv(options.tls);
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.channel = openTransport(this.apiUrl, this.secretKey, this.tls);
    const transport: Transport = this.channel.transport;
    this.rpc = {
      runs: createClient(RunService, transport),
      queues: createClient(QueueService, transport),
      schedules: createClient(ScheduleService, transport),
      waitpoints: createClient(WaitpointService, transport),
      versions: createClient(VersionService, transport),
      auth: createClient(AuthService, transport),
      meta: createClient(MetaService, transport),
    };
    this.runs = new RunsAPI(this);
    this.batch = new BatchAPI(this);
    this.queues = new QueuesAPI(this);
    this.schedules = new SchedulesAPI(this);
    this.wait = new TokensAPI(this);
    this.streams = new StreamsAPI(this);
    this.versions = new VersionsAPI(this);
    this.auth = new AuthAPI(this);
    this.idempotencyKeys = new IdempotencyKeysAPI(this);
    this.tags = new TagsAPI(this);
  }

  /** Options of a unary call: its deadline. */
  get callOptions(): { timeoutMs: number } {
    return { timeoutMs: this.timeoutMs };
  }

  /** Trigger a run of `taskId` with `payload` (any JSON value). */
  async trigger(taskId: string, payload?: unknown, options: TriggerOptions = {}): Promise<RunHandle> {
    const reply = await call(
      this.rpc.runs.triggerRun(
        { taskId, payload: toJson(payload), options: triggerOptionsToPb(options) },
        this.callOptions,
      ),
    );
    return handle(reply.run, reply.isCached, reply.publicAccessToken);
  }

  /** Trigger up to 1,000 runs of one task at once, all or none. */
  async batchTrigger(
    taskId: string,
    items: BatchItem[],
    options: { idempotencyKey?: string } = {},
  ): Promise<BatchHandle> {
    return this.batch.trigger(
      items.map((item) => ({ id: taskId, ...item })),
      options,
    );
  }

  /** Server information: the realtime service's address, the key's environment, ... */
  async serverInfo(): Promise<{ realtimeUrl: string; version: string; environment: string; environmentId: string; httpUrl: string; realtimeHttpUrl: string }> {
    const info = await call(this.rpc.meta.getServerInfo({}, this.callOptions));
    return {
      realtimeUrl: info.realtimeUrl,
      version: info.version,
      environment: info.environment,
      environmentId: info.environmentId,
      httpUrl: info.httpUrl,
      realtimeHttpUrl: info.realtimeHttpUrl,
    };
  }

  /** The realtime service's client: RUNPLANE_REALTIME_URL, or what the scheduler announces. */
  async realtime(): Promise<ConnectClient<typeof RealtimeService>> {
    if (this.realtimeChannel === null) {
      if (!this.realtimeUrl) {
        this.realtimeUrl = (await this.serverInfo()).realtimeUrl;
        if (!this.realtimeUrl) {
          throw new ConfigurationError("the scheduler announces no realtime service; set RUNPLANE_REALTIME_URL");
        }
      }
      this.realtimeChannel = openTransport(this.realtimeUrl, this.secretKey, this.tls);
    }
    return createClient(RealtimeService, this.realtimeChannel.transport);
  }

  /** Close this client's HTTP/2 sessions (an open one keeps a Node process alive). */
  close(): void {
    this.channel.close();
    this.realtimeChannel?.close();
  }
}

class Namespace {
  constructor(protected readonly client: Client) {}
}

export class RunsAPI extends Namespace {
  async retrieve(runId: string): Promise<Run> {
    const reply = await call(this.client.rpc.runs.getRun({ runId }, this.client.callOptions));
    return runFromPb(reply.run as RunPb);
  }

  /** Runs newest first, filtered; pages are fetched as the iteration goes. */
  async *list(filter: ListRunsFilter = {}): AsyncGenerator<Run> {
    let pageToken = "";
    let left = filter.limit ?? Number.POSITIVE_INFINITY;
    do {
      const reply = await call(
        this.client.rpc.runs.listRuns(
          {
            statuses: list(filter.status).map((s) => RunStatusPb[s as keyof typeof RunStatusPb]),
            taskIds: list(filter.taskId),
            tags: list(filter.tag),
            createdAfter: filter.createdAfter ? timestampFromMs(filter.createdAfter.getTime()) : undefined,
            createdBefore: filter.createdBefore ? timestampFromMs(filter.createdBefore.getTime()) : undefined,
            batchId: filter.batch ?? "",
            version: filter.version ?? "",
            pageSize: Math.min(100, Number.isFinite(left) ? left : 100),
            pageToken,
          },
          this.client.callOptions,
        ),
      );
      for (const run of reply.runs) {
        if (left-- <= 0) return;
        yield runFromPb(run);
      }
      pageToken = reply.nextPageToken;
    } while (pageToken && left > 0);
  }

  async cancel(runId: string): Promise<Run> {
    const reply = await call(this.client.rpc.runs.cancelRun({ runId }, this.client.callOptions));
    return runFromPb(reply.run as RunPb);
  }

  /** A new run of the same task with the same payload, tags, metadata and options. */
  async replay(runId: string): Promise<Run> {
    const reply = await call(this.client.rpc.runs.replayRun({ runId }, this.client.callOptions));
    return runFromPb(reply.run as RunPb);
  }

  /** Move a DELAYED run's start: a duration from now, or a date. */
  async reschedule(runId: string, delay: DurationLike | Date): Promise<Run> {
    const request =
      delay instanceof Date
        ? { runId, delayUntil: timestampFromMs(delay.getTime()) }
        : { runId, delay: durationFromMs(toMs(delay, "delay")) };
    const reply = await call(this.client.rpc.runs.rescheduleRun(request, this.client.callOptions));
    return runFromPb(reply.run as RunPb);
  }

  /** Replace the run's metadata object. */
  async updateMetadata(runId: string, metadata: Record<string, unknown>): Promise<Run> {
    const reply = await call(
      this.client.rpc.runs.updateRunMetadata({ runId, metadata: toJson(metadata) }, this.client.callOptions),
    );
    return runFromPb(reply.run as RunPb);
  }

  /** The log lines of the run's attempts, oldest first. */
  async *logs(runId: string): AsyncGenerator<LogLine> {
    let pageToken = "";
    do {
      const reply = await call(this.client.rpc.runs.listRunLogs({ runId, pageToken }, this.client.callOptions));
      for (const e of reply.entries) yield logLine(e);
      pageToken = reply.nextPageToken;
    } while (pageToken);
  }

  /** The run's waterfall: its attempts, waits, queue intervals, child runs and log lines. */
  async timeline(runId: string): Promise<RunTimeline> {
    const t = await call(this.client.rpc.runs.getRunTimeline({ runId }, this.client.callOptions));
    return {
      run: runFromPb(t.run as RunPb),
      attempts: t.attempts.map((a) => ({
        id: a.id,
        number: a.number,
        status: a.status,
        createdAt: date(a.createdAt),
        startedAt: date(a.startedAt),
        finishedAt: date(a.finishedAt),
        error: runError(a.error),
      })),
      waits: t.waits.map((w) => ({
        id: w.id,
        kind: w.kind,
        status: w.status,
        attemptNumber: w.attemptNumber,
        startedAt: date(w.startedAt),
        finishedAt: date(w.finishedAt),
        target: w.target,
        dueAt: date(w.dueAt),
        childRunIds: [...w.childRunIds],
      })),
      queueIntervals: t.queueIntervals.map((i) => ({ kind: i.kind, startedAt: date(i.startedAt), finishedAt: date(i.finishedAt) })),
      children: t.children.map(runFromPb),
      logs: t.logs.map(logLine),
      logsTruncated: t.logsTruncated,
    };
  }

  /** Retrieve the run every `intervalMs` (1 s) until it is final; after `timeoutMs` (default:
   * no limit) a RunplaneError naming its status. */
  async poll(runId: string, options: { intervalMs?: number; timeoutMs?: number } = {}): Promise<Run> {
    const deadline = Date.now() + (options.timeoutMs ?? Number.POSITIVE_INFINITY);
    for (;;) {
      const run = await this.retrieve(runId);
      if (run.isFinal) return run;
      if (Date.now() >= deadline) throw new RunplaneError(`run ${runId} is still ${run.status}`);
      await new Promise((resolve) => setTimeout(resolve, options.intervalMs ?? 1000));
    }
  }

  /** The run's current state, then every change in order, ending after its final status. */
  async *subscribeToRun(runId: string, options: { afterVersion?: number; keepOpen?: boolean } = {}): AsyncGenerator<Run> {
    const realtime = await this.client.realtime();
    const request = { runId, afterVersion: BigInt(options.afterVersion ?? 0), keepOpen: options.keepOpen ?? false };
    for await (const response of stream((signal) => realtime.subscribeToRun(request, { signal }))) {
      const run = runFromPb(response.run as RunPb);
      yield run;
      if (run.isFinal && !options.keepOpen) return;
    }
  }

  /** The runs with `tag` (created in the last 24 hours, or after `createdAfter`), then every
   * change of them and of new runs with it; never ends by itself. */
  async *subscribeToRunsWithTag(tag: string, options: { createdAfter?: Date } = {}): AsyncGenerator<Run> {
    const realtime = await this.client.realtime();
    const request = {
      tag,
      createdAfter: options.createdAfter ? timestampFromMs(options.createdAfter.getTime()) : undefined,
      maxChangesPerResponse: 100,
    };
    for await (const response of stream((signal) => realtime.subscribeToRunsWithTag(request, { signal }))) {
      yield runFromPb(response.run as RunPb);
      for (const change of response.moreChanges) yield runFromPb(change.run as RunPb);
    }
  }

  /** The runs of a batch, then every change of them; ends once every run is final. */
  async *subscribeToBatch(batchId: string): AsyncGenerator<Run> {
    const realtime = await this.client.realtime();
    const ids = (await this.client.batch.retrieve(batchId)).runIds;
    const final = new Set<string>();
    const request = { batchId, maxChangesPerResponse: 100 };
    for await (const response of stream((signal) => realtime.subscribeToBatch(request, { signal }))) {
      for (const pb of [response.run, ...response.moreChanges.map((c) => c.run)]) {
        const run = runFromPb(pb as RunPb);
        yield run;
        if (run.isFinal) final.add(run.id);
      }
      if (ids.every((id) => final.has(id))) return;
    }
  }
}

export class BatchAPI extends Namespace {
  /** Trigger runs of several tasks at once, in item order, all or none. */
  async trigger(items: TaskBatchItem[], options: { idempotencyKey?: string } = {}): Promise<BatchHandle> {
    const reply = await call(
      this.client.rpc.runs.batchTriggerRuns(
        {
          items: items.map((item) => ({
            taskId: item.id,
            payload: toJson(item.payload),
            options: triggerOptionsToPb(item.options),
          })),
          idempotencyKey: options.idempotencyKey ?? "",
        },
        this.client.callOptions,
      ),
    );
    return {
      batchId: reply.batchId,
      runs: reply.runs.map((run, i) => handle(run, reply.isCached[i] ?? false)),
    };
  }

  async retrieve(batchId: string): Promise<Batch> {
    const reply = await call(this.client.rpc.runs.getBatch({ batchId }, this.client.callOptions));
    return batchFromPb(reply.batch as NonNullable<typeof reply.batch>);
  }
}

export class QueuesAPI extends Namespace {
  async *list(): AsyncGenerator<Queue> {
    let pageToken = "";
    do {
      const reply = await call(this.client.rpc.queues.listQueues({ pageToken }, this.client.callOptions));
      for (const q of reply.queues) yield queueFromPb(q);
      pageToken = reply.nextPageToken;
    } while (pageToken);
  }

  async retrieve(queue: string): Promise<Queue> {
    return queueFromPb((await call(this.client.rpc.queues.getQueue({ queue }, this.client.callOptions))).queue!);
  }

  /** Nothing new starts; running runs finish; nothing is lost. */
  async pause(queue: string): Promise<Queue> {
    return queueFromPb((await call(this.client.rpc.queues.pauseQueue({ queue }, this.client.callOptions))).queue!);
  }

  async resume(queue: string): Promise<Queue> {
    return queueFromPb((await call(this.client.rpc.queues.resumeQueue({ queue }, this.client.callOptions))).queue!);
  }

  async overrideConcurrencyLimit(queue: string, concurrencyLimit: number): Promise<Queue> {
    const reply = await call(
      this.client.rpc.queues.overrideQueueConcurrencyLimit({ queue, concurrencyLimit }, this.client.callOptions),
    );
    return queueFromPb(reply.queue!);
  }

  async resetConcurrencyLimit(queue: string): Promise<Queue> {
    const reply = await call(this.client.rpc.queues.resetQueueConcurrencyLimit({ queue }, this.client.callOptions));
    return queueFromPb(reply.queue!);
  }
}

export interface CreateScheduleOptions {
  task: string;
  cron: string;
  timezone?: string;
  externalId?: string;
  deduplicationKey?: string;
}

export class SchedulesAPI extends Namespace {
  /** Create a schedule; with a deduplication key, a second create updates the first. */
  async create(options: CreateScheduleOptions): Promise<Schedule & { created: boolean }> {
    const reply = await call(
      this.client.rpc.schedules.createSchedule(
        {
          taskId: options.task,
          cron: options.cron,
          timezone: options.timezone ?? "",
          externalId: options.externalId ?? "",
          deduplicationKey: options.deduplicationKey ?? "",
        },
        this.client.callOptions,
      ),
    );
    return { ...scheduleFromPb(reply.schedule!), created: reply.created };
  }

  async retrieve(scheduleId: string): Promise<Schedule> {
    return scheduleFromPb((await call(this.client.rpc.schedules.getSchedule({ scheduleId }, this.client.callOptions))).schedule!);
  }

  async *list(options: { taskId?: string | string[] } = {}): AsyncGenerator<Schedule> {
    let pageToken = "";
    do {
      const reply = await call(
        this.client.rpc.schedules.listSchedules({ taskIds: list(options.taskId), pageToken }, this.client.callOptions),
      );
      for (const s of reply.schedules) yield scheduleFromPb(s);
      pageToken = reply.nextPageToken;
    } while (pageToken);
  }

  async update(
    scheduleId: string,
    options: { task: string; cron: string; timezone?: string; externalId?: string },
  ): Promise<Schedule> {
    const reply = await call(
      this.client.rpc.schedules.updateSchedule(
        {
          scheduleId,
          taskId: options.task,
          cron: options.cron,
          timezone: options.timezone ?? "",
          externalId: options.externalId,
        },
        this.client.callOptions,
      ),
    );
    return scheduleFromPb(reply.schedule!);
  }

  async delete(scheduleId: string): Promise<void> {
    await call(this.client.rpc.schedules.deleteSchedule({ scheduleId }, this.client.callOptions));
  }

  async activate(scheduleId: string): Promise<Schedule> {
    return scheduleFromPb((await call(this.client.rpc.schedules.activateSchedule({ scheduleId }, this.client.callOptions))).schedule!);
  }

  async deactivate(scheduleId: string): Promise<Schedule> {
    return scheduleFromPb((await call(this.client.rpc.schedules.deactivateSchedule({ scheduleId }, this.client.callOptions))).schedule!);
  }

  /** The IANA time zones schedules accept. */
  async timezones(options: { excludeUtc?: boolean } = {}): Promise<string[]> {
    const reply = await call(
      this.client.rpc.schedules.listTimezones({ excludeUtc: options.excludeUtc ?? false }, this.client.callOptions),
    );
    return [...reply.timezones];
  }
}

export interface CreateTokenOptions {
  /** Unset: never times out. */
  timeout?: DurationLike;
  idempotencyKey?: string;
  idempotencyKeyTtl?: DurationLike;
  tags?: string | string[];
}

/** Wait tokens (`client.wait.createToken`, ...); waiting on one is `wait.forToken` in a task. */
export class TokensAPI extends Namespace {
  async createToken(options: CreateTokenOptions = {}): Promise<WaitToken> {
    const ms = (v: DurationLike | undefined, field: string) => (v === undefined ? undefined : durationFromMs(toMs(v, field)));
    const reply = await call(
      this.client.rpc.waitpoints.createToken(
        {
          timeout: ms(options.timeout, "timeout"),
          idempotencyKey: options.idempotencyKey ?? "",
          idempotencyKeyTtl: ms(options.idempotencyKeyTtl, "idempotencyKeyTtl"),
          tags: list(options.tags),
        },
        this.client.callOptions,
      ),
    );
    return tokenFromPb(reply.token!, reply.isCached, reply.publicAccessToken);
  }

  /** Complete the token with `data`; the runs waiting on it resume. */
  async completeToken(token: string | WaitToken, data?: unknown): Promise<WaitToken> {
    const tokenId = typeof token === "string" ? token : token.id;
    const reply = await call(
      this.client.rpc.waitpoints.completeToken({ tokenId, data: toJson(data) }, this.client.callOptions),
    );
    return tokenFromPb(reply.token!);
  }

  async retrieveToken(token: string | WaitToken): Promise<WaitToken> {
    const tokenId = typeof token === "string" ? token : token.id;
    return tokenFromPb((await call(this.client.rpc.waitpoints.getToken({ tokenId }, this.client.callOptions))).token!);
  }

  async listTokens(
    options: { status?: WaitToken["status"] | WaitToken["status"][]; tags?: string | string[]; idempotencyKey?: string; limit?: number } = {},
  ): Promise<WaitToken[]> {
    const reply = await call(
      this.client.rpc.waitpoints.listTokens(
        {
          statuses: list(options.status).map((s) => WaitpointStatus[s]),
          tags: list(options.tags),
          idempotencyKey: options.idempotencyKey ?? "",
          pageSize: options.limit ?? 100,
        },
        this.client.callOptions,
      ),
    );
    return reply.tokens.map((t) => tokenFromPb(t));
  }
}

export class StreamsAPI extends Namespace {
  /** Every chunk of a run's stream from the first (or after `afterIndex`), until it closes or the
   * run ends. */
  async *read(runId: string, streamId: string, options: { afterIndex?: number } = {}): AsyncGenerator<StreamChunk> {
    const realtime = await this.client.realtime();
    const request = { runId, streamId, afterIndex: BigInt(options.afterIndex ?? 0), maxChunksPerResponse: 100 };
    for await (const response of stream((signal) => realtime.readStream(request, { signal }))) {
      yield { index: Number(response.index), data: JSON.parse(response.data) };
      for (const chunk of response.moreChunks) yield { index: Number(chunk.index), data: JSON.parse(chunk.data) };
    }
  }

  /** Append chunks (JSON values) to a run's stream; `close` ends it for readers. Returns the
   * index of the last chunk. */
  async append(runId: string, streamId: string, chunks: unknown[], options: { close?: boolean } = {}): Promise<number> {
    const realtime = await this.client.realtime();
    const reply = await call(
      realtime.appendStream(
        { runId, streamId, chunks: chunks.map(toJson), close: options.close ?? false },
        this.client.callOptions,
      ),
    );
    return Number(reply.lastIndex);
  }
}

export class VersionsAPI extends Namespace {
  async list(): Promise<WorkerVersion[]> {
    return (await call(this.client.rpc.versions.listVersions({}, this.client.callOptions))).versions.map(versionFromPb);
  }

  /** New runs lock to `version`. */
  async promote(version: string): Promise<WorkerVersion> {
    return versionFromPb((await call(this.client.rpc.versions.promoteVersion({ version }, this.client.callOptions))).version!);
  }

  async rollback(): Promise<WorkerVersion> {
    return versionFromPb((await call(this.client.rpc.versions.rollbackVersion({}, this.client.callOptions))).version!);
  }

  /** Replay parked runs on `toVersion`, or fail them (`fail: true`). */
  async migrate(options: { runIds?: string[]; fromVersion?: string; toVersion?: string; fail?: boolean }): Promise<{ migrated: string[]; skipped: string[] }> {
    const reply = await call(
      this.client.rpc.versions.migrateRuns(
        {
          runIds: options.runIds ?? [],
          fromVersion: options.fromVersion ?? "",
          toVersion: options.toVersion ?? "",
          fail: options.fail ?? false,
        },
        this.client.callOptions,
      ),
    );
    return { migrated: [...reply.migrated], skipped: [...reply.skipped] };
  }
}

export class AuthAPI extends Namespace {
  /** A public access token with these scopes ("read:runs:<id>", "read:tags:<tag>", ...). */
  async createPublicToken(options: { scopes: string[]; expiresIn?: DurationLike; singleUse?: boolean }): Promise<{ token: string; expiresAt: Date | null }> {
    const ms = options.expiresIn === undefined ? undefined : toMs(options.expiresIn, "expiresIn");
    const reply = await call(
      this.client.rpc.auth.createPublicToken(
        {
          scopes: options.scopes,
          expiresIn: ms === undefined ? undefined : durationFromMs(ms),
          singleUse: options.singleUse ?? false,
        },
        this.client.callOptions,
      ),
    );
    return { token: reply.token, expiresAt: date(reply.expiresAt) };
  }
}

export class IdempotencyKeysAPI extends Namespace {
  /** Release a key of a task: the next trigger with it makes a new run. Returns the runs
   * that held it. */
  async reset(taskId: string, idempotencyKey: string): Promise<number> {
    const reply = await call(this.client.rpc.runs.resetIdempotencyKey({ taskId, idempotencyKey }, this.client.callOptions));
    return reply.released;
  }
}

export class TagsAPI extends Namespace {
  async add(runId: string, tags: string | string[]): Promise<Run> {
    const reply = await call(this.client.rpc.runs.addRunTags({ runId, tags: list(tags) }, this.client.callOptions));
    return runFromPb(reply.run as RunPb);
  }
}
