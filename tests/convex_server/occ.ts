// The real backend's optimistic concurrency, emulated over convex-test's serial execution.
//
// Every mutation attempt takes an arrival number (the commit counter when it arrived). It runs
// one at a time (the Serial) against the latest state; when it commits, a document it read
// that a transaction committed after its arrival wrote is a conflict: its writes are rolled
// back and it is retried, as the backend retries a commit whose read set went stale. Reads
// are tracked per document (the backend also tracks index ranges, so its conflicts are a
// superset of these). Writes are counted per document, component tables included.
import { AsyncLocalStorage } from "node:async_hooks";

/** One mutation attempt: its arrival number and what it read. */
export class Attempt {
  started = false;
  readonly reads = new Set<string>();
  /** Set at the first stale read: the commit is bound to fail, so the attempt stops there. */
  conflict: OccConflict | undefined;
  constructor(
    readonly arrival: number,
    /** The backend's name for the writer, e.g. `guard.js:check`. */
    readonly writer: string,
  ) {}
}

/** A commit refused: `key` was written by a transaction committed after the arrival. */
export class OccConflict extends Error {
  constructor(
    readonly key: string,
    readonly table: string,
    readonly id: string,
    readonly lastWriter: string | undefined,
  ) {
    super(`OCC conflict on ${table} ${id}`);
  }
}

export type DocumentCounters = { writes: number; conflicts: number; retries: number; occFailures: number };
export type Totals = {
  /** Queries and actions called over HTTP (with `mutations`: the round trips clients made). */
  queries: number;
  mutations: number;
  attempts: number;
  commits: number;
  conflicts: number;
  retries: number;
  occFailures: number;
  overloaded: number;
};

type Doc = { component: string; table: string; id: string };
type Transaction = { attempt: Attempt | undefined; layers: Map<string, Doc>[] };

/** What the hooks need of convex-test's per-deployment global (not part of its API). */
export type ConvexGlobal = {
  components: Record<string, unknown>;
  transactionManager: {
    begin: (isNested: boolean, limits?: unknown) => Promise<void>;
    commit: (isNested: boolean) => unknown;
    rollback: (isNested: boolean) => void;
  };
  asyncSyscall: (op: string, args: string) => Promise<string>;
};

const attemptStorage = new AsyncLocalStorage<Attempt>();

/** Run `task` as `attempt`: its top-level transaction is the one checked for conflicts. */
export function runAs<T>(attempt: Attempt, task: () => Promise<T>): Promise<T> {
  return attemptStorage.run(attempt, task);
}

function tableOf(id: string): string {
  return id.replace(/^[0-9]+/, "");
}

/** Per-deployment commit counter, last writer per document, and the counters. */
export class Ledger {
  commitNumber = 0;
  occ = true;
  private readonly lastWrite = new Map<string, { commit: number; writer: string | undefined }>();
  private readonly docs = new Map<string, Doc & DocumentCounters>();
  totals: Totals = Ledger.zero();
  private tx: Transaction | undefined;

  private static zero(): Totals {
    return {
      queries: 0,
      mutations: 0,
      attempts: 0,
      commits: 0,
      conflicts: 0,
      retries: 0,
      occFailures: 0,
      overloaded: 0,
    };
  }

  /** Hook convex-test's transaction manager and syscalls (tests only: internals). */
  install(g: ConvexGlobal): void {
    const tm = g.transactionManager;
    const begin = tm.begin.bind(tm);
    const commit = tm.commit.bind(tm);
    const rollback = tm.rollback.bind(tm);
    tm.begin = async (isNested, limits) => {
      await begin(isNested, limits);
      if (isNested) {
        this.tx?.layers.push(new Map());
        return;
      }
      const attempt = attemptStorage.getStore();
      // A function scheduled from inside an attempt inherits its context: only the attempt's
      // own first transaction is checked.
      const own = attempt !== undefined && !attempt.started ? attempt : undefined;
      if (own !== undefined) own.started = true;
      this.tx = { attempt: own, layers: [new Map()] };
    };
    tm.commit = (isNested) => {
      const tx = this.tx;
      if (isNested) {
        const result = commit(true);
        if (tx !== undefined && tx.layers.length > 1) {
          const top = tx.layers.pop()!;
          const parent = tx.layers[tx.layers.length - 1];
          for (const [k, d] of top) parent.set(k, d);
        }
        return result;
      }
      if (tx?.attempt !== undefined && this.occ) {
        const conflict = tx.attempt.conflict ?? this.conflict(tx.attempt);
        // Thrown before committing: convex-test rolls the transaction back.
        if (conflict !== undefined) throw conflict;
      }
      const result = commit(false);
      this.tx = undefined;
      if (tx !== undefined) this.apply(tx);
      return result;
    };
    tm.rollback = (isNested) => {
      rollback(isNested);
      if (!isNested) this.tx = undefined;
      else if (this.tx !== undefined && this.tx.layers.length > 1) this.tx.layers.pop(); // reads stay
    };

    const syscall = g.asyncSyscall;
    g.asyncSyscall = async (op, jsonArgs) => {
      const result = await syscall(op, jsonArgs);
      const tx = this.tx;
      if (tx === undefined || !DOCUMENT_OPS.has(op)) return result;
      const meta = JSON.parse(await syscall("1.0/getFunctionMetadata", "{}")) as { componentPath?: string };
      const component = meta.componentPath ?? "";
      const attempt = tx.attempt;
      const reading = attempt !== undefined;
      const read = (id: unknown) => {
        if (!reading || typeof id !== "string") return;
        const key = `${component}\u0000${id}`;
        attempt.reads.add(key);
        // A stale read makes the commit fail whatever follows: stop now rather than spend the
        // serial point's time on a doomed attempt (the backend's attempts run side by side).
        if (this.occ && attempt.conflict === undefined && this.stale(key, attempt)) {
          attempt.conflict = this.conflictOn(key);
          throw attempt.conflict;
        }
      };
      const write = (id: unknown) => {
        if (typeof id !== "string") return;
        tx.layers[tx.layers.length - 1].set(`${component}\u0000${id}`, { component, table: tableOf(id), id });
      };
      switch (op) {
        case "1.0/get":
          read((JSON.parse(jsonArgs) as { id?: unknown }).id);
          break;
        case "1.0/queryStreamNext":
          if (reading) read((JSON.parse(result) as { value?: { _id?: unknown } | null }).value?._id);
          break;
        case "1.0/queryPage":
          if (reading) for (const doc of (JSON.parse(result) as { page: { _id?: unknown }[] }).page) read(doc._id);
          break;
        case "1.0/insert":
          write((JSON.parse(result) as { _id?: unknown })._id);
          break;
        default: {
          // shallowMerge, replace, remove: a read of the document, then a write.
          const id = (JSON.parse(jsonArgs) as { id?: unknown }).id;
          read(id);
          write(id);
        }
      }
      return result;
    };
  }

  private stale(key: string, attempt: Attempt): boolean {
    const last = this.lastWrite.get(key);
    return last !== undefined && last.commit > attempt.arrival;
  }

  private conflictOn(key: string): OccConflict {
    const [, id] = key.split("\u0000") as [string, string];
    this.counters(key).conflicts += 1;
    this.totals.conflicts += 1;
    return new OccConflict(key, tableOf(id), id, this.lastWrite.get(key)?.writer);
  }

  /**
   * A retry whose previous attempt read a document written since this attempt arrived: it
   * would read it again and conflict. Counted as a conflict without running it: the backend
   * runs attempts side by side, so a doomed one costs the others nothing, while here it would
   * hold the serial point.
   */
  predictConflict(previousReads: Set<string>, attempt: Attempt): OccConflict | undefined {
    if (!this.occ) return undefined;
    for (const key of previousReads) {
      if (this.stale(key, attempt)) return (attempt.conflict = this.conflictOn(key));
    }
    return undefined;
  }

  private conflict(attempt: Attempt): OccConflict | undefined {
    for (const key of attempt.reads) {
      if (this.stale(key, attempt)) return (attempt.conflict = this.conflictOn(key));
    }
    return undefined;
  }

  private apply(tx: Transaction): void {
    const writes = tx.layers[0];
    if (writes === undefined || writes.size === 0) return;
    this.commitNumber += 1;
    this.totals.commits += 1;
    const writer = tx.attempt?.writer;
    for (const [key, doc] of writes) {
      this.lastWrite.set(key, { commit: this.commitNumber, writer });
      this.counters(key, doc).writes += 1;
    }
  }

  private counters(key: string, doc?: Doc): Doc & DocumentCounters {
    let c = this.docs.get(key);
    if (c === undefined) {
      const [component, id] = key.split("\u0000") as [string, string];
      c = { ...(doc ?? { component, table: tableOf(id), id }), writes: 0, conflicts: 0, retries: 0, occFailures: 0 };
      this.docs.set(key, c);
    }
    return c;
  }

  retried(conflict: OccConflict): void {
    this.counters(conflict.key).retries += 1;
    this.totals.retries += 1;
  }

  failed(conflict: OccConflict): void {
    this.counters(conflict.key).occFailures += 1;
    this.totals.occFailures += 1;
  }

  /** Totals and every document with a count, most written first. */
  snapshot(): { totals: Totals; documents: (Doc & DocumentCounters)[] } {
    const documents = [...this.docs.values()]
      .map((d) => ({ ...d }))
      .sort((a, b) => b.writes - a.writes || b.conflicts - a.conflicts);
    return { totals: { ...this.totals }, documents };
  }

  /** Zero the counters (the commit history stays: conflicts still see it). */
  resetCounters(): void {
    this.docs.clear();
    this.totals = Ledger.zero();
  }
}

const DOCUMENT_OPS = new Set([
  "1.0/get",
  "1.0/queryStreamNext",
  "1.0/queryPage",
  "1.0/insert",
  "1.0/shallowMerge",
  "1.0/replace",
  "1.0/remove",
]);

// ---- the backend's answers -------------------------------------------------------------------

/** A request the backend refuses outside the function: HTTP status and `{code, message}`. */
export class BackendError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** The backend's final OCC answer after its retries (HTTP 503). */
export function occFailure(conflict: OccConflict, writer: string): BackendError {
  const source =
    conflict.lastWriter === undefined
      ? ""
      : `${conflict.lastWriter === writer ? "Another call to this mutation" : `A call to "${conflict.lastWriter}"`}` +
        ` changed the document with ID "${conflict.id}". `;
  return new BackendError(
    503,
    "OptimisticConcurrencyControlFailure",
    `Documents read from or written to the "${conflict.table}" table changed while this mutation ` +
      `was being run and on every subsequent retry. ${source}See https://docs.convex.dev/error#1`,
  );
}

/** The backend's answer when a mutation waited too long for a concurrency slot (HTTP 429). */
export function tooManyConcurrent(permits: number): BackendError {
  const more =
    permits > 16
      ? "If you need more resources, please contact support."
      : "To get more resources, upgrade to Convex Pro. If you are already on Convex Pro, please contact support.";
  return new BackendError(
    429,
    "TooManyConcurrentRequests",
    `Too many concurrent requests. Your backend is limited to ${permits} concurrent mutations. ${more}`,
  );
}

// ---- admission: the mutation concurrency limiter ----------------------------------------------

/** At most `size` holders; waiters are served in order and give up after their timeout. */
export class Permits {
  private used = 0;
  private readonly waiters: { grant: () => void }[] = [];

  constructor(readonly size: number) {}

  /** true once a slot is held; false if none came within `timeoutMs`. */
  acquire(timeoutMs: number): Promise<boolean> {
    if (this.used < this.size && this.waiters.length === 0) {
      this.used += 1;
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const waiter = {
        grant: () => {
          clearTimeout(timer);
          resolve(true);
        },
      };
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        resolve(false);
      }, timeoutMs);
      this.waiters.push(waiter);
    });
  }

  release(): void {
    const next = this.waiters.shift();
    if (next !== undefined) next.grant(); // the slot passes on
    else this.used -= 1;
  }
}

/** The backend's retry backoff: min(initial × 2^failures, max) × a random jitter in [0, 1). */
export class Backoff {
  failures = 0;
  constructor(
    private readonly initialMs: number,
    private readonly maxMs: number,
  ) {}

  fail(): number {
    const ms = Math.min(this.initialMs * 2 ** this.failures, this.maxMs) * Math.random();
    this.failures += 1;
    return ms;
  }
}
