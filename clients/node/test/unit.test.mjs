// Unit tests of the pure parts: durations, addresses and TLS, conversions, the wait journal,
// the metadata buffer, the manifest, the outgoing queue. No server needed.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { durationMs, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";

import { RunSchema, RunStatus } from "../dist/gen/runplane/v1/run_pb.js";
import { DebounceMode } from "../dist/gen/runplane/v1/run_service_pb.js";
import {
  ApiError,
  ConfigurationError,
  NotFoundError,
  Result,
  RunplaneError,
  WaitpointTimeoutError,
  task,
  toMs,
} from "../dist/index.js";
import { fromCallError } from "../dist/errors.js";
import { runFromPb, triggerOptionsToPb } from "../dist/models.js";
import { baseUrl, tlsFromEnv } from "../dist/transport.js";
import { Journal } from "../dist/worker/journal.js";
import { buildManifest } from "../dist/worker/manifest.js";
import { MetadataBuffer } from "../dist/worker/metadata.js";
import { AsyncQueue } from "../dist/worker/queue.js";
import { traceIds } from "../dist/worker/worker.js";

test("the public names are frozen: a change here is an API change", async () => {
  const names = Object.keys(await import("../dist/index.js")).sort();
  assert.deepEqual(names, [
    "AbortTaskRunError",
    "AlreadyExistsError",
    "ApiError",
    "Client",
    "ConfigurationError",
    "FINAL_STATUSES",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PROTOCOL_VERSION",
    "PermissionDeniedError",
    "Result",
    "RunplaneError",
    "TaskRunError",
    "UnauthenticatedError",
    "UnavailableError",
    "WaitpointTimeoutError",
    "Worker",
    "batchTriggerAndWait",
    "closeClient",
    "configure",
    "logger",
    "metadata",
    "startWorker",
    "task",
    "toMs",
    "trigger",
    "triggerAndWait",
    "wait",
  ]);
});

describe("durations", () => {
  test("numbers are seconds; text has units", () => {
    assert.equal(toMs(1.5), 1500);
    assert.equal(toMs("90s"), 90_000);
    assert.equal(toMs("1h30m"), 5_400_000);
    assert.equal(toMs("1d"), 86_400_000);
    assert.equal(toMs("250ms"), 250);
    assert.equal(toMs("12"), 12_000);
  });

  test("anything else names the field", () => {
    for (const bad of ["", "soon", "10 minutes", "5x", -1, Number.NaN]) {
      assert.throws(() => toMs(bad, "ttl"), (e) => e instanceof ConfigurationError && e.message.startsWith("ttl:"));
    }
  });
});

describe("addresses and TLS", () => {
  test("plaintext unless a CA or a TLS scheme says otherwise", () => {
    assert.equal(baseUrl("127.0.0.1:7070", {}), "http://127.0.0.1:7070");
    assert.equal(baseUrl("127.0.0.1:7070", { ca: "/ca.pem" }), "https://127.0.0.1:7070");
    assert.equal(baseUrl("grpcs://api.example.com:443/", {}), "https://api.example.com:443");
    assert.equal(baseUrl("https://api.example.com", {}), "https://api.example.com");
    assert.equal(baseUrl("grpc://localhost:7070", { ca: "/ca.pem" }), "http://localhost:7070");
  });

  test("RUNPLANE_TLS_* fill what is not given; a certificate needs its key", () => {
    const env = { RUNPLANE_TLS_CA: "/ca.pem", RUNPLANE_TLS_CERT: "/c.pem", RUNPLANE_TLS_KEY: "/k.pem" };
    assert.deepEqual(tlsFromEnv({}, env), { ca: "/ca.pem", cert: "/c.pem", key: "/k.pem" });
    assert.deepEqual(tlsFromEnv({ ca: "/mine.pem" }, env).ca, "/mine.pem");
    assert.throws(() => tlsFromEnv({}, { RUNPLANE_TLS_CERT: "/c.pem" }), ConfigurationError);
  });
});

describe("errors", () => {
  test("a failed call becomes a typed ApiError under RunplaneError", () => {
    const error = fromCallError(new ConnectError("run run_1 not found", Code.NotFound));
    assert.ok(error instanceof NotFoundError && error instanceof ApiError && error instanceof RunplaneError);
    assert.equal(error.code, "NOT_FOUND");
    assert.equal(error.message, "NOT_FOUND: run run_1 not found");
    const other = fromCallError(new ConnectError("slow", Code.DeadlineExceeded));
    assert.equal(other.constructor, ApiError);
    assert.equal(other.code, "DEADLINE_EXCEEDED");
    const plain = new Error("not a call");
    assert.equal(fromCallError(plain), plain);
  });
});

describe("conversions", () => {
  test("a run's JSON text, enums, int64 and timestamps become values", () => {
    const pb = create(RunSchema, {
      id: "run_1",
      taskId: "t",
      status: RunStatus.COMPLETED,
      payload: '{"a":1}',
      output: "[1,2]",
      metadata: "",
      version: 7n,
      createdAt: timestampFromMs(1_700_000_000_000),
      error: { type: "ValueError", message: "m", stackTrace: "s" },
    });
    const run = runFromPb(pb);
    assert.equal(run.status, "COMPLETED");
    assert.equal(run.isFinal, true);
    assert.deepEqual(run.payload, { a: 1 });
    assert.deepEqual(run.output, [1, 2]);
    assert.deepEqual(run.metadata, {});
    assert.equal(run.version, 7);
    assert.equal(run.createdAt.getTime(), 1_700_000_000_000);
    assert.equal(run.startedAt, null);
    assert.deepEqual(run.error, { type: "ValueError", message: "m", stackTrace: "s" });
    assert.equal(runFromPb(create(RunSchema, { status: RunStatus.WAITING })).isFinal, false);
  });

  test("trigger options: durations, a date delay, tags, metadata, debounce", () => {
    const delayed = triggerOptionsToPb({
      delay: "1h",
      ttl: 600,
      tags: "user:42",
      metadata: { step: 0 },
      debounce: { key: "k", delay: "5s", mode: "trailing" },
    });
    assert.equal(durationMs(delayed.delay), 3_600_000);
    assert.equal(durationMs(delayed.ttl), 600_000);
    assert.deepEqual(delayed.tags, ["user:42"]);
    assert.equal(delayed.metadata, '{"step":0}');
    assert.equal(delayed.debounce.mode, DebounceMode.TRAILING);
    assert.equal(delayed.maxDuration, undefined);
    const at = triggerOptionsToPb({ delay: new Date(1_800_000_000_000) });
    assert.equal(at.delay, undefined);
    assert.equal(Number(at.delayUntil.seconds), 1_800_000_000);
  });
});

describe("the wait journal", () => {
  test("waits are numbered from 1 in call order and resolved by their seq", async () => {
    const journal = new Journal();
    const first = journal.next();
    const second = journal.next();
    assert.deepEqual([first.seq, second.seq], [1, 2]);
    assert.equal(journal.waiting, 2);
    journal.resume([{ seq: 2, ok: true, output: '"b"', error: null }]);
    journal.resume([{ seq: 1, ok: false, output: "", error: { type: "T", message: "m", stackTrace: "" } }]);
    assert.deepEqual(await second.outcome, { ok: true, output: '"b"', error: null });
    assert.equal((await first.outcome).ok, false);
    assert.equal(journal.waiting, 0);
  });

  test("on replay, a result that came before its wait is returned at once", () => {
    const journal = new Journal();
    const first = journal.next();
    // A Resume answering seq 1 and, ahead of time, seq 2 (journaled before the replay).
    journal.resume([
      { seq: 1, ok: true, output: "null", error: null },
      { seq: 2, ok: true, output: '{"x":1}', error: null },
    ]);
    const second = journal.next();
    assert.equal(first.known, undefined);
    assert.deepEqual(second.known, { ok: true, output: '{"x":1}', error: null });
    assert.equal(journal.next().known, undefined); // seq 3: not journaled
  });

  test("results for seqs already answered are ignored", async () => {
    const journal = new Journal();
    const wait = journal.next();
    journal.resume([{ seq: 1, ok: true, output: "1", error: null }]);
    journal.resume([{ seq: 1, ok: true, output: "2", error: null }]);
    assert.equal((await wait.outcome).output, "1");
    assert.equal(journal.next().known, undefined);
  });

  test("closing fails pending and later waits", async () => {
    const journal = new Journal();
    const wait = journal.next();
    const stop = new Error("cancelled");
    journal.close(stop);
    await assert.rejects(wait.outcome, stop);
    assert.throws(() => journal.next(), stop);
  });
});

describe("the metadata buffer", () => {
  test("keeps the object current and the operations in order", () => {
    const m = new MetadataBuffer({ keep: true, list: [1, 2, 1] });
    m.set("step", 1);
    m.increment("rows", 5);
    m.decrement("rows");
    m.append("list", 3);
    m.remove("list", 1);
    m.delete("keep");
    assert.deepEqual(m.snapshot(), { step: 1, rows: 4, list: [2, 3] });
    assert.deepEqual(m.take(), [
      ["set", "step", "1"],
      ["increment", "rows", "5"],
      ["increment", "rows", "-1"],
      ["append", "list", "3"],
      ["remove", "list", "1"],
      ["delete", "keep", ""],
    ]);
    assert.deepEqual(m.take(), []);
    m.replace({ a: 1 });
    assert.deepEqual(m.take(), [["replace", "", '{"a":1}']]);
    assert.equal(m.get("a"), 1);
  });
});

describe("the manifest", () => {
  const a = task({ id: "a", run: () => 1, queue: { name: "q", concurrencyLimit: 2 }, retry: { maxAttempts: 5 } });
  const b = task({ id: "b", run: () => 2, maxDuration: "1m", schedule: { cron: "0 * * * *" } });

  test("definitions sorted by id, with the Python SDK's defaults", () => {
    const manifest = buildManifest([b, a]);
    assert.deepEqual(
      manifest.tasks.map((t) => t.id),
      ["a", "b"],
    );
    const [ta, tb] = manifest.tasks;
    assert.equal(ta.queue, "q");
    assert.equal(ta.queueConcurrencyLimit, 2);
    assert.equal(ta.retry.maxAttempts, 5);
    assert.equal(ta.retry.factor, 2);
    assert.equal(tb.queue, "task/b");
    assert.equal(tb.machine, "small-1x");
    assert.equal(tb.maxDurationSeconds, 60);
    assert.equal(tb.schedule.cron, "0 * * * *");
  });

  test("the version: given, else a hash that changes with the code", () => {
    assert.equal(buildManifest([a], "v1").version, "v1");
    const hashed = buildManifest([a, b]).version;
    assert.match(hashed, /^h-[0-9a-f]{16}$/);
    assert.equal(buildManifest([b, a]).version, hashed);
    const changed = task({ id: "a", run: () => 3, queue: { name: "q", concurrencyLimit: 2 }, retry: { maxAttempts: 5 } });
    assert.notEqual(buildManifest([changed, b]).version, hashed);
  });

  test("bad definitions are refused", () => {
    assert.throws(() => task({ id: "has space", run: () => 1 }), ConfigurationError);
    assert.throws(() => task({ id: "x", run: () => 1, maxDuration: "forever" }), ConfigurationError);
    assert.throws(() => buildManifest([a, a]), /two tasks have the id a/);
  });
});

describe("the rest", () => {
  test("trace ids of a traceparent", () => {
    assert.deepEqual(traceIds("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), {
      traceId: "0af7651916cd43dd8448eb211c80319c",
      spanId: "b7ad6b7169203331",
    });
    assert.deepEqual(traceIds(""), { traceId: "", spanId: "" });
  });

  test("the outgoing queue yields in order and hands back what was not taken", async () => {
    const queue = new AsyncQueue();
    queue.push(1);
    queue.push(2);
    const it = queue[Symbol.asyncIterator]();
    assert.deepEqual(await it.next(), { value: 1, done: false });
    const later = it.next();
    assert.deepEqual(await later, { value: 2, done: false });
    const pending = it.next();
    queue.push(3);
    assert.deepEqual(await pending, { value: 3, done: false });
    queue.push(4);
    assert.deepEqual(queue.close(), [4]);
    assert.deepEqual(await it.next(), { value: undefined, done: true });
  });

  test("a result unwraps to its output or throws its error", () => {
    assert.deepEqual(new Result(true, { a: 1 }, undefined, "run_1").unwrap(), { a: 1 });
    const timedOut = new Result(false, undefined, new WaitpointTimeoutError());
    assert.throws(() => timedOut.unwrap(), (e) => e instanceof WaitpointTimeoutError && e.type === "WaitpointTimeoutError");
  });
});
