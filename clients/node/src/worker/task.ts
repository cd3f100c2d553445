/** `task({ id, run })`: a task definition a worker registers, and a typed handle to trigger it. */
import type { DurationLike } from "../durations.js";
import { toMs } from "../durations.js";
import { ConfigurationError } from "../errors.js";
import type { RunHandle, TriggerOptions } from "../models.js";
import { type Result, batchTriggerAndWait, client, trigger, triggerAndWait } from "./api.js";
import type { Context } from "./scope.js";

export interface RetryOptions {
  /** Attempts in all, the first included (default 3). */
  maxAttempts?: number;
  factor?: number;
  /** Seconds before the first retry (default 1). */
  minTimeout?: number;
  /** The longest back-off, seconds (default 60). */
  maxTimeout?: number;
  randomize?: boolean;
}

export interface QueueOptions {
  name: string;
  concurrencyLimit?: number;
  totalConcurrencyLimit?: number;
  rateLimit?: { limit: number; period: DurationLike };
}

export interface TaskOptions<P, R> {
  id: string;
  run: (payload: P, ctx: Context) => R | Promise<R>;
  description?: string;
  /** A queue name, or a queue with limits; default `task/<id>`. */
  queue?: string | QueueOptions;
  retry?: RetryOptions;
  /** Seconds of execution per attempt (waits excluded); past it the run ends TIMED_OUT. */
  maxDuration?: DurationLike;
  /** A run not started this long after being queued expires. */
  ttl?: DurationLike;
  /** A machine preset name, e.g. "small-1x" (the default). */
  machine?: string;
  /** JSON Schema every payload must satisfy (checked by the scheduler on every trigger). */
  payloadSchema?: Record<string, unknown>;
  /** A declarative cron schedule. */
  schedule?: { cron: string; timezone?: string };
}

export interface Task<P = unknown, R = unknown> {
  readonly id: string;
  readonly options: TaskOptions<P, R>;
  /** Trigger a run (inside a run: a child of it). */
  trigger(payload: P, options?: TriggerOptions): Promise<RunHandle>;
  /** Trigger runs of this task, all or none. */
  batchTrigger(items: { payload: P; options?: TriggerOptions }[]): Promise<{ batchId: string; runs: RunHandle[] }>;
  /** Inside a run: trigger a child run and wait for it durably. */
  triggerAndWait(payload: P, options?: TriggerOptions): Promise<Result<Awaited<R>>>;
  batchTriggerAndWait(items: { payload: P; options?: TriggerOptions }[]): Promise<Result<Awaited<R>>[]>;
}

const ID = /^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$/;

export function task<P = unknown, R = unknown>(options: TaskOptions<P, R>): Task<P, R> {
  if (!ID.test(options.id)) throw new ConfigurationError(`task id "${options.id}": use letters, digits and _ . : / -`);
  if (typeof options.run !== "function") throw new ConfigurationError(`task ${options.id}: run must be a function`);
  // Checked now, so a bad duration fails at definition rather than at registration.
  if (options.maxDuration !== undefined) toMs(options.maxDuration, `task ${options.id}: maxDuration`);
  if (options.ttl !== undefined) toMs(options.ttl, `task ${options.id}: ttl`);
  return {
    id: options.id,
    options,
    trigger: (payload, triggerOptions) => trigger(options.id, payload, triggerOptions),
    batchTrigger: (items) => client().batchTrigger(options.id, items),
    triggerAndWait: (payload, triggerOptions) => triggerAndWait<Awaited<R>>(options.id, payload, triggerOptions),
    batchTriggerAndWait: (items) =>
      batchTriggerAndWait<Awaited<R>>(items.map((item) => ({ id: options.id, payload: item.payload, options: item.options }))),
  };
}
