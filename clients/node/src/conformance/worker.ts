/**
 * The conformance worker: the tasks the Python conformance suite runs against the Node worker.
 *
 *   RUNPLANE_URL=host:port RUNPLANE_WORKER_KEY=... [RUNPLANE_VERSION=...] [RUNPLANE_EXECUTOR_ID=...] \
 *     node clients/node/dist/conformance/worker.js
 *
 * Prints "conformance worker ready" once registered; runs until SIGTERM (or SIGINT), then stops
 * and exits 0.
 */
import { setTimeout as sleep } from "node:timers/promises";

import { logger, metadata, startWorker, task, wait } from "../index.js";

const echo = task({
  id: "conformance-echo",
  run: (payload: unknown) => payload,
});

const waitFor = task({
  id: "conformance-wait",
  run: async (payload: { seconds: number }) => {
    await wait.for({ seconds: payload.seconds });
    return { waited: payload.seconds };
  },
});

const token = task({
  id: "conformance-token",
  run: async (payload: { token_id: string }) => {
    const result = await wait.forToken(payload.token_id);
    return { token: result.unwrap() };
  },
});

const plainSleep = task({
  id: "conformance-sleep",
  // A plain timer, not a durable wait: it ends early (rejecting) when the run is cancelled.
  run: async (payload: { seconds: number }, ctx) => {
    await sleep(payload.seconds * 1000, undefined, { signal: ctx.signal });
    return { slept: payload.seconds };
  },
});

const log = task({
  id: "conformance-log",
  run: () => {
    logger.info("hello");
    metadata.set("step", 1);
    return "ok";
  },
});

const worker = startWorker({
  tasks: [echo, waitFor, token, plainSleep, log],
  apiUrl: process.env.RUNPLANE_URL || undefined,
});

let stopping = false;
async function stop(): Promise<void> {
  if (stopping) return;
  stopping = true;
  await worker.stop();
  process.exit(0);
}
process.on("SIGTERM", () => void stop());
process.on("SIGINT", () => void stop());

await worker.ready;
process.stdout.write("conformance worker ready\n");
