// The dashboard's one read per refresh: every figure of a window, bucketed, from the
// provider and key rollups (never raw request rows), bot events and auth failures.
import { v } from "convex/values";
import { internalQuery } from "./_generated/server";
import {
  addedBuckets,
  addedRefusals,
  HOUR,
  MINUTE,
  noLatencies,
  noRefusals,
  type Refusals,
  type StoredRefusals,
} from "./lib/logs";
import { findKeyById } from "./lib/keys";
import { vBotAction, vDetectionType, vKind } from "./lib/validators";

/** The most buckets one snapshot holds (the Python side's MAX_DASHBOARD_BUCKETS). */
export const MAX_BUCKETS = 500;
/**
 * Caps on the rows one snapshot reads, each answered with `truncated: true` when reached.
 * Together (6000 + 3000 + 3000 + 4000 key rollups + TOP_KEYS × (a key document and
 * LAST_USED_READS of its newest rollups), 16,094 with the one row past each cap) they stay
 * under a query's 16,384 documents: a day of minute rollups for four providers from one
 * writer, or 30 days of hourly ones from eight; six hours of minute rollups of eleven keys
 * used every minute by one writer, or a week of hourly ones of 23.
 */
export const ROLLUP_READ_CAP = 6000;
export const BOT_EVENT_READ_CAP = 3000;
export const AUTH_FAILURE_READ_CAP = 3000;
export const KEY_ROLLUP_READ_CAP = 4000;
export const TOP_KEYS = 10;
/** A top key's newest minute rollups read for its last use (more writers in one minute may
 * hide a later use by at most that minute). */
export const LAST_USED_READS = 8;

const vRefusals = v.object({
  limit: v.number(),
  bot: v.number(),
  key: v.number(),
  budget: v.number(),
  body: v.number(),
});

const vSnapshot = v.object({
  providers: v.array(
    v.object({
      provider: v.string(),
      requests: v.array(v.number()),
      successes: v.array(v.number()),
      tokens: v.number(),
      cost: v.number(),
      latencyBuckets: v.array(v.number()),
    }),
  ),
  refusals: vRefusals,
  shadowRefusals: vRefusals,
  botEvents: v.array(
    v.object({ type: vDetectionType, action: vBotAction, count: v.number() }),
  ),
  botSeries: v.array(v.number()),
  authFailures: v.array(v.number()),
  topKeys: v.array(
    v.object({
      id: v.string(),
      name: v.string(),
      prefix: v.string(),
      kind: vKind,
      requests: v.number(),
      lastUsed: v.optional(v.number()),
      active: v.boolean(),
    }),
  ),
  truncated: v.boolean(),
});

/** A minute or hour rollup, at the start of its unit. */
type Rollup = {
  provider: string;
  at: number;
  requests: number;
  successes: number;
  tokens: number;
  cost: number;
  latencyBuckets?: number[];
  refusals?: StoredRefusals;
  shadowRefusals?: StoredRefusals;
};

type Series = {
  requests: number[];
  successes: number[];
  tokens: number;
  cost: number;
  latencyBuckets: number[];
};

/**
 * Every figure of `[start, end)` (epoch ms) in buckets of `bucketMs`: whole minutes, or whole
 * hours (then read from the hourly rollups), with `start` and `end` multiples of it. Per
 * provider: requests and successes per bucket, tokens, cost and the latency histogram; the
 * refused requests by reason; bot events by type and action and per bucket; auth failures per
 * bucket; the keys with the most requests in the window (from the key rollups, hourly ones
 * for whole-hour buckets, as for the providers). Bounded reads (the caps above).
 * Rollups written before the dashboard carry no latency buckets or refusals: they count in
 * the requests but not in the percentiles.
 */
export const snapshot = internalQuery({
  args: { start: v.number(), end: v.number(), bucketMs: v.number() },
  returns: vSnapshot,
  handler: async (ctx, { start, end, bucketMs }) => {
    if (!(bucketMs >= MINUTE && bucketMs % MINUTE === 0)) {
      throw new Error("bucketMs must be a whole number of minutes");
    }
    if (start % bucketMs !== 0 || end % bucketMs !== 0 || end <= start) {
      throw new Error(
        "start and end must be multiples of bucketMs, with start < end",
      );
    }
    const n = (end - start) / bucketMs;
    if (n > MAX_BUCKETS)
      throw new Error(`at most ${MAX_BUCKETS} buckets per snapshot`);
    const bucketOf = (t: number) => Math.floor((t - start) / bucketMs);
    let truncated = false;
    function capped<T>(rows: T[], cap: number): T[] {
      if (rows.length <= cap) return rows;
      truncated = true;
      return rows.slice(0, cap);
    }

    const rollups: Rollup[] =
      bucketMs % HOUR === 0
        ? (
            await ctx.db
              .query("providerHourlyRollups")
              .withIndex("by_hour", (q) => q.gte("hour", start).lt("hour", end))
              .take(ROLLUP_READ_CAP + 1)
          ).map((r) => ({ ...r, at: r.hour }))
        : (
            await ctx.db
              .query("providerRollups")
              .withIndex("by_minute", (q) =>
                q.gte("minute", start).lt("minute", end),
              )
              .take(ROLLUP_READ_CAP + 1)
          ).map((r) => ({ ...r, at: r.minute }));
    const providers = new Map<string, Series>();
    let refusals: Refusals = noRefusals();
    let shadowRefusals: Refusals = noRefusals();
    for (const r of capped(rollups, ROLLUP_READ_CAP)) {
      let series = providers.get(r.provider);
      if (series === undefined) {
        series = {
          requests: Array(n).fill(0),
          successes: Array(n).fill(0),
          tokens: 0,
          cost: 0,
          latencyBuckets: noLatencies(),
        };
        providers.set(r.provider, series);
      }
      const i = bucketOf(r.at);
      series.requests[i] += r.requests;
      series.successes[i] += r.successes;
      series.tokens += r.tokens;
      series.cost += r.cost;
      if (r.latencyBuckets !== undefined) {
        series.latencyBuckets = addedBuckets(
          r.latencyBuckets,
          series.latencyBuckets,
        );
      }
      if (r.refusals !== undefined)
        refusals = addedRefusals(r.refusals, refusals);
      if (r.shadowRefusals !== undefined)
        shadowRefusals = addedRefusals(r.shadowRefusals, shadowRefusals);
    }

    const events = await ctx.db
      .query("botDetectionEvents")
      .withIndex("by_timestamp", (q) =>
        q.gte("timestamp", start).lt("timestamp", end),
      )
      .take(BOT_EVENT_READ_CAP + 1);
    type Kind = Pick<(typeof events)[number], "detectionType" | "action">;
    const byKind = new Map<
      string,
      { type: Kind["detectionType"]; action: Kind["action"]; count: number }
    >();
    const botSeries: number[] = Array(n).fill(0);
    for (const e of capped(events, BOT_EVENT_READ_CAP)) {
      const id = `${e.detectionType}/${e.action}`;
      const kind = byKind.get(id) ?? {
        type: e.detectionType,
        action: e.action,
        count: 0,
      };
      kind.count += 1;
      byKind.set(id, kind);
      botSeries[bucketOf(e.timestamp)] += 1;
    }

    const failures = await ctx.db
      .query("embeddingAuthFailures")
      .withIndex("by_timestamp", (q) =>
        q.gte("timestamp", start).lt("timestamp", end),
      )
      .take(AUTH_FAILURE_READ_CAP + 1);
    const authFailures: number[] = Array(n).fill(0);
    for (const f of capped(failures, AUTH_FAILURE_READ_CAP))
      authFailures[bucketOf(f.timestamp)] += 1;

    // Keys: their rollups in the window, summed over writers; only the top ones' documents.
    const keyRollups = capped<{
      keyId: string;
      requests: number;
      lastUsed: number;
    }>(
      bucketMs % HOUR === 0
        ? await ctx.db
            .query("keyHourlyRollups")
            .withIndex("by_hour", (q) => q.gte("hour", start).lt("hour", end))
            .take(KEY_ROLLUP_READ_CAP + 1)
        : await ctx.db
            .query("keyRollups")
            .withIndex("by_minute", (q) =>
              q.gte("minute", start).lt("minute", end),
            )
            .take(KEY_ROLLUP_READ_CAP + 1),
      KEY_ROLLUP_READ_CAP,
    );
    const perKey = new Map<string, { requests: number; lastUsed: number }>();
    for (const r of keyRollups) {
      const sum = perKey.get(r.keyId) ?? { requests: 0, lastUsed: r.lastUsed };
      sum.requests += r.requests;
      sum.lastUsed = Math.max(sum.lastUsed, r.lastUsed);
      perKey.set(r.keyId, sum);
    }
    const ranked = [...perKey]
      .sort(
        ([a, x], [b, y]) =>
          y.requests - x.requests || (a < b ? -1 : a > b ? 1 : 0),
      )
      .slice(0, TOP_KEYS);
    const topKeys = [];
    for (const [id, sum] of ranked) {
      const found = await findKeyById(ctx, id);
      if (found === null) continue; // deleted since: its rollups age out
      const { doc } = found;
      // Its latest use, in or after the window: its newest minute's rows (one per writer).
      const newest = await ctx.db
        .query("keyRollups")
        .withIndex("by_key_minute", (q) => q.eq("keyId", id))
        .order("desc")
        .take(LAST_USED_READS);
      let lastUsed = Math.max(doc.lastUsed ?? 0, sum.lastUsed);
      for (const r of newest) lastUsed = Math.max(lastUsed, r.lastUsed);
      topKeys.push({
        id,
        name: doc.name,
        prefix: doc.prefix,
        kind: found.kind,
        requests: sum.requests,
        lastUsed,
        active: doc.active,
      });
    }

    return {
      providers: [...providers]
        .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
        .map(([provider, s]) => ({ provider, ...s })),
      refusals,
      shadowRefusals,
      botEvents: [...byKind.values()],
      botSeries,
      authFailures,
      topKeys,
      truncated,
    };
  },
});
