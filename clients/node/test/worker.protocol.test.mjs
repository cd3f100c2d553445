// The worker against a scripted scheduler (a connect-node gRPC server in this process): the
// messages of docs/worker-protocol.md in order, the wait journal, a reconnect and a cancel.
import assert from "node:assert/strict";
import http2 from "node:http2";
import { after, test } from "node:test";

import { connectNodeAdapter } from "@connectrpc/connect-node";

import { WorkerService } from "../dist/gen/runplane/v1/worker_service_pb.js";
import { metadata, startWorker, task, wait } from "../dist/index.js";

const journaled = task({
  id: "journaled",
  run: async (payload) => {
    metadata.set("step", payload.n);
    await wait.for({ seconds: 5 });
    const token = await wait.forToken("tok_1");
    return { token: token.output };
  },
});

const sleepy = task({
  id: "sleepy",
  run: (payload, ctx) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => resolve("slept"), payload.ms);
      ctx.signal.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(ctx.signal.reason);
      });
    }),
});

/** A scheduler whose sessions are scripted by `script(session, requests)` generators. */
async function scheduler(script) {
  let sessions = 0;
  const server = http2.createServer(
    connectNodeAdapter({
      routes: (router) =>
        router.service(WorkerService, {
          async *connect(requests) {
            const it = requests[Symbol.asyncIterator]();
            // The next message of the worker, heartbeats skipped.
            const next = async () => {
              for (;;) {
                const { value, done } = await it.next();
                if (done) return null;
                if (value.message.case !== "heartbeat") return value.message;
              }
            };
            yield* script(++sessions, next);
          },
        }),
    }),
  );
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, url: `127.0.0.1:${server.address().port}` };
}

const message = (kase, value) => ({ message: { case: kase, value } });
const run = (id, taskId, payload) => ({ id, taskId, payload: JSON.stringify(payload), metadata: "{}" });

test("register, assignments, journaled waits, a reconnect and a cancel, in protocol order", async () => {
  const seen = [];
  let finish;
  const finished = new Promise((resolve) => {
    finish = resolve;
  });
  const { server, url } = await scheduler(async function* (session, next) {
    const register = await next();
    seen.push(["register", session, register.value]);
    yield message("registered", { executorId: "exec_1", sessionToken: `token-${session}`, heartbeatIntervalMs: 60_000, protocolVersion: 1 });
    if (session === 1) {
      yield message("assignment", { run: run("run_1", "journaled", { n: 7 }), attemptId: "att_1", attemptNumber: 1 });
      for (const m of [await next(), await next(), await next(), await next()]) seen.push([m.case, m.value]);
      // Seq 1 answered, and seq 2 ahead of its request, as a replay's journal answers them.
      yield message("resume", {
        attemptId: "att_1",
        results: [
          { seq: 1, ok: true, output: "null" },
          { seq: 2, ok: true, output: '{"x":1}' },
        ],
      });
      const result = await next();
      seen.push([result.case, result.value]);
      yield message("assignment", { run: run("run_2", "sleepy", { ms: 300 }), attemptId: "att_2", attemptNumber: 1 });
      await next(); // ack
      await next(); // started
      return; // the stream ends under a running attempt
    }
    const result = await next();
    seen.push([result.case, result.value]);
    yield message("assignment", { run: run("run_3", "sleepy", { ms: 60_000 }), attemptId: "att_3", attemptNumber: 2 });
    await next(); // ack
    await next(); // started
    yield message("cancel", { attemptId: "att_3", runId: "run_3" });
    const canceled = await next();
    seen.push([canceled.case, canceled.value]);
    finish();
    await next(); // until the worker stops
  });
  const worker = startWorker({
    tasks: [journaled, sleepy],
    apiUrl: url,
    workerKey: "rp_worker_test",
    executorId: "exec_1",
    version: "v-test",
    capacity: 3,
    log: () => {},
  });
  after(async () => {
    await worker.stop();
    server.close();
  });
  await worker.ready;
  await finished;

  const [register1, ack, started, update, waitRequest, result1, register2, result2, canceled] = seen;
  assert.equal(register1[1], 1);
  assert.equal(register1[2].protocolVersion, 1);
  assert.equal(register1[2].executorId, "exec_1");
  assert.equal(register1[2].capacity, 3);
  assert.equal(register1[2].manifest.version, "v-test");
  assert.deepEqual(
    register1[2].manifest.tasks.map((t) => t.id),
    ["journaled", "sleepy"],
  );
  assert.deepEqual(register1[2].runningAttemptIds, []);
  assert.deepEqual([ack[0], ack[1].attemptId], ["ack", "att_1"]);
  assert.deepEqual([started[0], started[1].attemptId], ["started", "att_1"]);
  assert.ok(started[1].startedAt);
  // The metadata set before the wait goes out before it.
  assert.equal(update[0], "metadata");
  assert.deepEqual(
    update[1].operations.map((o) => [o.type, o.key, o.value]),
    [["set", "step", "7"]],
  );
  assert.equal(waitRequest[0], "wait");
  assert.equal(waitRequest[1].seq, 1);
  assert.deepEqual(waitRequest[1].wait, { case: "durationMs", value: 5000n });
  // Seq 2 came with the Resume: no request for it, the result follows at once.
  assert.equal(result1[0], "result");
  assert.deepEqual(result1[1].outcome, { case: "output", value: '{"token":{"x":1}}' });
  // The reconnect: the same id, the session token, and the attempt still running.
  assert.equal(register2[1], 2);
  assert.equal(register2[2].executorId, "exec_1");
  assert.equal(register2[2].sessionToken, "token-1");
  assert.deepEqual(register2[2].runningAttemptIds, ["att_2"]);
  assert.equal(result2[0], "result");
  assert.equal(result2[1].attemptId, "att_2");
  assert.deepEqual(result2[1].outcome, { case: "output", value: '"slept"' });
  assert.equal(canceled[0], "result");
  assert.equal(canceled[1].attemptId, "att_3");
  assert.equal(canceled[1].canceled, true);
});

test("a duplicate assignment is acknowledged again and not run twice; a Resume for an unknown attempt is reported lost", { timeout: 10_000 }, async () => {
  const seen = [];
  let finish;
  const finished = new Promise((resolve) => {
    finish = resolve;
  });
  const { server, url } = await scheduler(async function* (_session, next) {
    await next(); // register
    yield message("registered", { executorId: "exec_2", sessionToken: "token", heartbeatIntervalMs: 60_000, protocolVersion: 1 });
    const assignment = { run: run("run_d", "sleepy", { ms: 300 }), attemptId: "att_d", attemptNumber: 1 };
    yield message("assignment", assignment);
    for (const m of [await next(), await next()]) seen.push([m.case, m.value.attemptId]); // ack, started
    yield message("assignment", assignment);
    const again = await next();
    seen.push([again.case, again.value.attemptId]);
    yield message("resume", { attemptId: "att_nobody", results: [{ seq: 1, ok: true, output: "null" }] });
    const lost = await next();
    seen.push([lost.case, lost.value.attemptId, lost.value.lost, lost.value.outcome.case]);
    const result = await next();
    seen.push([result.case, result.value.attemptId, result.value.outcome.value]);
    // A barrier: a second run of att_d would have reported by the time this one does.
    yield message("assignment", { run: run("run_b", "sleepy", { ms: 400 }), attemptId: "att_b", attemptNumber: 1 });
    for (;;) {
      const m = await next();
      seen.push([m.case, m.value.attemptId]);
      if (m.case === "result" && m.value.attemptId === "att_b") break;
    }
    finish();
    await next(); // until the worker stops
  });
  const worker = startWorker({ tasks: [sleepy], apiUrl: url, workerKey: "rp_worker_test", executorId: "exec_2", log: () => {} });
  after(async () => {
    await worker.stop();
    server.close();
  });
  await worker.ready;
  await finished;

  assert.deepEqual(seen, [
    ["ack", "att_d"],
    ["started", "att_d"],
    ["ack", "att_d"],
    ["result", "att_nobody", true, undefined],
    ["result", "att_d", '"slept"'],
    ["ack", "att_b"],
    ["started", "att_b"],
    ["result", "att_b"],
  ]);
});
