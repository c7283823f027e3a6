// How the backend runs a mutation: admitted by the concurrency limiter, run, committed unless
// what it read changed since it arrived, else retried after a backoff, up to a limit. Shared by
// the HTTP API and the sync protocol.
import type { Value } from "../../convex/tests/server-deps";
import { type Deployment, FunctionError } from "./deployment";
import { Attempt, Backoff, type BackendError, OccConflict, Permits, occFailure, tooManyConcurrent } from "./occ";
import type { Serial } from "./sync";

export type MutationOptions = {
  occ: boolean;
  retries: number;
  backoffMs: [number, number];
  maxConcurrent: number;
  queueTimeoutMs: number;
};

/** The backend's defaults (crates/common/src/knobs.rs). */
export const BACKEND_DEFAULTS: MutationOptions = {
  occ: true,
  retries: 4,
  backoffMs: [100, 2000],
  maxConcurrent: 16,
  queueTimeoutMs: 5000,
};

export type Outcome =
  | { ok: true; value: Value }
  | { ok: false; error: FunctionError }
  | { ok: false; refused: BackendError };

type Run = { ok: true; value: Value } | { ok: false; error: FunctionError } | { conflict: OccConflict };

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export class MutationRunner {
  private readonly permits: Permits;

  constructor(
    readonly options: MutationOptions,
    private readonly serial: Serial,
    private readonly deployment: () => Deployment,
  ) {
    this.permits = new Permits(options.maxConcurrent);
  }

  /**
   * Run the (resolved) mutation `canonical`. `committed` runs on the Serial right after a
   * successful commit (pushes to subscribers belong there, before anything else runs).
   */
  async run(
    canonical: string,
    args: Record<string, Value>,
    committed: (value: Value) => Promise<void>,
  ): Promise<Outcome> {
    const writer = backendPath(canonical);
    const backoff = new Backoff(...this.options.backoffMs);
    this.deployment().ledger.totals.mutations += 1;
    let previousReads: Set<string> | undefined;
    for (;;) {
      const deployment = this.deployment();
      const ledger = deployment.ledger;
      // The backend begins the transaction (its snapshot) before it waits for a slot.
      const attempt = new Attempt(ledger.commitNumber, writer);
      if (!(await this.permits.acquire(this.options.queueTimeoutMs))) {
        ledger.totals.overloaded += 1;
        return { ok: false, refused: tooManyConcurrent(this.options.maxConcurrent) };
      }
      let run: Run;
      try {
        run = await this.serial.run(async (): Promise<Run> => {
          ledger.totals.attempts += 1;
          const predicted = previousReads && ledger.predictConflict(previousReads, attempt);
          if (predicted) return { conflict: predicted };
          try {
            const value = await deployment.run("mutation", canonical, args, attempt);
            await committed(value);
            return { ok: true, value };
          } catch (error) {
            if (error instanceof OccConflict) return { conflict: error };
            if (error instanceof FunctionError) return { ok: false, error };
            throw error;
          }
        });
      } finally {
        this.permits.release();
      }
      if (!("conflict" in run)) return run;
      if (attempt.reads.size > 0) previousReads = attempt.reads;
      if (backoff.failures >= this.options.retries) {
        ledger.failed(run.conflict);
        return { ok: false, refused: occFailure(run.conflict, writer) };
      }
      ledger.retried(run.conflict);
      await sleep(backoff.fail());
    }
  }
}

/** `guard:check` as the backend names the function in its messages: `guard.js:check`. */
export function backendPath(canonical: string): string {
  const [module, name] = canonical.split(":", 2) as [string, string];
  return `${module}.js:${name}`;
}
