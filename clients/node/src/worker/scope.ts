/** The attempt a piece of task code runs in, found through AsyncLocalStorage: what `wait`,
 * `metadata`, `logger` and `triggerAndWait` act on. */
import { AsyncLocalStorage } from "node:async_hooks";

import type { MessageInitShape } from "@bufbuild/protobuf";

import { ConfigurationError } from "../errors.js";
import type { BatchTriggerItemSchema } from "../gen/runplane/v1/run_service_pb.js";
import type { WaitOutcome } from "./journal.js";
import type { MetadataBuffer } from "./metadata.js";

/** What a task's `run` gets besides its payload. */
export interface Context {
  run: {
    id: string;
    taskId: string;
    tags: string[];
    isTest: boolean;
    createdAt: Date | null;
    idempotencyKey: string;
    maxAttempts: number;
    parentRunId: string;
    rootRunId: string;
    batchId: string;
    queue: string;
    /** The run was made by `runs.replay` from another. */
    isReplay: boolean;
  };
  attempt: { id: string; number: number };
  environment: { id: string; slug: string };
  /** The worker version running the attempt. */
  version: string;
  /** Aborted when the run is cancelled (or runs past its max duration): stop soon. */
  signal: AbortSignal;
}

/** A wait as the scheduler takes it (a WaitRequest without attempt and seq). */
export type WaitSpec =
  | { kind: "durationMs"; value: number; idempotencyKey?: string; idempotencyKeyTtlMs?: number }
  | { kind: "untilMs"; value: number; idempotencyKey?: string; idempotencyKeyTtlMs?: number }
  | { kind: "tokenId"; value: string }
  | { kind: "children"; items: MessageInitShape<typeof BatchTriggerItemSchema>[] };

export interface LogRecord {
  level: "debug" | "info" | "warning" | "error";
  message: string;
  attributes: Record<string, unknown>;
}

export interface AttemptScope {
  ctx: Context;
  metadata: MetadataBuffer;
  wait(spec: WaitSpec): Promise<WaitOutcome>;
  log(record: LogRecord): void;
  flush(): void;
}

export const attemptStorage = new AsyncLocalStorage<AttemptScope>();

export function currentScope(what: string): AttemptScope {
  const scope = attemptStorage.getStore();
  if (scope === undefined) throw new ConfigurationError(`${what} can only be called inside a task run`);
  return scope;
}
