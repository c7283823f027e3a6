// Convex's sync protocol (the WebSocket at `/api/<version>/sync`), enough for the official
// clients: query subscriptions (ModifyQuerySet → Transition), mutations and actions
// (MutationResponse / ActionResponse followed by a Transition that reaches their timestamp),
// Authenticate (admin key), and a Ping every few seconds.
//
// Versions: each connection's last sent endVersion {querySet, identity, ts} is the next
// Transition's startVersion, as the clients require. Timestamps are u64 nanoseconds, sent as
// base64 of their 8 little-endian bytes.
import type { WebSocket, RawData, Value } from "../../convex/tests/server-deps";
import { Deployment, FunctionError } from "./deployment";
import { decodeArgs, encodeValue, stringifyMessage } from "./encoding";
import type { MutationRunner } from "./mutations";

const PING_MS = 5_000;

type Version = { querySet: number; identity: number; ts: bigint };
type QueryState = { udfPath: string; args: Record<string, Value>; result: string };
type Modification = Record<string, unknown>;

export function encodeTs(ts: bigint): string {
  const bytes = Buffer.alloc(8);
  bytes.writeBigUInt64LE(ts);
  return bytes.toString("base64");
}

/**
 * The serial point of the whole server: every call and every push runs through here. Each
 * task starts on a fresh turn of the event loop, so requests that arrived meanwhile take
 * their arrival numbers before it runs, as they would on a backend running them at once.
 */
export class Serial {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(task: () => Promise<T>): Promise<T> {
    const start = () => new Promise<void>((resolve) => setImmediate(resolve)).then(task);
    const next = this.tail.then(start, start);
    this.tail = next.catch(() => undefined);
    return next;
  }
}

export class SyncHub {
  private readonly connections = new Set<Connection>();
  private ts = 0n;

  constructor(
    readonly deployment: () => Deployment,
    readonly adminKey: string,
    readonly serial: Serial,
    readonly mutations: MutationRunner,
  ) {}

  /** A fresh, strictly increasing timestamp (ns since the epoch). */
  nextTs(): bigint {
    const wall = BigInt(Date.now()) * 1_000_000n;
    this.ts = wall > this.ts ? wall : this.ts + 1n;
    return this.ts;
  }

  currentTs(): bigint {
    return this.ts;
  }

  attach(socket: WebSocket): void {
    const connection = new Connection(this, socket);
    this.connections.add(connection);
    socket.on("close", () => {
      connection.close();
      this.connections.delete(connection);
    });
  }

  /** After a write: re-run every subscription and push what changed. Call inside `serial`. */
  async refreshAll(): Promise<void> {
    const ts = this.nextTs();
    for (const c of this.connections) await c.refresh(ts);
  }

  closeAll(): void {
    for (const c of this.connections) c.socket.terminate();
  }
}

class Connection {
  private version: Version = { querySet: 0, identity: 0, ts: 0n };
  private querySet = 0;
  private identity = 0;
  private admin = false;
  private readonly queries = new Map<number, QueryState>();
  /** A mutation answered but not yet followed by a Transition reaching its timestamp. */
  private owesTransition = false;
  private mutationChain: Promise<unknown> = Promise.resolve();
  private readonly ping: NodeJS.Timeout;

  constructor(
    private readonly hub: SyncHub,
    readonly socket: WebSocket,
  ) {
    socket.on("message", (data: RawData) => {
      let message: Record<string, unknown>;
      try {
        message = JSON.parse(data.toString()) as Record<string, unknown>;
      } catch (error) {
        this.fatal(error instanceof Error ? error.message : String(error));
        return;
      }
      // A mutation takes its own turns on the Serial (it may be retried); one connection's
      // mutations still run in the order they were sent.
      const handled =
        message.type === "Mutation"
          ? (this.mutationChain = this.mutationChain.then(() => this.mutation(message)))
          : hub.serial.run(() => this.receive(message));
      void handled.catch((error: unknown) => {
        this.fatal(error instanceof Error ? error.message : String(error));
      });
    });
    this.ping = setInterval(() => this.send({ type: "Ping" }), PING_MS);
    this.ping.unref();
  }

  close(): void {
    clearInterval(this.ping);
  }

  private send(message: Record<string, unknown>): void {
    if (this.socket.readyState === this.socket.OPEN) this.socket.send(stringifyMessage(message));
  }

  private fatal(error: string): void {
    this.send({ type: "FatalError", error });
    this.socket.close(1011, error.slice(0, 120));
  }

  private async receive(message: Record<string, unknown>): Promise<void> {
    switch (message.type) {
      case "Connect":
      case "Event":
        return;
      case "Authenticate":
        return this.authenticate(message);
      case "ModifyQuerySet":
        return this.modifyQuerySet(message);
      case "Action":
        return this.action(message);
      default:
        throw new Error(`unknown message type ${String(message.type)}`);
    }
  }

  private async authenticate(message: Record<string, unknown>): Promise<void> {
    const baseVersion = Number(message.baseVersion);
    if (message.tokenType === "Admin") {
      if (message.value !== this.hub.adminKey) {
        this.send({
          type: "AuthError",
          error: "The provided admin key was invalid for this instance",
          baseVersion,
          authUpdateAttempted: true,
        });
        return;
      }
      this.admin = true;
    } else {
      // User tokens are not supported here: they identify no one.
      this.admin = false;
    }
    this.identity = baseVersion + 1;
    // Identity changed: every query re-runs under it.
    const modifications: Modification[] = [];
    for (const [queryId, q] of this.queries) {
      modifications.push(await this.runQuery(queryId, q.udfPath, q.args, true));
    }
    this.transition(modifications, this.hub.currentTs());
  }

  private async modifyQuerySet(message: Record<string, unknown>): Promise<void> {
    const baseVersion = Number(message.baseVersion);
    if (baseVersion !== this.querySet) {
      throw new Error(`ModifyQuerySet baseVersion ${baseVersion} != ${this.querySet}`);
    }
    const modifications: Modification[] = [];
    for (const m of message.modifications as Record<string, unknown>[]) {
      const queryId = Number(m.queryId);
      if (m.type === "Add") {
        const udfPath = String(m.udfPath);
        let args: Record<string, Value>;
        try {
          args = decodeArgs(m.args);
        } catch (error) {
          modifications.push(failed(queryId, error instanceof Error ? error.message : String(error)));
          continue;
        }
        modifications.push(await this.runQuery(queryId, udfPath, args, true));
      } else if (m.type === "Remove") {
        this.queries.delete(queryId);
        modifications.push({ type: "QueryRemoved", queryId });
      }
    }
    this.querySet = Number(message.newVersion);
    this.transition(modifications, this.hub.currentTs());
  }

  /** Run (or re-run) a subscribed query; the modification to send, or null if unchanged. */
  private async runQuery(
    queryId: number,
    udfPath: string,
    args: Record<string, Value>,
    always: true,
  ): Promise<Modification>;
  private async runQuery(
    queryId: number,
    udfPath: string,
    args: Record<string, Value>,
    always: false,
  ): Promise<Modification | null>;
  private async runQuery(
    queryId: number,
    udfPath: string,
    args: Record<string, Value>,
    always: boolean,
  ): Promise<Modification | null> {
    let modification: Modification;
    let key: string;
    try {
      const deployment = this.hub.deployment();
      const { canonical } = deployment.resolve("query", udfPath, this.admin);
      const value = encodeValue(await deployment.run("query", canonical, args));
      modification = { type: "QueryUpdated", queryId, value, logLines: [], journal: null };
      key = "ok:" + value.text;
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      const data = error instanceof FunctionError ? error.data : undefined;
      modification = failed(queryId, message, data);
      key = "err:" + stringifyMessage(modification);
    }
    const previous = this.queries.get(queryId);
    this.queries.set(queryId, { udfPath, args, result: key });
    if (!always && previous !== undefined && previous.result === key) return null;
    return modification;
  }

  async refresh(ts: bigint): Promise<void> {
    const modifications: Modification[] = [];
    for (const [queryId, q] of [...this.queries]) {
      const m = await this.runQuery(queryId, q.udfPath, q.args, false);
      if (m !== null) modifications.push(m);
    }
    if (modifications.length > 0 || this.owesTransition) this.transition(modifications, ts);
  }

  private transition(modifications: Modification[], ts: bigint): void {
    const end: Version = {
      querySet: this.querySet,
      identity: this.identity,
      ts: ts > this.version.ts ? ts : this.version.ts,
    };
    this.send({
      type: "Transition",
      startVersion: wireVersion(this.version),
      endVersion: wireVersion(end),
      modifications,
    });
    this.version = end;
    this.owesTransition = false;
  }

  /** A Mutation: run like the backend runs it; a refusal closes the socket as the backend does. */
  private async mutation(message: Record<string, unknown>): Promise<void> {
    const requestId = message.requestId;
    const failed = (error: unknown) => {
      const reply: Record<string, unknown> = {
        type: "MutationResponse",
        requestId,
        success: false,
        result: error instanceof Error ? error.message : String(error),
        logLines: [],
      };
      if (error instanceof FunctionError && error.data !== undefined) reply.errorData = encodeValue(error.data);
      this.send(reply);
    };
    let canonical: string;
    let args: Record<string, Value>;
    try {
      ({ canonical } = this.hub.deployment().resolve("mutation", String(message.udfPath), this.admin));
      args = decodeArgs(message.args);
    } catch (error) {
      failed(error);
      return;
    }
    const outcome = await this.hub.mutations.run(canonical, args, async (value) => {
      const ts = this.hub.nextTs();
      this.send({ type: "MutationResponse", requestId, success: true, result: encodeValue(value), ts: encodeTs(ts), logLines: [] });
      this.owesTransition = true;
      await this.hub.refreshAll();
    });
    if (outcome.ok) return;
    if ("error" in outcome) {
      failed(outcome.error);
      return;
    }
    // The backend sends no message for a retryable refusal: it closes with 1013 (try again
    // later) and the error's code as the reason; the client reconnects and resends.
    this.socket.close(1013, outcome.refused.code);
  }

  /** An Action: runs outside any transaction (its mutations are transactions of their own). */
  private async action(message: Record<string, unknown>): Promise<void> {
    const requestId = message.requestId;
    let value: Value;
    try {
      const deployment = this.hub.deployment();
      const { canonical } = deployment.resolve("action", String(message.udfPath), this.admin);
      value = await deployment.run("action", canonical, decodeArgs(message.args));
    } catch (error) {
      const reply: Record<string, unknown> = {
        type: "ActionResponse",
        requestId,
        success: false,
        result: error instanceof Error ? error.message : String(error),
        logLines: [],
      };
      if (error instanceof FunctionError && error.data !== undefined) {
        reply.errorData = encodeValue(error.data);
      }
      this.send(reply);
      await this.hub.refreshAll(); // an action may have written
      return;
    }
    this.send({ type: "ActionResponse", requestId, success: true, result: encodeValue(value), logLines: [] });
    await this.hub.refreshAll();
  }
}

function failed(queryId: number, errorMessage: string, data?: Value): Modification {
  const m: Modification = { type: "QueryFailed", queryId, errorMessage, logLines: [], journal: null };
  if (data !== undefined) m.errorData = encodeValue(data);
  return m;
}

function wireVersion(v: Version): Record<string, unknown> {
  return { querySet: v.querySet, identity: v.identity, ts: encodeTs(v.ts) };
}
