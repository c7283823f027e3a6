// A loopback Convex backend for tests: convex/convex/ run by convex-test behind Convex's HTTP
// API (POST /api/query|mutation|action) and sync protocol (WebSocket …/sync).
// FOR TESTS ONLY — see README.md. Usage:
//   tsx tests/convex_server/server.ts --port 0 [--admin-key KEY] [--occ on|off]
//     [--occ-retries N] [--occ-backoff-ms MIN,MAX] [--max-concurrent-mutations N]
//     [--queue-timeout-ms N]
// (or CONVEX_SELF_HOSTED_ADMIN_KEY in the environment); prints `listening on <port>`.
import { createHash, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { parseArgs } from "node:util";
import { WebSocketServer, type Value } from "../../convex/tests/server-deps";
import { Deployment, FunctionError, loadCode, type Kind } from "./deployment";
import { decodeArgs, encodeValue, stringifyMessage } from "./encoding";
import { BACKEND_DEFAULTS, MutationRunner, type MutationOptions } from "./mutations";
import { BackendError } from "./occ";
import { Serial, SyncHub } from "./sync";

const VERSION = "convex-guard-test-server 1";
const MAX_BODY = 16 * 1024 * 1024;

// ---- a controllable clock: Date.now() = wall clock + offset ----------------------------------
const RealDate = Date;
let clockOffset = 0;
class TestDate extends RealDate {
  constructor(...args: unknown[]) {
    if (args.length === 0) super(RealDate.now() + clockOffset);
    else super(...(args as [string | number | Date]));
  }
  static now(): number {
    return RealDate.now() + clockOffset;
  }
}

function digest(s: string): Buffer {
  return createHash("sha256").update(s).digest();
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req) {
    size += (chunk as Buffer).length;
    if (size > MAX_BODY) throw new HttpError(413, "PayloadTooLarge", "request body too large");
    chunks.push(chunk as Buffer);
  }
  const text = Buffer.concat(chunks).toString("utf8");
  if (text.trim() === "") return {};
  try {
    const body = JSON.parse(text) as unknown;
    if (typeof body !== "object" || body === null || Array.isArray(body)) throw new Error("not an object");
    return body as Record<string, unknown>;
  } catch (error) {
    throw new HttpError(400, "BadJsonBody", `invalid JSON body: ${(error as Error).message}`);
  }
}

/** A function's value, as the backend answers it (no `logLines` when there are none). */
function sendValue(res: ServerResponse, value: Value): void {
  send(res, 200, { status: "success", value: encodeValue(value) });
}

/** A function error: HTTP 200 with `status: "error"` (and the ConvexError's data). */
function sendFunctionError(res: ServerResponse, error: FunctionError): void {
  const reply: Record<string, unknown> = { status: "error", errorMessage: error.message };
  if (error.data !== undefined) reply.errorData = encodeValue(error.data);
  send(res, 200, reply);
}

function send(res: ServerResponse, status: number, body: unknown): void {
  const text = stringifyMessage(body);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(text),
  });
  res.end(text);
}

function fail(message: string): never {
  process.stderr.write(`${message}\n`);
  process.exit(2);
}

function count(flag: string, raw: string | undefined, fallback: number, min: number): number {
  if (raw === undefined) return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) fail(`--${flag} must be an integer >= ${min}, got ${raw}`);
  return n;
}

/** The mutation options from the command line; the backend's defaults otherwise. */
function mutationOptions(values: Record<string, string | undefined>): MutationOptions {
  const occ = values.occ ?? "on";
  if (occ !== "on" && occ !== "off") fail(`--occ must be on or off, got ${occ}`);
  let backoffMs = BACKEND_DEFAULTS.backoffMs;
  if (values["occ-backoff-ms"] !== undefined) {
    const parts = values["occ-backoff-ms"].split(",").map(Number);
    if (parts.length !== 2 || !parts.every((n) => Number.isFinite(n) && n >= 0) || parts[0] > parts[1]) {
      fail(`--occ-backoff-ms must be MIN,MAX (ms, MIN <= MAX), got ${values["occ-backoff-ms"]}`);
    }
    backoffMs = [parts[0], parts[1]];
  }
  return {
    occ: occ === "on",
    retries: count("occ-retries", values["occ-retries"], BACKEND_DEFAULTS.retries, 0),
    backoffMs,
    maxConcurrent: count("max-concurrent-mutations", values["max-concurrent-mutations"], BACKEND_DEFAULTS.maxConcurrent, 1),
    queueTimeoutMs: count("queue-timeout-ms", values["queue-timeout-ms"], BACKEND_DEFAULTS.queueTimeoutMs, 0),
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      port: { type: "string", default: "0" },
      "admin-key": { type: "string" },
      occ: { type: "string" },
      "occ-retries": { type: "string" },
      "occ-backoff-ms": { type: "string" },
      "max-concurrent-mutations": { type: "string" },
      "queue-timeout-ms": { type: "string" },
    },
  });
  const options = mutationOptions(values);
  const adminKey = values["admin-key"] ?? process.env.CONVEX_SELF_HOSTED_ADMIN_KEY ?? "";
  if (adminKey === "") {
    process.stderr.write("an admin key is required: --admin-key or CONVEX_SELF_HOSTED_ADMIN_KEY\n");
    process.exit(2);
  }
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    process.stderr.write(`--port must be 0..65535, got ${values.port}\n`);
    process.exit(2);
  }
  const adminDigest = digest(adminKey);
  globalThis.Date = TestDate as DateConstructor;

  const code = await loadCode();
  let deployment = new Deployment(code, options.occ);
  const serial = new Serial();
  const mutations = new MutationRunner(options, serial, () => deployment);
  const hub = new SyncHub(() => deployment, adminKey, serial, mutations);

  /** true: a correct admin key; false: no admin header; throws on a wrong key. */
  function isAdmin(req: IncomingMessage): boolean {
    const header = req.headers.authorization;
    if (header === undefined || !header.startsWith("Convex ")) return false;
    if (!timingSafeEqual(digest(header.slice("Convex ".length).trim()), adminDigest)) {
      throw new HttpError(401, "BadAdminKey", "The provided admin key was invalid for this instance");
    }
    return true;
  }

  function requireAdmin(req: IncomingMessage): void {
    if (!isAdmin(req)) {
      throw new HttpError(401, "Unauthorized", "This endpoint requires admin auth: Authorization: Convex <admin key>");
    }
  }

  async function callFunction(kind: Kind, req: IncomingMessage, res: ServerResponse): Promise<void> {
    const admin = isAdmin(req);
    const body = await readJson(req);
    if (typeof body.path !== "string") throw new HttpError(400, "BadRequest", "missing `path`");
    const format = body.format ?? "convex_encoded_json";
    if (format !== "json" && format !== "convex_encoded_json") {
      throw new HttpError(400, "BadRequest", `unsupported format ${JSON.stringify(format)}`);
    }
    const path = body.path;
    let canonical: string;
    let args: Record<string, Value>;
    try {
      ({ canonical } = deployment.resolve(kind, path, admin));
      try {
        args = decodeArgs(body.args);
      } catch (error) {
        throw new HttpError(400, "BadRequest", (error as Error).message);
      }
    } catch (error) {
      if (error instanceof FunctionError) return sendFunctionError(res, error);
      throw error;
    }
    if (kind === "mutation") {
      const outcome = await mutations.run(canonical, args, () => hub.refreshAll());
      if (outcome.ok) return sendValue(res, outcome.value);
      if ("error" in outcome) return sendFunctionError(res, outcome.error);
      throw outcome.refused;
    }
    deployment.ledger.totals.queries += 1;
    await serial.run(async () => {
      let value;
      try {
        value = await deployment.run(kind, canonical, args);
      } catch (error) {
        if (error instanceof FunctionError) {
          sendFunctionError(res, error);
          if (kind === "action") await hub.refreshAll(); // an action may have written
          return;
        }
        throw error;
      }
      sendValue(res, value);
      if (kind === "action") await hub.refreshAll();
    });
  }

  const server = createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? "/", "http://127.0.0.1");
      const path = url.pathname.replace(/\/+$/, "");
      if (req.method === "GET" && path === "/version") {
        res.writeHead(200, { "content-type": "text/plain" });
        res.end(VERSION);
        return;
      }
      if (req.method !== "POST") throw new HttpError(404, "NotFound", `no route ${req.method} ${path}`);
      const kind = /^\/api(?:\/[^/]+)?\/(query|mutation|action)$/.exec(path)?.[1] as Kind | undefined;
      if (kind !== undefined) return callFunction(kind, req, res);
      if (path === "/_test/reset") {
        requireAdmin(req);
        await serial.run(async () => {
          deployment = new Deployment(code, options.occ);
          await hub.refreshAll();
        });
        send(res, 200, { ok: true });
        return;
      }
      if (path === "/_test/dump") {
        requireAdmin(req);
        const body = await readJson(req);
        if (typeof body.table !== "string") throw new HttpError(400, "BadRequest", "send {table}");
        const table = body.table;
        let rows: Awaited<ReturnType<Deployment["dump"]>> = [];
        await serial.run(async () => {
          rows = await deployment.dump(table);
        });
        send(res, 200, { rows: rows.map((row) => encodeValue(row)) });
        return;
      }
      if (path === "/_test/counters") {
        requireAdmin(req);
        const body = await readJson(req);
        const snapshot = deployment.ledger.snapshot();
        if (body.reset === true) deployment.ledger.resetCounters();
        send(res, 200, snapshot);
        return;
      }
      if (path === "/_test/hold") {
        requireAdmin(req);
        const body = await readJson(req);
        const ms = body.ms;
        if (typeof ms !== "number" || !(ms >= 0 && ms <= 60_000)) {
          throw new HttpError(400, "BadRequest", "send {ms} (0..60000)");
        }
        // Mutations arriving meanwhile take their arrival numbers and queue, as requests
        // arriving together do on the backend: tests make them overlap on purpose.
        void serial.run(() => new Promise<void>((resolve) => setTimeout(resolve, ms)));
        send(res, 200, { ok: true });
        return;
      }
      if (path === "/_test/time") {
        requireAdmin(req);
        const body = await readJson(req);
        if (typeof body.offsetMs === "number") clockOffset = body.offsetMs;
        else if (typeof body.now === "number") clockOffset = body.now - RealDate.now();
        else throw new HttpError(400, "BadRequest", "send {offsetMs} or {now} (epoch ms)");
        send(res, 200, { now: Date.now(), offsetMs: clockOffset });
        return;
      }
      throw new HttpError(404, "NotFound", `no route POST ${path}`);
    })().catch((error: unknown) => {
      if (res.headersSent) return;
      if (error instanceof HttpError || error instanceof BackendError) {
        send(res, error.status, { code: error.code, message: error.message });
      } else {
        process.stderr.write(`internal error: ${error instanceof Error ? error.stack : String(error)}\n`);
        send(res, 500, { code: "InternalServerError", message: "internal error in the test server" });
      }
    });
  });

  const wss = new WebSocketServer({ noServer: true });
  server.on("upgrade", (req, socket, head) => {
    const path = new URL(req.url ?? "/", "http://127.0.0.1").pathname;
    if (!path.endsWith("/sync")) {
      socket.destroy();
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => hub.attach(ws));
  });

  const stop = () => {
    hub.closeAll();
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 1000).unref();
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);

  server.listen(port, "127.0.0.1", () => {
    const address = server.address();
    const bound = typeof address === "object" && address !== null ? address.port : port;
    process.stdout.write(`listening on ${bound}\n`);
  });
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? error.stack : String(error)}\n`);
  process.exit(1);
});
