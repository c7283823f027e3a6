// A convex-test deployment of convex/convex/ (with the rate limiter component), and calls
// into it by path, as the real backend's HTTP and sync APIs make them.
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

export class Deployment {
  private t: ReturnType<typeof convexTest>;

  constructor(private readonly code: Code) {
    this.t = this.fresh();
  }

  private fresh() {
    const t = convexTest(this.code.schema as never, this.code.app.map);
    for (const c of this.code.components) t.registerComponent(c.name, c.schema as never, c.map);
    return t;
  }

  /** Forget every document, limit and scheduled function: a fresh deployment. */
  reset(): void {
    this.t = this.fresh();
  }

  /**
   * Find the function at `path` and check it may be called as `kind`. Throws FunctionError
   * (the backend answers those as function errors) or returns whether it is internal.
   */
  resolve(kind: Kind, path: string): { canonical: string; internal: boolean } {
    const { module, name, canonical } = normalizePath(path);
    const mod = this.code.app.modules.get(module);
    const fn = (mod?.[name] ?? undefined) as RegisteredFunction | undefined;
    const isFunction =
      fn !== undefined && (fn.isQuery === true || fn.isMutation === true || fn.isAction === true);
    if (!isFunction || module.startsWith("_generated/")) {
      throw new FunctionError(`Could not find function for '${canonical}'. Did you forget to run \`npx convex dev\`?`);
    }
    const actual: Kind = fn.isQuery ? "query" : fn.isMutation ? "mutation" : "action";
    if (actual !== kind) {
      const cap = (k: string) => k[0].toUpperCase() + k.slice(1);
      throw new FunctionError(
        `Trying to execute ${canonical} as ${cap(kind)}, but it is defined as ${cap(actual)}.`,
      );
    }
    return { canonical, internal: fn.isInternal === true };
  }

  /** Every document of `table`, oldest first (tests read what was written, in order). */
  async dump(table: string): Promise<Value[]> {
    type Db = { db: { query: (t: string) => { collect: () => Promise<Value[]> } } };
    return await this.t.run(async (ctx) => await (ctx as unknown as Db).db.query(table).collect());
  }

  /** Run a resolved function; function errors come back as FunctionError. */
  async run(kind: Kind, canonical: string, args: Record<string, Value>): Promise<Value> {
    type Call = (ref: unknown, args: Record<string, Value>) => Promise<unknown>;
    const ref = makeFunctionReference(canonical);
    try {
      const call = this.t[kind] as unknown as Call;
      const result = await call(ref, args);
      return (result ?? null) as Value;
    } catch (error) {
      if (
        typeof error === "object" &&
        error !== null &&
        (error instanceof ConvexError || Symbol.for("ConvexError") in error)
      ) {
        const data = (error as ConvexError<Value>).data;
        const message = typeof data === "string" ? data : JSON.stringify(data);
        throw new FunctionError(`Uncaught ConvexError: ${message}`, data);
      }
      throw new FunctionError(error instanceof Error ? error.message : String(error));
    }
  }
}
