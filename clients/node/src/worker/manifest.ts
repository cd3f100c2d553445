/** A worker's manifest: its tasks' definitions, registered as one worker version. */
import { createHash } from "node:crypto";

import { create, toBinary } from "@bufbuild/protobuf";

import { toMs } from "../durations.js";
import { ConfigurationError } from "../errors.js";
import { type Manifest, ManifestSchema, type TaskDefinition, TaskDefinitionSchema } from "../gen/runplane/v1/worker_service_pb.js";
import type { Task } from "./task.js";

export const DEFAULT_MACHINE = "small-1x";

function seconds(value: number | string | undefined, field: string): number {
  return value === undefined ? 0 : toMs(value, field) / 1000;
}

export function taskDefinition(t: Task<never, unknown>): TaskDefinition {
  const o = t.options;
  const queue = typeof o.queue === "string" ? { name: o.queue } : (o.queue ?? { name: `task/${t.id}` });
  const retry = o.retry ?? {};
  return create(TaskDefinitionSchema, {
    id: t.id,
    queue: queue.name,
    queueConcurrencyLimit: queue.concurrencyLimit ?? 0,
    queueTotalConcurrencyLimit: queue.totalConcurrencyLimit ?? 0,
    queueRateLimit: queue.rateLimit?.limit ?? 0,
    queueRatePeriodSeconds: seconds(queue.rateLimit?.period, `task ${t.id}: queue.rateLimit.period`),
    retry: {
      maxAttempts: retry.maxAttempts ?? 3,
      factor: retry.factor ?? 2,
      minTimeoutSeconds: retry.minTimeout ?? 1,
      maxTimeoutSeconds: retry.maxTimeout ?? 60,
      randomize: retry.randomize ?? true,
    },
    maxDurationSeconds: seconds(o.maxDuration, `task ${t.id}: maxDuration`),
    ttlSeconds: seconds(o.ttl, `task ${t.id}: ttl`),
    machine: o.machine ?? DEFAULT_MACHINE,
    description: o.description ?? "",
    payloadSchema: o.payloadSchema ? JSON.stringify(o.payloadSchema) : "",
    schedule: o.schedule ? { cron: o.schedule.cron, timezone: o.schedule.timezone ?? "" } : undefined,
  });
}

/** The manifest of `tasks` as `version`; without one, "h-" and a hash of the definitions and the
 * tasks' source (so changed code is a new version, as the Python executor does it). */
export function buildManifest(tasks: Task<never, unknown>[], version = ""): Manifest {
  const seen = new Set<string>();
  for (const t of tasks) {
    if (seen.has(t.id)) throw new ConfigurationError(`two tasks have the id ${t.id}`);
    seen.add(t.id);
  }
  const sorted = [...tasks].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const manifest = create(ManifestSchema, { tasks: sorted.map(taskDefinition) });
  if (!version) {
    const digest = createHash("sha256").update(toBinary(ManifestSchema, manifest));
    for (const t of sorted) digest.update(`${t.id}\0${String(t.options.run)}\0`);
    version = `h-${digest.digest("hex").slice(0, 16)}`;
  }
  manifest.version = version;
  return manifest;
}
