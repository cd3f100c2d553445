// Trigger a run, follow it to COMPLETED with SubscribeToRun, and read its stream; exits 0 when
// everything matched. Needs RUNPLANE_API_URL, RUNPLANE_REALTIME_URL and RUNPLANE_SECRET_KEY, and
// an executor serving tests.e2e.realtime_tasks (tests/e2e/test_node_client.py sets that up).
import assert from "node:assert/strict";

import { Client } from "./runplane.mjs";

const client = new Client();
const handle = await client.trigger("stream-words", { n: 5 }, { tags: ["node"] });
assert.match(handle.id, /^run_/);

const versions = [];
let last;
for await (const run of client.subscribeToRun(handle.id)) {
  versions.push(run.version);
  last = run;
}
assert.deepEqual(
  versions,
  Array.from({ length: last.version }, (_, i) => i + 1),
  "every version, in order",
);
assert.equal(last.status, "RUN_STATUS_COMPLETED");
assert.equal(last.output, 5);

const chunks = [];
for await (const chunk of client.readStream(handle.id, "tokens")) chunks.push(chunk.data);
assert.deepEqual(chunks, ["word-0", "word-1", "word-2", "word-3", "word-4"]);

// The trigger's public access token reads this run, and only it.
const reader = new Client({ secretKey: handle.publicAccessToken });
assert.equal((await reader.retrieve(handle.id)).status, "RUN_STATUS_COMPLETED");
const other = await client.trigger("hello-world", { name: "node" });
await assert.rejects(reader.retrieve(other.id), (err) => err.code === 7); // PERMISSION_DENIED

reader.close();
client.close();
console.log(`ok: ${handle.id} versions ${versions.join(",")}, ${chunks.length} chunks`);
