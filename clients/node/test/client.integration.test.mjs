// The client against a running cluster: every namespace, realtime subscriptions and streams, and
// a worker started in this process. Needs RUNPLANE_API_URL, RUNPLANE_REALTIME_URL,
// RUNPLANE_SECRET_KEY (and RUNPLANE_WORKER_KEY for the worker test) of a cluster whose executor
// serves tests.e2e.node_tasks; tests/e2e/test_node_client.py sets that up. Skipped without them.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, describe, test } from "node:test";

import {
  Client,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  closeClient,
  metadata,
  startWorker,
  task,
  wait,
} from "../dist/index.js";

const live = Boolean(process.env.RUNPLANE_API_URL && process.env.RUNPLANE_SECRET_KEY);
const skip = live ? false : "no cluster: RUNPLANE_API_URL and RUNPLANE_SECRET_KEY are not set";
const client = live ? new Client() : null;
const unique = () => randomUUID().slice(0, 8);

async function collect(iterable, limit = Number.POSITIVE_INFINITY) {
  const out = [];
  for await (const item of iterable) {
    out.push(item);
    if (out.length >= limit) break;
  }
  return out;
}

async function finalRun(id) {
  let last;
  for await (const run of client.runs.subscribeToRun(id)) last = run;
  return last;
}

describe("runs", { skip }, () => {
  test("trigger, follow every version to the end, and read the run's stream", async () => {
    const tag = `node-${unique()}`;
    const handle = await client.trigger("stream-words", { n: 5 }, { tags: [tag] });
    assert.match(handle.id, /^run_/);
    assert.equal(handle.isCached, false);
    const versions = await collect(client.runs.subscribeToRun(handle.id));
    assert.deepEqual(
      versions.map((r) => r.version),
      Array.from({ length: versions.length }, (_, i) => i + 1),
      "every version, in order",
    );
    const last = versions.at(-1);
    assert.equal(last.status, "COMPLETED");
    assert.equal(last.output, 5);
    assert.deepEqual(last.tags, [tag]);
    const chunks = await collect(client.streams.read(handle.id, "tokens"));
    assert.deepEqual(
      chunks.map((c) => c.data),
      ["word-0", "word-1", "word-2", "word-3", "word-4"],
    );
    assert.deepEqual(
      chunks.map((c) => c.index),
      [1, 2, 3, 4, 5],
    );
    const listed = await collect(client.runs.list({ tag, status: "COMPLETED" }));
    assert.deepEqual(
      listed.map((r) => r.id),
      [handle.id],
    );
    // The trigger's public access token reads this run, and only it.
    const reader = new Client({ secretKey: handle.publicAccessToken });
    assert.equal((await reader.runs.retrieve(handle.id)).status, "COMPLETED");
    const other = await client.trigger("py-child", { n: 1 });
    await assert.rejects(reader.runs.retrieve(other.id), PermissionDeniedError);
    reader.close();
  });

  test("cancel, reschedule and replay; tags, metadata, logs and the timeline", async () => {
    const delayed = await client.trigger("py-child", { n: 2 }, { delay: "1h" });
    assert.equal(delayed.run.status, "DELAYED");
    const moved = await client.runs.reschedule(delayed.id, new Date(Date.now() + 7_200_000));
    assert.ok(moved.delayUntil.getTime() > Date.now() + 3_600_000);
    const tagged = await client.tags.add(delayed.id, ["extra"]);
    assert.deepEqual(tagged.tags, ["extra"]);
    const updated = await client.runs.updateMetadata(delayed.id, { note: "hi" });
    assert.deepEqual(updated.metadata, { note: "hi" });
    assert.equal((await client.runs.cancel(delayed.id)).status, "CANCELED");

    const done = await finalRun((await client.trigger("py-child", { n: 3 })).id);
    assert.deepEqual(done.output, { doubled: 6, parent: null });
    const replay = await client.runs.replay(done.id);
    assert.equal(replay.replayedFromRunId, done.id);
    assert.deepEqual((await finalRun(replay.id)).output, { doubled: 6, parent: null });
    assert.ok(Array.isArray(await collect(client.runs.logs(done.id))));
    const timeline = await client.runs.timeline(done.id);
    assert.equal(timeline.run.id, done.id);
    assert.deepEqual(
      timeline.attempts.map((a) => [a.number, a.status]),
      [[1, "COMPLETED"]],
    );
    assert.ok(timeline.attempts[0].finishedAt instanceof Date);
    assert.equal((await client.runs.poll(done.id, { intervalMs: 50 })).status, "COMPLETED");
  });

  test("idempotency keys return the same run until reset", async () => {
    const key = `key-${unique()}`;
    const first = await client.trigger("py-child", { n: 4 }, { idempotencyKey: key });
    const again = await client.trigger("py-child", { n: 4 }, { idempotencyKey: key });
    assert.equal(again.id, first.id);
    assert.equal(again.isCached, true);
    assert.equal(await client.idempotencyKeys.reset("py-child", key), 1);
    assert.notEqual((await client.trigger("py-child", { n: 4 }, { idempotencyKey: key })).id, first.id);
  });

  test("failed calls throw typed errors", async () => {
    await assert.rejects(client.runs.retrieve("run_doesnotexist"), NotFoundError);
    const tags = Array.from({ length: 11 }, (_, i) => `t${i}`);
    await assert.rejects(client.trigger("py-child", { n: 1 }, { tags }), (e) => {
      assert.ok(e instanceof InvalidArgumentError);
      assert.equal(e.code, "INVALID_ARGUMENT");
      return true;
    });
  });
});

describe("batches and subscriptions", { skip }, () => {
  test("a batch across tasks, followed until every run is final", async () => {
    const batch = await client.batch.trigger([
      { id: "py-child", payload: { n: 1 } },
      { id: "py-queued", payload: "q" },
    ]);
    assert.equal(batch.runs.length, 2);
    const runs = await collect(client.runs.subscribeToBatch(batch.batchId));
    const final = new Map(runs.filter((r) => r.isFinal).map((r) => [r.id, r]));
    assert.deepEqual(
      batch.runs.map((h) => final.get(h.id)?.status),
      ["COMPLETED", "COMPLETED"],
    );
    const retrieved = await client.batch.retrieve(batch.batchId);
    assert.deepEqual(
      retrieved.runIds,
      batch.runs.map((h) => h.id),
    );
    assert.equal(retrieved.status, "COMPLETED");
    const one = await client.batchTrigger("py-child", [{ payload: { n: 7 } }, { payload: { n: 8 } }]);
    assert.deepEqual(
      one.runs.map((h) => h.run.taskId),
      ["py-child", "py-child"],
    );
  });

  test("a tag subscription sees a new run with the tag to its end", async () => {
    const tag = `sub-${unique()}`;
    const seen = [];
    const following = (async () => {
      for await (const run of client.runs.subscribeToRunsWithTag(tag)) {
        seen.push(run);
        if (run.isFinal) return;
      }
    })();
    // A run made before or after the subscription opens is in it (created in the last 24 hours).
    const handle = await client.trigger("py-child", { n: 5 }, { tags: [tag] });
    await following;
    assert.ok(seen.every((r) => r.id === handle.id));
    assert.equal(seen.at(-1).status, "COMPLETED");
  });

  test("a stream appended from outside is read back, then closed", async () => {
    const handle = await client.trigger("py-child", { n: 1 }, { delay: "1h" });
    const last = await client.streams.append(handle.id, "notes", [{ a: 1 }, "two"], { close: true });
    assert.equal(last, 2);
    const chunks = await collect(client.streams.read(handle.id, "notes"));
    assert.deepEqual(
      chunks.map((c) => c.data),
      [{ a: 1 }, "two"],
    );
    await client.runs.cancel(handle.id);
  });
});

describe("queues, schedules, tokens, versions", { skip }, () => {
  test("a queue is paused, resumed, overridden and reset", async () => {
    const names = (await collect(client.queues.list())).map((q) => q.name);
    assert.ok(names.includes("node-client-queue"), names.join(","));
    assert.equal((await client.queues.pause("node-client-queue")).paused, true);
    assert.equal((await client.queues.resume("node-client-queue")).paused, false);
    const overridden = await client.queues.overrideConcurrencyLimit("node-client-queue", 7);
    assert.equal(overridden.concurrencyLimit, 7);
    assert.equal(overridden.overrideConcurrencyLimit, 7);
    const reset = await client.queues.resetConcurrencyLimit("node-client-queue");
    assert.equal(reset.concurrencyLimit, 3);
    assert.equal(reset.overrideConcurrencyLimit, null);
    assert.equal((await client.queues.retrieve("node-client-queue")).baseConcurrencyLimit, 3);
  });

  test("a schedule's life: create, read, update, deactivate, activate, delete", async () => {
    const externalId = `ext-${unique()}`;
    const created = await client.schedules.create({
      task: "py-child",
      cron: "0 9 * * 1-5",
      timezone: "Europe/London",
      externalId,
      deduplicationKey: externalId,
    });
    assert.equal(created.created, true);
    assert.equal(created.type, "IMPERATIVE");
    assert.ok(created.nextRun instanceof Date);
    assert.equal((await client.schedules.retrieve(created.id)).externalId, externalId);
    const listed = await collect(client.schedules.list({ taskId: "py-child" }));
    assert.ok(listed.some((s) => s.id === created.id));
    assert.equal((await client.schedules.update(created.id, { task: "py-child", cron: "30 9 * * *" })).cron, "30 9 * * *");
    assert.equal((await client.schedules.deactivate(created.id)).active, false);
    assert.equal((await client.schedules.activate(created.id)).active, true);
    await client.schedules.delete(created.id);
    await assert.rejects(client.schedules.retrieve(created.id), NotFoundError);
    assert.ok((await client.schedules.timezones()).includes("Europe/London"));
  });

  test("a wait token is created, listed, completed and read back", async () => {
    const tag = `tok-${unique()}`;
    const token = await client.wait.createToken({ timeout: "10m", tags: tag });
    assert.equal(token.status, "WAITING");
    assert.match(token.url, /^http/);
    assert.ok(token.publicAccessToken);
    assert.deepEqual(
      (await client.wait.listTokens({ tags: tag })).map((t) => t.id),
      [token.id],
    );
    const completed = await client.wait.completeToken(token, { approved: true });
    assert.equal(completed.status, "COMPLETED");
    assert.deepEqual((await client.wait.retrieveToken(token.id)).output, { approved: true });
  });

  test("server info, versions and a public token", async () => {
    const info = await client.serverInfo();
    assert.equal(info.environment, "dev");
    assert.ok(info.realtimeUrl);
    const versions = await client.versions.list();
    assert.ok(versions.some((v) => v.taskIds.includes("py-child")));
    const { token, expiresAt } = await client.auth.createPublicToken({ scopes: ["read:tags:x"], expiresIn: "1h" });
    assert.ok(token);
    assert.ok(expiresAt.getTime() > Date.now());
  });
});

describe("a worker in this process", { skip: live && process.env.RUNPLANE_WORKER_KEY ? false : skip || "no RUNPLANE_WORKER_KEY" }, () => {
  const id = `node-inline-${unique()}`;
  const inline = task({
    id,
    run: async (payload, ctx) => {
      metadata.set("phase", "waiting");
      await wait.for({ seconds: 0.2 });
      metadata.set("phase", "done");
      return { got: payload, attempt: ctx.attempt.number, run: ctx.run.id };
    },
  });
  const worker = live ? startWorker({ tasks: [inline], log: () => {} }) : null;
  after(() => worker?.stop());

  test("runs a task triggered through its handle, through a wait", async () => {
    await worker.ready;
    const handle = await inline.trigger({ x: 1 });
    const statuses = [];
    let last;
    for await (const run of client.runs.subscribeToRun(handle.id)) {
      statuses.push(run.status);
      last = run;
    }
    assert.equal(last.status, "COMPLETED");
    assert.deepEqual(last.output, { got: { x: 1 }, attempt: 1, run: handle.id });
    assert.deepEqual(last.metadata, { phase: "done" });
    assert.ok(statuses.includes("WAITING"), statuses.join(","));
  });
});

after(() => {
  // Open HTTP/2 sessions would keep the process alive.
  client?.close();
  closeClient();
});
