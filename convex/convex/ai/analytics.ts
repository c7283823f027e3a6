// The seed's AI analytics: request logging, provider statistics and bot pattern detection,
// with its flaws fixed (bounded reads, no NaN on empty ranges, no racy check-then-insert).
import { v } from "convex/values";
import type { Doc } from "../_generated/dataModel";
import { internalMutation, internalQuery, type QueryCtx } from "../_generated/server";
import { recordBotEvent } from "../lib/bots";
import { HOUR, insertAIRequests, MINUTE, refusalReason, type StoredRefusals } from "../lib/logs";
import {
  vAIRequest,
  vBotAction,
  vBotEvent,
  vDetectionType,
  vMetadata,
  vProviderStats,
  type BotEvent,
  type ProviderStats,
} from "../lib/validators";

/** Raw rows read at each edge of a range (the partial minutes); rollups cover the rest. */
export const EDGE_READ_CAP = 4000;
/**
 * Rollup rows one getProviderStats reads, at most, over all writers: 30 days of hourly
 * rollups from 11 writers. With the two edges it stays under a query's 16,384 rows.
 */
export const ROLLUP_READ_CAP = 8000;
/** The most events getBotEvents returns. */
export const BOT_EVENTS_CAP = 1000;

/**
 * Log one AI request (the seed's function); `timestamp` defaults to now. `writer` as in
 * logs:writeBatch: callers that log concurrently should each pass their own.
 */
export const logAIRequest = internalMutation({
  args: {
    ...vAIRequest.fields,
    timestamp: v.optional(v.number()),
    writer: v.optional(v.string()),
  },
  returns: v.null(),
  handler: async (ctx, { writer, ...row }) => {
    await insertAIRequests(ctx, [{ ...row, timestamp: row.timestamp ?? Date.now() }], writer);
    return null;
  },
});

type Totals = {
  requests: number;
  successes: number;
  latency: number;
  tokens: number;
  cost: number;
  shadowRefusals: number;
  /** Rollup rows this query may still read. */
  rollupsLeft: number;
  /** A read stopped at its cap: the totals miss part of the range. */
  truncated: boolean;
};

type Sums = {
  requests: number;
  successes: number;
  latencySum: number;
  tokens: number;
  cost: number;
  shadowRefusals?: StoredRefusals;
};

/** The first `cap` rows, noting in `totals` when there were more. */
function capped<T>(totals: Totals, rows: T[], cap: number): T[] {
  if (rows.length <= cap) return rows;
  totals.truncated = true;
  return rows.slice(0, cap);
}

async function addRawRows(
  ctx: QueryCtx,
  totals: Totals,
  provider: string,
  from: number,
  to: number,
  toInclusive: boolean,
): Promise<void> {
  if (to < from || (to === from && !toInclusive)) return;
  const rows = await ctx.db
    .query("aiRequestLogs")
    .withIndex("by_provider", (q) => {
      const lower = q.eq("provider", provider).gte("timestamp", from);
      return toInclusive ? lower.lte("timestamp", to) : lower.lt("timestamp", to);
    })
    .take(EDGE_READ_CAP + 1);
  for (const row of capped(totals, rows, EDGE_READ_CAP)) {
    totals.requests += 1;
    totals.successes += row.success ? 1 : 0;
    totals.latency += row.latencyMs;
    totals.tokens += row.tokensUsed ?? 0;
    totals.cost += row.cost ?? 0;
    if (refusalReason(row.shadow) !== undefined) totals.shadowRefusals += 1;
  }
}

function addSums(totals: Totals, rows: Sums[]): void {
  for (const r of rows) {
    totals.requests += r.requests;
    totals.successes += r.successes;
    totals.latency += r.latencySum;
    totals.tokens += r.tokens;
    totals.cost += r.cost;
    const shadow = r.shadowRefusals;
    if (shadow !== undefined)
      totals.shadowRefusals += shadow.limit + shadow.bot + shadow.key + shadow.budget + (shadow.body ?? 0);
  }
}

/** Rollups of the whole units in [from, to) (both multiples of the unit), of every writer. */
async function addRollups(
  ctx: QueryCtx,
  totals: Totals,
  provider: string,
  unit: number,
  from: number,
  to: number,
): Promise<void> {
  const cap = totals.rollupsLeft;
  const rows: Sums[] =
    unit === HOUR
      ? await ctx.db
          .query("providerHourlyRollups")
          .withIndex("by_provider_hour", (q) =>
            q.eq("provider", provider).gte("hour", from).lt("hour", to),
          )
          .take(cap + 1)
      : await ctx.db
          .query("providerRollups")
          .withIndex("by_provider_minute", (q) =>
            q.eq("provider", provider).gte("minute", from).lt("minute", to),
          )
          .take(cap + 1);
  const used = capped(totals, rows, cap);
  totals.rollupsLeft -= used.length;
  addSums(totals, used);
}

/**
 * Add [from, to] (or [from, to) when !toInclusive): the whole units inside it from the
 * rollups of that unit, the partial units at its edges one level finer (hours, then
 * minutes, then raw rows).
 */
async function addRange(
  ctx: QueryCtx,
  totals: Totals,
  provider: string,
  units: number[],
  from: number,
  to: number,
  toInclusive: boolean,
): Promise<void> {
  if (to < from || (to === from && !toInclusive)) return;
  const [unit, ...finer] = units;
  if (unit === undefined) return addRawRows(ctx, totals, provider, from, to, toInclusive);
  // Unit u covers [u, u + unit); it is whole inside the range when from <= u and u + unit <= to.
  const firstWhole = Math.ceil(from / unit) * unit;
  const endWhole = Math.floor(to / unit) * unit;
  if (firstWhole >= endWhole) return addRange(ctx, totals, provider, finer, from, to, toInclusive);
  await addRange(ctx, totals, provider, finer, from, firstWhole, false);
  await addRollups(ctx, totals, provider, unit, firstWhole, endWhole);
  await addRange(ctx, totals, provider, finer, endWhole, to, toInclusive);
}

/**
 * Statistics of one provider over `[start, end]` (epoch ms, both inclusive). Whole hours come
 * from the hourly rollups, whole minutes of the partial hours from the minute rollups, and
 * only the partial minutes at the two edges from raw rows: a 30-day range reads ~720 + 2×59
 * rollups per writer and two minutes of rows. No requests: all zeros (the seed divided by
 * zero). Reads are capped (EDGE_READ_CAP raw rows per edge, ROLLUP_READ_CAP rollups); a
 * capped answer says `truncated: true`.
 */
export const getProviderStats = internalQuery({
  args: {
    provider: v.string(),
    timeRange: v.object({ start: v.number(), end: v.number() }),
  },
  returns: vProviderStats,
  handler: async (ctx, { provider, timeRange: { start, end } }): Promise<ProviderStats> => {
    const totals: Totals = {
      requests: 0,
      successes: 0,
      latency: 0,
      tokens: 0,
      cost: 0,
      shadowRefusals: 0,
      rollupsLeft: ROLLUP_READ_CAP,
      truncated: false,
    };
    await addRange(ctx, totals, provider, [HOUR, MINUTE], start, end, true);
    const { truncated, shadowRefusals } = totals;
    if (totals.requests === 0) {
      return {
        totalRequests: 0,
        successRate: 0,
        averageLatency: 0,
        totalTokens: 0,
        totalCost: 0,
        truncated,
        shadowRefusals,
      };
    }
    return {
      totalRequests: totals.requests,
      successRate: totals.successes / totals.requests,
      averageLatency: totals.latency / totals.requests,
      totalTokens: totals.tokens,
      totalCost: totals.cost,
      truncated,
      shadowRefusals,
    };
  },
});

/**
 * The seed's bot pattern detection: escalate on the fingerprint's last hour of events and
 * record the decision. `action` is the policy's own action (default "allowed"); the result is
 * never milder than it.
 */
export const detectBotPatterns = internalMutation({
  args: {
    fingerprint: v.string(),
    ip: v.string(),
    userAgent: v.string(),
    detectionType: vDetectionType,
    action: v.optional(vBotAction),
    metadata: v.optional(vMetadata),
  },
  returns: v.object({ action: vBotAction, previousAttempts: v.number() }),
  handler: async (ctx, args) => {
    const { action, previousEvents } = await recordBotEvent(
      ctx,
      { ...args, action: args.action ?? "allowed" },
      Date.now(),
    );
    return { action, previousAttempts: previousEvents };
  },
});

function toBotEvent(row: Doc<"botDetectionEvents">): BotEvent {
  const event: BotEvent = {
    timestamp: row.timestamp,
    fingerprint: row.fingerprint,
    ip: row.ip,
    userAgent: row.userAgent,
    detectionType: row.detectionType,
    action: row.action,
  };
  if (row.metadata !== undefined) event.metadata = row.metadata;
  if (row.clientKey !== undefined) event.clientKey = row.clientKey;
  return event;
}

/**
 * Bot events since `since` (inclusive), newest first, at most `limit`. A `limit` above
 * BOT_EVENTS_CAP is refused rather than quietly cut short: page with pageBotEvents instead.
 */
export const getBotEvents = internalQuery({
  args: { limit: v.number(), since: v.number() },
  returns: v.array(vBotEvent),
  handler: async (ctx, { limit, since }): Promise<BotEvent[]> => {
    if (limit > BOT_EVENTS_CAP) {
      throw new Error(
        `getBotEvents returns at most ${BOT_EVENTS_CAP} events (asked for ${limit}): ` +
          "page with pageBotEvents",
      );
    }
    const n = Math.max(0, Math.floor(limit));
    if (n === 0) return [];
    const rows = await ctx.db
      .query("botDetectionEvents")
      .withIndex("by_timestamp", (q) => q.gte("timestamp", since))
      .order("desc")
      .take(n);
    return rows.map(toBotEvent);
  },
});

/**
 * One page of the bot events since `since` (inclusive), newest first: up to `numItems`
 * (at most BOT_EVENTS_CAP) from `cursor` (null for the first page). For answers longer than
 * one query may read.
 */
export const pageBotEvents = internalQuery({
  args: { since: v.number(), numItems: v.number(), cursor: v.union(v.string(), v.null()) },
  returns: v.object({
    page: v.array(vBotEvent),
    isDone: v.boolean(),
    continueCursor: v.string(),
  }),
  handler: async (ctx, { since, numItems, cursor }) => {
    const n = Math.max(1, Math.min(Math.floor(numItems), BOT_EVENTS_CAP));
    const result = await ctx.db
      .query("botDetectionEvents")
      .withIndex("by_timestamp", (q) => q.gte("timestamp", since))
      .order("desc")
      .paginate({ numItems: n, cursor });
    return {
      page: result.page.map(toBotEvent),
      isDone: result.isDone,
      continueCursor: result.continueCursor,
    };
  },
});
