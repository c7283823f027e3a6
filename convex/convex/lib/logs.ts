// Row inserts shared by the single-row functions (the seed's) and the batched writer.
import type { GenericMutationCtx } from "convex/server";
import type { DataModel } from "../_generated/dataModel";
import type {
  AIRequest,
  AuthFailure,
  BotEvent,
  EmbeddingRequest,
  KeyUsage,
} from "./validators";
import { addKeyRollups, addKeyUsage, findKeyById } from "./keys";

type Ctx = Pick<GenericMutationCtx<DataModel>, "db">;

export const MINUTE = 60_000;
export const HOUR = 60 * MINUTE;

export function minuteOf(timestamp: number): number {
  return Math.floor(timestamp / MINUTE) * MINUTE;
}

export function hourOf(timestamp: number): number {
  return Math.floor(timestamp / HOUR) * HOUR;
}

/**
 * Upper bounds (ms, inclusive) of the rollups' latency buckets; one more bucket holds the
 * slower requests. The Python side's `LATENCY_BOUNDS_MS` (convex_guard.stores.base) is the
 * same: percentiles are read off these buckets, alike on every store.
 */
export const LATENCY_BOUNDS_MS = [10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000];

export type Refusals = { limit: number; bot: number; key: number; budget: number; body: number };
/** Refusals as a rollup stores them: one written before request validation has no `body`. */
export type StoredRefusals = Omit<Refusals, "body"> & { body?: number };

/** How a logged row's `error` starts when the guard refused it, by reason (the middlewares'
 * rejection reasons; the Python side's `refusal_reason` reads them alike). */
const REFUSAL_PREFIXES: [string, keyof Refusals][] = [
  ["rate_limited:", "limit"],
  ["bot_blocked", "bot"],
  ["bot_challenged", "bot"],
  ["api_key_invalid", "key"],
  ["api_key_missing", "key"],
  ["api_key_scope", "key"],
  ["budget_exceeded", "budget"],
  ["invalid_body:", "body"],
];

export function refusalReason(error: string | undefined): keyof Refusals | undefined {
  if (!error) return undefined;
  for (const [prefix, reason] of REFUSAL_PREFIXES) if (error.startsWith(prefix)) return reason;
  return undefined;
}

export function latencyBucket(latencyMs: number): number {
  const i = LATENCY_BOUNDS_MS.findIndex((bound) => latencyMs <= bound);
  return i === -1 ? LATENCY_BOUNDS_MS.length : i;
}

export const noRefusals = (): Refusals => ({ limit: 0, bot: 0, key: 0, budget: 0, body: 0 });
export const noLatencies = (): number[] => Array(LATENCY_BOUNDS_MS.length + 1).fill(0);

type Sums = { requests: number; successes: number; latencySum: number; tokens: number; cost: number };
/** What a rollup adds since the dashboard; rollups written before it lack both (and those
 * written before shadow rules lack `shadowRefusals`). */
type Histograms = { latencyBuckets: number[]; refusals: Refusals; shadowRefusals: Refusals };
type Slot = Sums & Histograms & { provider: string; start: number };

function fold(slots: Map<string, Slot>, provider: string, start: number, row: AIRequest): void {
  const id = `${start}\u0000${provider}`;
  let slot = slots.get(id);
  if (slot === undefined) {
    slot = { provider, start, requests: 0, successes: 0, latencySum: 0, tokens: 0, cost: 0,
      latencyBuckets: noLatencies(), refusals: noRefusals(), shadowRefusals: noRefusals() };
    slots.set(id, slot);
  }
  slot.requests += 1;
  slot.successes += row.success ? 1 : 0;
  slot.latencySum += row.latencyMs;
  slot.tokens += row.tokensUsed ?? 0;
  slot.cost += row.cost ?? 0;
  slot.latencyBuckets[latencyBucket(row.latencyMs)] += 1;
  const reason = refusalReason(row.error);
  if (reason !== undefined) slot.refusals[reason] += 1;
  const shadow = refusalReason(row.shadow);
  if (shadow !== undefined) slot.shadowRefusals[shadow] += 1;
}

/** Element-wise sums; a rollup written before the dashboard has no buckets (zeros). */
export function addedBuckets(existing: number[] | undefined, more: number[]): number[] {
  return more.map((n, i) => n + (existing?.[i] ?? 0));
}

export function addedRefusals(
  existing: StoredRefusals | undefined,
  more: StoredRefusals,
): Refusals {
  const base = existing ?? noRefusals();
  return {
    limit: base.limit + more.limit,
    bot: base.bot + more.bot,
    key: base.key + more.key,
    budget: base.budget + more.budget,
    body: (base.body ?? 0) + (more.body ?? 0),
  };
}

function added<
  T extends Sums & {
    latencyBuckets?: number[];
    refusals?: StoredRefusals;
    shadowRefusals?: StoredRefusals;
  },
>(
  existing: T,
  more: Sums & Histograms,
): Sums & Histograms {
  return {
    requests: existing.requests + more.requests,
    successes: existing.successes + more.successes,
    latencySum: existing.latencySum + more.latencySum,
    tokens: existing.tokens + more.tokens,
    cost: existing.cost + more.cost,
    latencyBuckets: addedBuckets(existing.latencyBuckets, more.latencyBuckets),
    refusals: addedRefusals(existing.refusals, more.refusals),
    shadowRefusals: addedRefusals(existing.shadowRefusals, more.shadowRefusals),
  };
}

/**
 * Insert AI request rows and fold them into `writer`'s per-provider rollups (per minute and
 * per hour). Rows are aggregated in memory first: one write per rollup per call. The rollups
 * read and written are `writer`'s own, so concurrent batches of other writers never touch
 * them (no write conflicts between app instances); readers sum over writers.
 */
export async function insertAIRequests(
  ctx: Ctx,
  rows: AIRequest[],
  writer: string | undefined,
): Promise<void> {
  const minutes = new Map<string, Slot>();
  const hours = new Map<string, Slot>();
  for (const row of rows) {
    await ctx.db.insert("aiRequestLogs", row);
    fold(minutes, row.provider, minuteOf(row.timestamp), row);
    fold(hours, row.provider, hourOf(row.timestamp), row);
  }
  const mine = writer === undefined ? {} : { writer };
  for (const { provider, start, ...sums } of minutes.values()) {
    const existing = await ctx.db
      .query("providerRollups")
      .withIndex("by_provider_minute", (q) =>
        q.eq("provider", provider).eq("minute", start).eq("writer", writer),
      )
      .unique();
    if (existing === null) {
      await ctx.db.insert("providerRollups", { provider, minute: start, ...mine, ...sums });
    } else {
      await ctx.db.patch(existing._id, added(existing, sums));
    }
  }
  for (const { provider, start, ...sums } of hours.values()) {
    const existing = await ctx.db
      .query("providerHourlyRollups")
      .withIndex("by_provider_hour", (q) =>
        q.eq("provider", provider).eq("hour", start).eq("writer", writer),
      )
      .unique();
    if (existing === null) {
      await ctx.db.insert("providerHourlyRollups", { provider, hour: start, ...mine, ...sums });
    } else {
      await ctx.db.patch(existing._id, added(existing, sums));
    }
  }
}

export async function insertEmbeddingRequests(
  ctx: Ctx,
  rows: EmbeddingRequest[],
): Promise<void> {
  for (const row of rows) await ctx.db.insert("embeddingRequests", row);
}

/**
 * A failure without a client key (from an instance older than keys, or the seed's
 * `logAuthFailure`) is keyed by its address: the alert per client still counts it.
 */
export async function insertAuthFailures(ctx: Ctx, rows: AuthFailure[]): Promise<void> {
  for (const row of rows) {
    const clientKey = row.clientKey || row.ip || undefined;
    await ctx.db.insert("embeddingAuthFailures", clientKey === undefined ? row : { ...row, clientKey });
  }
}

export async function insertBotEvents(ctx: Ctx, rows: BotEvent[]): Promise<void> {
  for (const row of rows) await ctx.db.insert("botDetectionEvents", row);
}

/**
 * Add usage to keys (unknown or malformed ids are skipped); returns how many were updated.
 * The usage goes to `writer`'s own usage row of each key, never to the key document, and to
 * `writer`'s per-minute and per-hour rollups of the key (the dashboard's top keys).
 */
export async function applyKeyUsage(
  ctx: Ctx,
  usage: KeyUsage[],
  writer: string | undefined,
): Promise<number> {
  let updated = 0;
  const now = Date.now();
  for (const u of usage) {
    const found = await findKeyById(ctx, u.keyId);
    if (found === null) continue;
    await addKeyUsage(ctx, found.doc._id, writer, u.requests, u.lastUsed, now);
    await addKeyRollups(ctx, found.doc._id, writer, u.requests, u.lastUsed);
    updated += 1;
  }
  return updated;
}
