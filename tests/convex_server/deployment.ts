// A convex-test deployment of convex/convex/ (with its components), and calls
// into it by path, as the real backend's HTTP and sync APIs make them.
import { AsyncLocalStorage } from "node:async_hooks";
import { readdirSync } from "node:fs";
import { join, relative, sep } from "node:path";
import { pathToFileURL } from "node:url";
import {
  ConvexError,
  PROJECT_DIR,
  convexTest,
  makeFunctionReference,
  packageDir,
  type Value,
} from "../../convex/tests/server-deps";
import { type Attempt, type ConvexGlobal, Ledger, OccConflict, runAs } from "./occ";

export type Kind = "query" | "mutation" | "action";

type ModuleMap = Record<string, () => Promise<unknown>>;
type Loaded = { map: ModuleMap; modules: Map<string, Record<string, unknown>> };

export const FUNCTIONS_DIR = join(PROJECT_DIR, "convex");

function listFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...listFiles(path));
    else if (entry.isFile()) out.push(path);
  }
  return out.sort();
}

/**
 * Import every module of a functions folder up front (convex-test forbids the timers a lazy
 * import may start during a call). Keys are absolute paths: convex-test finds the root from
 * the `_generated` entries.
 */
async function preload(dir: string, keep: (rel: string) => boolean): Promise<Loaded> {
  const map: ModuleMap = {};
  const modules = new Map<string, Record<string, unknown>>();
  for (const path of listFiles(dir)) {
    const rel = relative(dir, path).split(sep).join("/");
    if (!keep(rel)) continue;
    const mod = (await import(pathToFileURL(path).href)) as Record<string, unknown>;
    map[path] = () => Promise.resolve(mod);
    modules.set(rel.replace(/\.[^./]+$/, ""), mod);
  }
  return { map, modules };
}

const isAppModule = (rel: string) =>
  rel.startsWith("_generated/")
    ? /\.js$/.test(rel)
    : /\.(ts|js)$/.test(rel) &&
      !rel.endsWith(".d.ts") &&
      !/(^|\/)convex\.config\./.test(rel) &&
      !/\.test\./.test(rel);
const isComponentModule = (rel: string) =>
  rel.endsWith(".js") && !/(^|\/)convex\.config\./.test(rel);

type Component = { name: string; schema: unknown; map: ModuleMap };

async function loadComponent(name: string, dir: string): Promise<Component> {
  const loaded = await preload(join(dir, "dist", "component"), isComponentModule);
  const schema = loaded.modules.get("schema")?.default;
  return { name, schema, map: loaded.map };
}

/** Everything loaded once per process; a reset only builds a new convexTest over it. */
export type Code = {
  app: Loaded;
  schema: unknown;
  components: Component[];
};

export async function loadCode(): Promise<Code> {
  const app = await preload(FUNCTIONS_DIR, isAppModule);
  const schema = app.modules.get("schema")?.default;
  if (schema === undefined) throw new Error(`no schema.ts in ${FUNCTIONS_DIR}`);
  const rateLimiterDir = packageDir("@convex-dev/rate-limiter");
  const batchWorkerDir = packageDir("@convex-dev/batch-worker", join(rateLimiterDir, "package.json"));
  const components = [
    await loadComponent("rateLimiter", rateLimiterDir),
    // The rate limiter's own child component, as its test helper registers it.
    await loadComponent("rateLimiter/batchWorker", batchWorkerDir),
    // Where each data migration (convex/convex/migrations.ts) is: its cursor and state.
    await loadComponent("migrations", packageDir("@convex-dev/migrations")),
  ];
  return { app, schema, components };
}

type RegisteredFunction = {
  isQuery?: boolean;
  isMutation?: boolean;
  isAction?: boolean;
  isPublic?: boolean;
  isInternal?: boolean;
};

export class FunctionError extends Error {
  constructor(
    message: string,
    readonly data?: Value,
  ) {
    super(message);
  }
}

/** `guard:check`, `guard.js:check`, `ai/analytics:getBotEvents`, `module` (default export). */
export function normalizePath(path: string): { module: string; name: string; canonical: string } {
  const [rawModule, name = "default"] = path.split(":", 2) as [string, string?];
  const module = rawModule.replace(/\.(js|ts|mjs|cjs|jsx|tsx)$/, "");
  return { module, name, canonical: `${module}:${name}` };
}

/** The backend's array limit for values (crates/value/src/array.rs). */
const MAX_ARRAY_LEN = 8192;

function longestArray(value: Value): number {
  if (Array.isArray(value)) return Math.max(value.length, ...value.map(longestArray));
  if (typeof value === "object" && value !== null && !(value instanceof ArrayBuffer) && typeof value !== "bigint") {
    let longest = 0;
    for (const v of Object.values(value)) longest = Math.max(longest, longestArray(v as Value));
    return longest;
  }
  return 0;
}

const OVER_LIMIT_HELP =
  "Consider using smaller limits in your queries, paginating your queries, or using indexed " +
  "queries with a selective index range expressions.";

/** convex-test's transaction-limit messages, and what the backend says instead. */
const LIMIT_MESSAGES: [RegExp, (limit: string) => string][] = [
  [/Wrote too many documents in a single function execution \(limit: (\d+)\)/, (n) => `Too many writes in a single function execution (limit: ${n})`],
  [/Wrote too much data in a single function execution \(limit: (\d+) bytes\)/, (n) => `Too many bytes written in a single function execution (limit: ${formatBytes(Number(n))})`],
  [/Scanned too many documents in a single function execution \(limit: (\d+)\)/, (n) => `Too many documents read in a single function execution (limit: ${n}). ${OVER_LIMIT_HELP}`],
  [/Read too much data in a single function execution \(limit: (\d+) bytes\)/, (n) => `Too many bytes read in a single function execution (limit: ${n} bytes). ${OVER_LIMIT_HELP}`],
  [/Too many index ranges read in a single function execution \(limit: (\d+)\)/, (n) => `Too many reads in a single function execution (limit: ${n}). ${OVER_LIMIT_HELP}`],
  [/Scheduled too many functions in a single function execution \(limit: (\d+)\)/, (n) => `Too many functions scheduled by this mutation (limit: ${n})`],
];

/** As the backend prints a byte limit: `16 MiB`. */
function formatBytes(n: number): string {
  for (const [size, unit] of [[1 << 30, "GiB"], [1 << 20, "MiB"], [1 << 10, "KiB"]] as const) {
    if (n >= size && n % size === 0) return `${n / size} ${unit}`;
  }
  return `${n} bytes`;
}

/** The backend's function error for a transaction over one of its limits, if `message` is one. */
function limitError(message: string): string | undefined {
  for (const [pattern, backend] of LIMIT_MESSAGES) {
    const m = pattern.exec(message);
    if (m !== null) return `Uncaught Error: ${backend(m[1])}`;
  }
  return undefined;
}

/**
 * convex-test's per-deployment global is internal; it passes through an AsyncLocalStorage
 * `run` on every call, so one call made while `run` is wrapped hands it over.
 */
function captureGlobal(t: ReturnType<typeof convexTest>): ConvexGlobal {
  const proto = AsyncLocalStorage.prototype as { run: (...args: unknown[]) => unknown };
  const original = proto.run;
  let captured: ConvexGlobal | undefined;
  proto.run = function (this: unknown, store: unknown, ...rest: unknown[]) {
    if (captured === undefined && typeof store === "object" && store !== null && "transactionManager" in store) {
      captured = store as ConvexGlobal;
    }
    return original.call(this, store, ...rest);
  };
  try {
    void t.finishInProgressScheduledFunctions();
  } finally {
    proto.run = original;
  }
  if (captured === undefined) throw new Error("convex-test's global was not found (convex-test changed?)");
  return captured;
}

export class Deployment {
  private readonly t: ReturnType<typeof convexTest>;
  /** Commit history and counters of this deployment (a reset starts a new one). */
  readonly ledger = new Ledger();

  constructor(
    private readonly code: Code,
    occ = true,
  ) {
    // The options form: the backend's per-transaction limits are enforced.
    this.t = convexTest({ schema: this.code.schema as never, modules: this.code.app.map, transactionLimits: true });
    for (const c of this.code.components) this.t.registerComponent(c.name, c.schema as never, c.map);
    this.ledger.occ = occ;
    this.ledger.install(captureGlobal(this.t));
  }

  /**
   * Find the function at `path` and check it may be called as `kind` by this caller. Throws
   * FunctionError as the backend answers: a missing function and an internal one called
   * without admin auth alike are "Could not find public function".
   */
  resolve(kind: Kind, path: string, admin: boolean): { canonical: string } {
    const { module, name, canonical } = normalizePath(path);
    const mod = this.code.app.modules.get(module);
    const fn = (mod?.[name] ?? undefined) as RegisteredFunction | undefined;
    const isFunction =
      fn !== undefined && (fn.isQuery === true || fn.isMutation === true || fn.isAction === true);
    const shown = name === "default" ? module : canonical;
    if (!isFunction || module.startsWith("_generated/") || (fn.isInternal === true && !admin)) {
      throw new FunctionError(`Could not find public function for '${shown}'.`);
    }
    const actual: Kind = fn.isQuery ? "query" : fn.isMutation ? "mutation" : "action";
    if (actual !== kind) {
      const cap = (k: string) => k[0].toUpperCase() + k.slice(1);
      throw new FunctionError(
        `Trying to execute ${module}.js:${name} as ${cap(kind)}, but it is defined as ${cap(actual)}.`,
      );
    }
    return { canonical };
  }

  /** Every document of `table`, oldest first (tests read what was written, in order). */
  async dump(table: string): Promise<Value[]> {
    type Db = { db: { query: (t: string) => { collect: () => Promise<Value[]> } } };
    return await this.t.run(async (ctx) => await (ctx as unknown as Db).db.query(table).collect());
  }

  /**
   * Run a resolved function; function errors come back as FunctionError. A mutation run as
   * `attempt` throws OccConflict (its writes rolled back) when what it read went stale.
   */
  async run(kind: Kind, canonical: string, args: Record<string, Value>, attempt?: Attempt): Promise<Value> {
    type Call = (ref: unknown, args: Record<string, Value>) => Promise<unknown>;
    const longest = longestArray(args);
    if (longest > MAX_ARRAY_LEN) {
      const [module, name] = canonical.split(":", 2);
      throw new FunctionError(
        `Invalid arguments for ${module}.js:${name}: Array length is too long (${longest} > maximum length ${MAX_ARRAY_LEN})`,
      );
    }
    const ref = makeFunctionReference(canonical);
    try {
      const call = this.t[kind] as unknown as Call;
      const result = attempt === undefined ? await call(ref, args) : await runAs(attempt, () => call(ref, args));
      return (result ?? null) as Value;
    } catch (error) {
      // The function saw the conflict as an error thrown by a read (re-wrapped on its way out).
      if (attempt?.conflict !== undefined) throw attempt.conflict;
      if (error instanceof OccConflict) throw error;
      if (
        typeof error === "object" &&
        error !== null &&
        (error instanceof ConvexError || Symbol.for("ConvexError") in error)
      ) {
        const data = (error as ConvexError<Value>).data;
        const message = typeof data === "string" ? data : JSON.stringify(data);
        throw new FunctionError(`Uncaught ConvexError: ${message}`, data);
      }
      const message = error instanceof Error ? error.message : String(error);
      throw new FunctionError(limitError(message) ?? message);
    }
  }
}
