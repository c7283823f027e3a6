// The dashboard snapshot: bucketed figures from the rollups (histograms and refusals written
// by the batch mutation), bot events, auth failures and key rollups, with capped reads.
import { beforeEach, describe, expect, test } from "vitest";
import { internal } from "../convex/_generated/api";
import {
  AUTH_FAILURE_READ_CAP,
  BOT_EVENT_READ_CAP,
  KEY_ROLLUP_READ_CAP,
  LAST_USED_READS,
  ROLLUP_READ_CAP,
  TOP_KEYS,
} from "../convex/dashboard";
import { LATENCY_BOUNDS_MS, latencyBucket, refusalReason } from "../convex/lib/logs";
import type { AIRequest } from "../convex/lib/validators";
import { newDeployment, T0, type Deployment } from "./setup";

const MIN = 60_000;
const H = 60 * MIN;
const emptyBatch = { aiRequests: [], embeddingRequests: [], authFailures: [], botEvents: [], keyUsage: [] };

function row(at: number, provider: string, latencyMs: number, error?: string): AIRequest {
  return {
    provider,
    model: "m",
    fingerprint: "fp",
    ip: "192.0.2.1",
    timestamp: at,
    success: error === undefined,
    latencyMs,
    tokensUsed: 10,
    cost: 0.25,
    ...(error === undefined ? {} : { error }),
  };
}

let t: Deployment;
beforeEach(() => {
  t = newDeployment();
});

describe("latency buckets and refusal reasons", () => {
  test("bounds are inclusive, the last bucket open", () => {
    expect(latencyBucket(0)).toBe(0);
    expect(latencyBucket(10)).toBe(0);
    expect(latencyBucket(10.5)).toBe(1);
    expect(latencyBucket(30_000)).toBe(LATENCY_BOUNDS_MS.length - 1);
    expect(latencyBucket(30_001)).toBe(LATENCY_BOUNDS_MS.length);
  });

  test("the middlewares' rejection reasons", () => {
    expect(refusalReason("rate_limited:requests,tokens")).toBe("limit");
    expect(refusalReason("rate_limited:apiKey provider:x")).toBe("limit");
    expect(refusalReason("bot_blocked")).toBe("bot");
    expect(refusalReason("bot_challenged")).toBe("bot");
    expect(refusalReason("api_key_missing")).toBe("key");
    expect(refusalReason("api_key_scope")).toBe("key");
    expect(refusalReason("upstream_error")).toBeUndefined();
    expect(refusalReason("rate_limit_unavailable")).toBeUndefined();
    expect(refusalReason(undefined)).toBeUndefined();
  });
});

describe("snapshot", () => {
  test("per-minute buckets summed over writers, histograms and refusals from the rollups", async () => {
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "a",
      writer: "w1",
      aiRequests: [row(T0 + 1_000, "openai", 20), row(T0 + 61_000, "openai", 400, "rate_limited:requests")],
      authFailures: [{ keyHash: "x".repeat(64), timestamp: T0 + 2 * MIN + 5 }],
      botEvents: [
        { timestamp: T0 + 5, fingerprint: "f", ip: "192.0.2.9", userAgent: "curl", detectionType: "bot_useragent", action: "blocked" },
        { timestamp: T0 + 6, fingerprint: "f", ip: "192.0.2.9", userAgent: "curl", detectionType: "bot_useragent", action: "blocked" },
      ],
    });
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "b",
      writer: "w2",
      aiRequests: [row(T0 + 2_000, "openai", 20, "bot_blocked"), row(T0 + 3_000, "groq", 9_000, "api_key_invalid")],
    });
    const snap = await t.query(internal.dashboard.snapshot, { start: T0, end: T0 + 3 * MIN, bucketMs: MIN });
    expect(snap.truncated).toBe(false);
    expect(snap.providers.map((p) => p.provider)).toEqual(["groq", "openai"]);
    const openai = snap.providers[1];
    expect(openai.requests).toEqual([2, 1, 0]);
    expect(openai.successes).toEqual([1, 0, 0]);
    expect(openai.tokens).toBe(30);
    expect(openai.cost).toBeCloseTo(0.75);
    expect(openai.latencyBuckets[latencyBucket(20)]).toBe(2);
    expect(openai.latencyBuckets[latencyBucket(400)]).toBe(1);
    expect(snap.refusals).toEqual({ limit: 1, bot: 1, key: 1, budget: 0, body: 0 });
    expect(snap.botEvents).toEqual([{ type: "bot_useragent", action: "blocked", count: 2 }]);
    expect(snap.botSeries).toEqual([2, 0, 0]);
    expect(snap.authFailures).toEqual([0, 0, 1]);
  });

  test("hourly buckets read the hourly rollups; the end is exclusive", async () => {
    const H0 = Math.ceil(T0 / H) * H;
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "h",
      aiRequests: [row(H0, "openai", 5), row(H0 + H + 7, "openai", 5), row(H0 + 2 * H, "openai", 5)],
    });
    const snap = await t.query(internal.dashboard.snapshot, { start: H0, end: H0 + 2 * H, bucketMs: H });
    expect(snap.providers[0].requests).toEqual([1, 1]);
  });

  test("a rollup from before the dashboard counts in requests, not in the percentiles", async () => {
    await t.run(async (ctx) => {
      await ctx.db.insert("providerRollups", {
        provider: "openai", minute: T0, requests: 4, successes: 4, latencySum: 40, tokens: 0, cost: 0,
      });
    });
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "n", aiRequests: [row(T0 + 9, "openai", 20)] });
    const snap = await t.query(internal.dashboard.snapshot, { start: T0, end: T0 + MIN, bucketMs: MIN });
    expect(snap.providers[0].requests).toEqual([5]);
    expect(snap.providers[0].latencyBuckets.reduce((a, b) => a + b, 0)).toBe(1);
  });

  test("top keys: requests within the window, summed over writers", async () => {
    const ids = await t.run(async (ctx) => {
      const base = { prefix: "cg_ai_", scopes: [], createdAt: T0, requestCount: 1000, active: true };
      return [
        await ctx.db.insert("apiKeys", { ...base, key: "a".repeat(64), name: "alpha" }),
        await ctx.db.insert("embeddingApiKeys", { ...base, keyHash: "b".repeat(64), name: "beta", active: false }),
      ];
    });
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "k1",
      writer: "w1",
      keyUsage: [
        { keyId: ids[0], lastUsed: T0 + 5, requests: 2 },
        { keyId: ids[1], lastUsed: T0 + MIN + 5, requests: 3 },
        { keyId: "nosuchkey", lastUsed: T0 + 5, requests: 9 },
      ],
    });
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "k2",
      writer: "w2",
      keyUsage: [
        { keyId: ids[1], lastUsed: T0 + 2 * MIN + 7, requests: 4 },
        { keyId: ids[0], lastUsed: T0 + 3 * MIN, requests: 50 }, // past the window's end
        { keyId: ids[0], lastUsed: T0 - 1, requests: 40 }, // before its start
      ],
    });
    const snap = await t.query(internal.dashboard.snapshot, { start: T0, end: T0 + 3 * MIN, bucketMs: MIN });
    expect(snap.topKeys).toEqual([
      { id: ids[1], name: "beta", prefix: "cg_ai_", kind: "embedding", requests: 7, lastUsed: T0 + 2 * MIN + 7, active: false },
      { id: ids[0], name: "alpha", prefix: "cg_ai_", kind: "ai", requests: 2, lastUsed: T0 + 3 * MIN, active: true },
    ]);
    expect(JSON.stringify(snap)).not.toContain("a".repeat(64));
    const rows = await t.run(async (ctx) => (await ctx.db.query("keyRollups").collect()).length);
    expect(rows).toBe(5); // one per (key, minute, writer)
    const later = await t.query(internal.dashboard.snapshot, { start: T0 + 3 * MIN, end: T0 + 4 * MIN, bucketMs: MIN });
    expect(later.topKeys.map((k) => [k.name, k.requests])).toEqual([["alpha", 50]]);
  });

  test("top keys over whole hours read the hourly key rollups", async () => {
    const H0 = Math.ceil(T0 / H) * H;
    const id = await t.run(async (ctx) =>
      ctx.db.insert("apiKeys", {
        prefix: "cg_ai_", scopes: [], createdAt: T0, requestCount: 0, active: true, key: "c".repeat(64), name: "gamma",
      }),
    );
    for (const [n, at] of [[1, H0 + 5], [2, H0 + H + 7 * MIN], [4, H0 + 7 * H]] as const) {
      await t.mutation(internal.logs.writeBatch, {
        ...emptyBatch,
        batchId: `h${n}`,
        writer: `w${n}`,
        keyUsage: [{ keyId: id, lastUsed: at, requests: n }],
      });
    }
    // The minute rollups are gone: an hourly snapshot still counts the hours.
    await t.run(async (ctx) => {
      for (const r of await ctx.db.query("keyRollups").collect()) await ctx.db.delete(r._id);
    });
    const snap = await t.query(internal.dashboard.snapshot, { start: H0, end: H0 + 7 * H, bucketMs: H });
    expect(snap.topKeys.map((k) => [k.name, k.requests])).toEqual([["gamma", 3]]);
    const minutes = await t.query(internal.dashboard.snapshot, { start: H0, end: H0 + 2 * H, bucketMs: MIN * 15 });
    expect(minutes.topKeys).toEqual([]);
  });

  test("retention purges old key rollups, minute and hourly, like the provider rollups", async () => {
    const now = Date.now();
    const old = Math.floor((now - 31 * 24 * H) / H) * H;
    const recent = Math.floor((now - 24 * H) / H) * H;
    await t.run(async (ctx) => {
      for (const at of [old, recent]) {
        await ctx.db.insert("keyRollups", { keyId: "k", writer: "w", minute: at, requests: 1, lastUsed: at });
        await ctx.db.insert("keyHourlyRollups", { keyId: "k", writer: "w", hour: at, requests: 1, lastUsed: at });
      }
    });
    await t.mutation(internal.retention.purge, {});
    const left = await t.run(async (ctx) => ({
      minutes: (await ctx.db.query("keyRollups").collect()).map((r) => r.minute),
      hours: (await ctx.db.query("keyHourlyRollups").collect()).map((r) => r.hour),
    }));
    expect(left).toEqual({ minutes: [recent], hours: [recent] });
  });

  test("ranges a snapshot cannot bucket are refused", async () => {
    for (const args of [
      { start: T0, end: T0 + MIN, bucketMs: 1_000 },
      { start: T0 + 1, end: T0 + MIN + 1, bucketMs: MIN },
      { start: T0, end: T0, bucketMs: MIN },
      { start: T0, end: T0 + 501 * MIN, bucketMs: MIN },
    ]) {
      await expect(t.query(internal.dashboard.snapshot, args)).rejects.toThrow();
    }
  });

  test(
    "every cap reached at once: one query within Convex's read limits, truncated",
    { timeout: 120_000 },
    async () => {
      const chunks = async (n: number, insert: (i: number, ctx: any) => Promise<unknown>) => {
        for (let from = 0; from < n; from += 2_000) {
          await t.run(async (ctx) => {
            for (let i = from; i < Math.min(n, from + 2_000); i++) await insert(i, ctx);
          });
        }
      };
      const sums = { requests: 1, successes: 1, latencySum: 5, tokens: 1, cost: 0 };
      await chunks(ROLLUP_READ_CAP + 1, (i, ctx) =>
        ctx.db.insert("providerRollups", { provider: `p${i % 7}`, writer: `w${i}`, minute: T0 + (i % 60) * MIN, ...sums }),
      );
      await chunks(BOT_EVENT_READ_CAP + 1, (i, ctx) =>
        ctx.db.insert("botDetectionEvents", {
          timestamp: T0 + (i % 60) * MIN, fingerprint: `f${i}`, ip: "192.0.2.1",
          userAgent: "x".repeat(200), detectionType: "ai_scraper", action: "blocked",
        }),
      );
      await chunks(AUTH_FAILURE_READ_CAP + 1, (i, ctx) =>
        ctx.db.insert("embeddingAuthFailures", { keyHash: "k".repeat(64), timestamp: T0 + (i % 60) * MIN, userAgent: "y".repeat(200) }),
      );
      const base = { prefix: "cg_", scopes: ["a", "b"], createdAt: T0, requestCount: 1, active: true };
      const keyIds = await t.run(async (ctx) => {
        const ids: string[] = [];
        for (let i = 0; i < 2 * TOP_KEYS; i++) {
          ids.push(await ctx.db.insert("apiKeys", { ...base, key: `${i}`.padStart(64, "0"), name: `k${i}` }));
        }
        return ids;
      });
      await chunks(KEY_ROLLUP_READ_CAP + 1, (i, ctx) =>
        ctx.db.insert("keyRollups", { keyId: keyIds[i % keyIds.length], writer: `w${i}`, minute: T0 + (i % 60) * MIN, requests: 1, lastUsed: T0 }),
      );
      const snap = await t.query(internal.dashboard.snapshot, { start: T0, end: T0 + 60 * MIN, bucketMs: MIN });
      expect(snap.truncated).toBe(true);
      const requests = snap.providers.reduce((n, p) => n + p.requests.reduce((a, b) => a + b, 0), 0);
      expect(requests).toBe(ROLLUP_READ_CAP);
      expect(snap.botSeries.reduce((a, b) => a + b, 0)).toBe(BOT_EVENT_READ_CAP);
      expect(snap.authFailures.reduce((a, b) => a + b, 0)).toBe(AUTH_FAILURE_READ_CAP);
      expect(snap.topKeys).toHaveLength(TOP_KEYS);
      expect(snap.topKeys.reduce((n, k) => n + k.requests, 0)).toBeLessThanOrEqual(KEY_ROLLUP_READ_CAP);
      // What the query read at most (each cap, plus the one row that tells it was reached):
      // under the backend's 16,384 documents per query, which convex-test does not hold to.
      const reads =
        ROLLUP_READ_CAP + BOT_EVENT_READ_CAP + AUTH_FAILURE_READ_CAP + KEY_ROLLUP_READ_CAP + 4 + TOP_KEYS * (1 + LAST_USED_READS);
      expect(reads).toBeLessThan(16_384);
    },
  );
});
