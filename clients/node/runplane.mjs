// A small runplane client for Node.js: gRPC through @grpc/grpc-js, with the repository's protos
// loaded at runtime by @grpc/proto-loader (nothing generated, nothing to keep in sync).
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(here, "../../protos");

const definition = protoLoader.loadSync(
  [
    "runplane/v1/run_service.proto",
    "runplane/v1/realtime_service.proto",
    "runplane/v1/meta_service.proto",
    "runplane/v1/auth_service.proto",
  ],
  { includeDirs: [PROTOS], keepCase: true, longs: Number, enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).runplane.v1;

export const FINAL_STATUSES = new Set([
  "RUN_STATUS_COMPLETED",
  "RUN_STATUS_CANCELED",
  "RUN_STATUS_FAILED",
  "RUN_STATUS_CRASHED",
  "RUN_STATUS_SYSTEM_FAILURE",
  "RUN_STATUS_EXPIRED",
  "RUN_STATUS_TIMED_OUT",
]);

/** Parse the JSON-text fields of a Run message into values. */
function run(message) {
  const parse = (text) => (text ? JSON.parse(text) : null);
  return {
    ...message,
    payload: parse(message.payload),
    output: parse(message.output),
    metadata: parse(message.metadata) ?? {},
  };
}

/**
 * The gRPC target and credentials for a URL, as runplane.tls decides in Python: TLS when
 * `tls.ca` (RUNPLANE_TLS_CA) is set, trusting that CA, or when the URL is https:// or grpcs://
 * (system roots); `tls.cert`/`tls.key` (RUNPLANE_TLS_CERT/KEY) are presented as a client
 * certificate. Otherwise plaintext.
 */
export function channel(url, tls) {
  let target = url;
  let secure = Boolean(tls.ca);
  for (const [scheme, isTls] of [
    ["https://", true],
    ["grpcs://", true],
    ["http://", false],
    ["grpc://", false],
  ]) {
    if (url.startsWith(scheme)) {
      target = url.slice(scheme.length).replace(/\/+$/, "");
      secure = isTls;
      break;
    }
  }
  if (!secure) return { target, credentials: grpc.credentials.createInsecure() };
  const read = (file) => (file ? fs.readFileSync(file) : null);
  const credentials = grpc.credentials.createSsl(read(tls.ca), read(tls.key), read(tls.cert));
  return { target, credentials };
}

export class Client {
  /**
   * @param {{apiUrl?: string, realtimeUrl?: string, secretKey?: string, tlsCa?: string,
   *   tlsCert?: string, tlsKey?: string}} options
   * A secret key or a public access token; defaults from RUNPLANE_* like the Python SDK
   * (RUNPLANE_TLS_CA, RUNPLANE_TLS_CERT, RUNPLANE_TLS_KEY for TLS: see channel()).
   */
  constructor({ apiUrl, realtimeUrl, secretKey, tlsCa, tlsCert, tlsKey } = {}) {
    this.apiUrl = apiUrl ?? process.env.RUNPLANE_API_URL ?? "localhost:7070";
    this.realtimeUrl = realtimeUrl ?? process.env.RUNPLANE_REALTIME_URL ?? "";
    this.secretKey = secretKey ?? process.env.RUNPLANE_SECRET_KEY ?? "";
    this.tls = {
      ca: tlsCa ?? process.env.RUNPLANE_TLS_CA ?? "",
      cert: tlsCert ?? process.env.RUNPLANE_TLS_CERT ?? "",
      key: tlsKey ?? process.env.RUNPLANE_TLS_KEY ?? "",
    };
    const { target, credentials } = channel(this.apiUrl, this.tls);
    this.runs = new v1.RunService(target, credentials);
    this.meta = new v1.MetaService(target, credentials);
    this.auth = new v1.AuthService(target, credentials);
    this._realtime = null;
  }

  metadata() {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${this.secretKey}`);
    return md;
  }

  unary(stub, method, request) {
    return new Promise((resolve, reject) => {
      stub[method](request, this.metadata(), { deadline: Date.now() + 30_000 }, (err, reply) =>
        err ? reject(err) : resolve(reply),
      );
    });
  }

  /** The realtime service: RUNPLANE_REALTIME_URL, or what the scheduler announces. */
  async realtime() {
    if (!this._realtime) {
      if (!this.realtimeUrl) {
        const info = await this.unary(this.meta, "GetServerInfo", {});
        this.realtimeUrl = info.realtime_url;
      }
      const { target, credentials } = channel(this.realtimeUrl, this.tls);
      this._realtime = new v1.RealtimeService(target, credentials);
    }
    return this._realtime;
  }

  /** Trigger a task; resolves to {id, isCached, publicAccessToken, run}. */
  async trigger(taskId, payload, options = {}) {
    const reply = await this.unary(this.runs, "TriggerRun", {
      task_id: taskId,
      payload: JSON.stringify(payload ?? null),
      options,
    });
    return {
      id: reply.run.id,
      isCached: reply.is_cached,
      publicAccessToken: reply.public_access_token,
      run: run(reply.run),
    };
  }

  async retrieve(runId) {
    return run((await this.unary(this.runs, "GetRun", { run_id: runId })).run);
  }

  /** Every version of the run in order, ending after its final status. */
  async *subscribeToRun(runId, { afterVersion = 0 } = {}) {
    const stub = await this.realtime();
    const call = stub.SubscribeToRun({ run_id: runId, after_version: afterVersion }, this.metadata());
    try {
      for await (const response of call) {
        const current = run(response.run);
        yield current;
        if (FINAL_STATUSES.has(current.status)) return;
      }
    } finally {
      call.cancel();
    }
  }

  /** Every chunk of a run's stream from the first, until it closes or the run finishes. */
  async *readStream(runId, streamId, { afterIndex = 0 } = {}) {
    const stub = await this.realtime();
    const call = stub.ReadStream(
      { run_id: runId, stream_id: streamId, after_index: afterIndex },
      this.metadata(),
    );
    try {
      for await (const response of call) {
        yield { index: response.index, data: JSON.parse(response.data) };
      }
    } finally {
      call.cancel();
    }
  }

  close() {
    for (const stub of [this.runs, this.meta, this.auth, this._realtime]) stub?.close();
  }
}
