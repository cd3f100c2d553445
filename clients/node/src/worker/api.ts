/** What task code calls: `wait`, `metadata`, `logger`, `triggerAndWait`. */
import { Client } from "../client.js";
import { type DurationLike, toMs } from "../durations.js";
import { ConfigurationError, TaskRunError, WaitpointTimeoutError } from "../errors.js";
import { type RunHandle, type TriggerOptions, type WaitToken, toJson, triggerOptionsToPb } from "../models.js";
import type { WaitOutcome } from "./journal.js";
import { attemptStorage, currentScope } from "./scope.js";

/** The outcome of a wait on a token or a child run: `ok` with `output`, or `error`. */
export class Result<T = unknown> {
  constructor(
    readonly ok: boolean,
    readonly output: T | undefined,
    readonly error: Error | undefined,
    /** The child run's id, for child-run results. */
    readonly id = "",
  ) {}

  /** The output, or throw the error. */
  unwrap(): T {
    if (!this.ok) throw this.error ?? new TaskRunError("", "failed");
    return this.output as T;
  }
}

function errorOf(e: WaitOutcome["error"] | { type?: string; message?: string; stack_trace?: string } | null): Error {
  const type = e?.type ?? "";
  if (type === "WaitpointTimeoutError") return new WaitpointTimeoutError(e?.message || undefined);
  const stack = e !== null && "stackTrace" in e ? e.stackTrace : e !== null && "stack_trace" in e ? e.stack_trace : "";
  return new TaskRunError(type, e?.message ?? "", stack ?? "");
}

let defaultClient: Client | null = null;

/** The client task code triggers with (RUNPLANE_* from the environment; needs a secret key). */
export function client(): Client {
  defaultClient ??= new Client();
  return defaultClient;
}

/** Close the default client's sessions, if one was made. */
export function closeClient(): void {
  defaultClient?.close();
  defaultClient = null;
}

/** Use this client for `tasks.trigger`, `wait.createToken`, ... instead of one from the environment. */
export function configure(c: Client): void {
  defaultClient = c;
}

export interface WaitForOptions {
  seconds?: number;
  minutes?: number;
  hours?: number;
  days?: number;
  /** A later wait with the same key (a retry's) ends when the first one does. */
  idempotencyKey?: string;
  idempotencyKeyTtl?: DurationLike;
}

export const wait = {
  /** Block the run this long; it is WAITING meanwhile and holds no concurrency slot. */
  async for(options: WaitForOptions): Promise<void> {
    const ms = Math.round(
      1000 * ((options.seconds ?? 0) + 60 * (options.minutes ?? 0) + 3600 * (options.hours ?? 0) + 86400 * (options.days ?? 0)),
    );
    if (!(ms >= 0)) throw new ConfigurationError("wait.for: the duration must not be negative");
    const outcome = await currentScope("wait.for").wait({ kind: "durationMs", value: ms, ...keyed(options) });
    if (!outcome.ok) throw errorOf(outcome.error);
  },

  /** Block the run until `date`. */
  async until(date: Date, options: Omit<WaitForOptions, "seconds" | "minutes" | "hours" | "days"> = {}): Promise<void> {
    const outcome = await currentScope("wait.until").wait({ kind: "untilMs", value: date.getTime(), ...keyed(options) });
    if (!outcome.ok) throw errorOf(outcome.error);
  },

  /** Block the run until the token is completed (ok, with its data) or times out (not ok,
   * WaitpointTimeoutError). */
  async forToken<T = unknown>(token: string | WaitToken): Promise<Result<T>> {
    const tokenId = typeof token === "string" ? token : token.id;
    const outcome = await currentScope("wait.forToken").wait({ kind: "tokenId", value: tokenId });
    return outcome.ok
      ? new Result<T>(true, (outcome.output ? JSON.parse(outcome.output) : null) as T, undefined)
      : new Result<T>(false, undefined, errorOf(outcome.error));
  },

  /** A token a run can wait on; callable anywhere (with a secret key). */
  createToken(options: Parameters<Client["wait"]["createToken"]>[0] = {}): Promise<WaitToken> {
    return client().wait.createToken(options);
  },

  completeToken(token: string | WaitToken, data?: unknown): Promise<WaitToken> {
    return client().wait.completeToken(token, data);
  },

  retrieveToken(token: string | WaitToken): Promise<WaitToken> {
    return client().wait.retrieveToken(token);
  },
};

function keyed(options: { idempotencyKey?: string; idempotencyKeyTtl?: DurationLike }) {
  if (!options.idempotencyKey) return {};
  return {
    idempotencyKey: options.idempotencyKey,
    idempotencyKeyTtlMs: options.idempotencyKeyTtl === undefined ? 0 : toMs(options.idempotencyKeyTtl, "idempotencyKeyTtl"),
  };
}

/** Trigger runs of tasks from inside a run (their parent is this run) and wait for all of them;
 * results in item order. */
export async function batchTriggerAndWait<T = unknown>(
  items: { id: string; payload?: unknown; options?: TriggerOptions }[],
): Promise<Result<T>[]> {
  const scope = currentScope("batchTriggerAndWait");
  const outcome = await scope.wait({
    kind: "children",
    items: items.map((item) => ({
      taskId: item.id,
      payload: toJson(item.payload),
      options: triggerOptionsToPb(item.options),
    })),
  });
  if (!outcome.ok) throw errorOf(outcome.error);
  const results = JSON.parse(outcome.output) as { ok: boolean; output: unknown; error: null | { type: string; message: string; stack_trace?: string }; id: string }[];
  return results.map((r) =>
    r.ok ? new Result<T>(true, r.output as T, undefined, r.id) : new Result<T>(false, undefined, errorOf(r.error), r.id),
  );
}

/** Trigger a run of `taskId` from inside a run and wait for it to finish. */
export async function triggerAndWait<T = unknown>(taskId: string, payload?: unknown, options?: TriggerOptions): Promise<Result<T>> {
  const [result] = await batchTriggerAndWait<T>([{ id: taskId, payload, options }]);
  return result as Result<T>;
}

/** Trigger a run (not waiting for it); inside a run, the new run is its child. */
export function trigger(taskId: string, payload?: unknown, options: TriggerOptions = {}): Promise<RunHandle> {
  const parent = attemptStorage.getStore()?.ctx.run.id;
  return client().trigger(taskId, payload, parent && !options.parentRunId ? { ...options, parentRunId: parent } : options);
}

/** The current run's metadata: changes are sent about once a second and when the attempt ends
 * or waits. */
export const metadata = {
  get(key: string): unknown {
    return currentScope("metadata.get").metadata.get(key);
  },
  current(): Record<string, unknown> {
    return currentScope("metadata.current").metadata.snapshot();
  },
  set(key: string, value: unknown): void {
    currentScope("metadata.set").metadata.set(key, value);
  },
  delete(key: string): void {
    currentScope("metadata.delete").metadata.delete(key);
  },
  append(key: string, value: unknown): void {
    currentScope("metadata.append").metadata.append(key, value);
  },
  remove(key: string, value: unknown): void {
    currentScope("metadata.remove").metadata.remove(key, value);
  },
  increment(key: string, by = 1): void {
    currentScope("metadata.increment").metadata.increment(key, by);
  },
  decrement(key: string, by = 1): void {
    currentScope("metadata.decrement").metadata.decrement(key, by);
  },
  replace(value: Record<string, unknown>): void {
    currentScope("metadata.replace").metadata.replace(value);
  },
  /** Send the changes now. */
  flush(): void {
    currentScope("metadata.flush").flush();
  },
};

function logAt(level: "debug" | "info" | "warning" | "error") {
  return (message: string, attributes: Record<string, unknown> = {}): void => {
    const scope = attemptStorage.getStore();
    if (scope === undefined) {
      // Outside a run: to the console, like the Python SDK's logger outside a run.
      console.error(`[${level}] ${message}`, Object.keys(attributes).length ? attributes : "");
      return;
    }
    scope.log({ level, message, attributes });
  };
}

/** Log lines of the run (`runplane runs logs ID`). */
export const logger = {
  debug: logAt("debug"),
  info: logAt("info"),
  warn: logAt("warning"),
  error: logAt("error"),
};
