/**
 * Channels: one gRPC (HTTP/2) transport per address, with the key in `authorization: Bearer`.
 *
 * TLS as runplane.tls decides it in Python: on when `tlsCa` (RUNPLANE_TLS_CA) is set, trusting that
 * CA, or when the URL is https:// or grpcs:// (system roots); `tlsCert`/`tlsKey`
 * (RUNPLANE_TLS_CERT/KEY) are a client certificate for servers that require one. Otherwise plaintext.
 */
import fs from "node:fs";

import type { Interceptor, Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

import { ConfigurationError } from "./errors.js";

export interface TlsOptions {
  /** PEM file of the CA the servers' certificates are checked against (turns TLS on). */
  ca?: string;
  /** PEM files of a client certificate and its key (mutual TLS). */
  cert?: string;
  key?: string;
}

/** The base URL connect wants ("http://host:port" or "https://host:port") for a runplane URL. */
export function baseUrl(url: string, tls: TlsOptions): string {
  let target = url.replace(/\/+$/, "");
  let secure = Boolean(tls.ca);
  for (const [scheme, isTls] of [
    ["https://", true],
    ["grpcs://", true],
    ["http://", false],
    ["grpc://", false],
  ] as const) {
    if (target.startsWith(scheme)) {
      target = target.slice(scheme.length);
      secure = isTls;
      break;
    }
  }
  if (target === "") throw new ConfigurationError(`"${url}" is not an address (host:port)`);
  return `${secure ? "https" : "http"}://${target}`;
}

/** TLS options from RUNPLANE_TLS_* where not given. */
export function tlsFromEnv(given: TlsOptions = {}, env: NodeJS.ProcessEnv = process.env): TlsOptions {
  const tls = {
    ca: given.ca ?? env.RUNPLANE_TLS_CA ?? "",
    cert: given.cert ?? env.RUNPLANE_TLS_CERT ?? "",
    key: given.key ?? env.RUNPLANE_TLS_KEY ?? "",
  };
  if (Boolean(tls.cert) !== Boolean(tls.key)) {
    throw new ConfigurationError("RUNPLANE_TLS_CERT and RUNPLANE_TLS_KEY go together: set both or neither");
  }
  return tls;
}

/** A channel: a gRPC transport (HTTP/2, one session per address) and the way to close it. */
export interface Channel {
  transport: Transport;
  /** Close the HTTP/2 session (its calls fail); a later call opens a new one. */
  close(): void;
}

/** A gRPC channel (always HTTP/2 in connect-node 2) to `url` sending `key` as the bearer token
 * (an empty key sends none). */
export function openTransport(url: string, key: string, tls: TlsOptions): Channel {
  const base = baseUrl(url, tls);
  const auth: Interceptor = (next) => (request) => {
    if (key) request.header.set("authorization", `Bearer ${key}`);
    return next(request);
  };
  const read = (file?: string): Buffer | undefined => (file ? fs.readFileSync(file) : undefined);
  const nodeOptions = base.startsWith("https://") ? { ca: read(tls.ca), cert: read(tls.cert), key: read(tls.key) } : {};
  const sessionManager = new Http2SessionManager(base, {}, nodeOptions);
  const transport = createGrpcTransport({ baseUrl: base, interceptors: [auth], sessionManager });
  return { transport, close: () => sessionManager.abort() };
}
