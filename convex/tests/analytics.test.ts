import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import type { AIRequest } from "../convex/lib/validators";
import { newDeployment, T0, type Deployment } from "./setup";

const M = T0; // a minute boundary
const base = { model: "gpt", fingerprint: "fp", ip: "192.0.2.1" };
const rows: AIRequest[] = [
  { ...base, provider: "openai", timestamp: M - 30_000, success: true, latencyMs: 100, tokensUsed: 10, cost: 0.01 },
  { ...base, provider: "openai", timestamp: M + 5_000, success: true, latencyMs: 200, tokensUsed: 20, cost: 0.02 },
  { ...base, provider: "openai", timestamp: M + 65_000, success: false, latencyMs: 300, error: "timeout" },
  { ...base, provider: "openai", timestamp: M + 125_000, success: true, latencyMs: 400, tokensUsed: 40, cost: 0.04 },
  { ...base, provider: "groq", timestamp: M + 130_000, success: true, latencyMs: 50, tokensUsed: 5, cost: 0 },
];
const emptyBatch = { aiRequests: [], embeddingRequests: [], authFailures: [], botEvents: [], keyUsage: [] };

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(M + 600_000);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
});

function naive(provider: string, start: number, end: number, all: typeof rows) {
  const hit = all.filter((r) => r.provider === provider && r.timestamp >= start && r.timestamp <= end);
  const n = hit.length;
  if (n === 0) {
    return { totalRequests: 0, successRate: 0, averageLatency: 0, totalTokens: 0, totalCost: 0, truncated: false, shadowRefusals: 0 };
  }
  return {
    truncated: false,
    shadowRefusals: 0,
    totalRequests: n,
    successRate: hit.filter((r) => r.success).length / n,
    averageLatency: hit.reduce((s, r) => s + r.latencyMs, 0) / n,
    totalTokens: hit.reduce((s, r) => s + (r.tokensUsed ?? 0), 0),
    totalCost: hit.reduce((s, r) => s + (r.cost ?? 0), 0),
  };
}

describe("getProviderStats", () => {
  test("hand-computed figures over rollups and both edges", async () => {
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "b1", aiRequests: rows });
    const stats = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: M - 40_000, end: M + 126_000 },
    });
    expect(stats.totalRequests).toBe(4);
    expect(stats.successRate).toBe(0.75);
    expect(stats.averageLatency).toBe(250);
    expect(stats.totalTokens).toBe(70);
    expect(stats.totalCost).toBeCloseTo(0.07, 10);
  });

  test("no requests in range: zeros, never NaN", async () => {
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "b1", aiRequests: rows });
    const zeros = { totalRequests: 0, successRate: 0, averageLatency: 0, totalTokens: 0, totalCost: 0, truncated: false, shadowRefusals: 0 };
    for (const [start, end] of [
      [M + 130_000, M + 10 * 60_000],
      [M - 10 * 60_000, M - 31_000],
      [M + 10_000, M],
    ]) {
      expect(
        await t.query(internal.ai.analytics.getProviderStats, { provider: "openai", timeRange: { start, end } }),
      ).toEqual(zeros);
    }
    expect(
      await t.query(internal.ai.analytics.getProviderStats, { provider: "none", timeRange: { start: 0, end: M * 2 } }),
    ).toEqual(zeros);
  });

  test("whole minutes come from the rollups, edges from raw rows", async () => {
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "b1", aiRequests: rows });
    // Remove the raw rows of the two whole minutes: the rollups still count them.
    await t.run(async (ctx) => {
      const raw = await ctx.db
        .query("aiRequestLogs")
        .withIndex("by_provider", (q) => q.eq("provider", "openai").gte("timestamp", M).lt("timestamp", M + 120_000))
        .collect();
      expect(raw).toHaveLength(2);
      for (const r of raw) await ctx.db.delete(r._id);
    });
    const stats = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: M - 40_000, end: M + 126_000 },
    });
    expect(stats.totalRequests).toBe(4);
  });

  test("matches a naive count over many ranges, single-row logs included", async () => {
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "b1", aiRequests: rows.slice(0, 3) });
    for (const row of rows.slice(3)) await t.mutation(internal.ai.analytics.logAIRequest, row);
    const edges = [M - 90_000, M - 30_000, M - 1, M, M + 5_000, M + 59_999, M + 60_000, M + 65_000, M + 120_000, M + 125_000, M + 200_000];
    for (const start of edges) {
      for (const end of edges) {
        for (const provider of ["openai", "groq"]) {
          const got = await t.query(internal.ai.analytics.getProviderStats, { provider, timeRange: { start, end } });
          const want = naive(provider, start, end, rows);
          expect({ ...got, totalCost: 0 }).toEqual({ ...want, totalCost: 0 });
          expect(got.totalCost).toBeCloseTo(want.totalCost, 10);
        }
      }
    }
  });
});

describe("getProviderStats over hours", () => {
  const H = 3_600_000;
  // T0 is minute-aligned; H0 is the next whole hour.
  const H0 = Math.ceil(T0 / H) * H;
  const times = [
    H0 - 90 * 60_000 - 7, // a partial minute, two hours before
    H0 - 61 * 60_000, // a whole minute of a partial hour
    H0 - 30_000, // the last minute before H0
    H0, // first instant of a whole hour
    H0 + 59 * 60_000 + 59_999, // last instant of that hour
    H0 + 2 * H + 5, // a later whole hour
    H0 + 3 * H + 61_000, // a partial hour, second minute
  ];
  const hourRows: AIRequest[] = times.map((timestamp, i) => ({
    ...base,
    provider: "openai",
    timestamp,
    success: i % 2 === 0,
    latencyMs: 10 * (i + 1),
    tokensUsed: i,
    cost: i / 100,
  }));

  beforeEach(async () => {
    vi.setSystemTime(H0 + 10 * H);
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "hours", aiRequests: hourRows });
  });

  test("matches a naive count over ranges that span hours, minutes and raw edges", async () => {
    const edges = [
      H0 - 2 * H, H0 - 90 * 60_000 - 7, H0 - 61 * 60_000 + 1, H0 - 60 * 60_000, H0 - 1, H0,
      H0 + H - 1, H0 + H, H0 + 2 * H + 5, H0 + 3 * H, H0 + 3 * H + 61_000, H0 + 5 * H + 123,
    ];
    for (const start of edges) {
      for (const end of edges) {
        const got = await t.query(internal.ai.analytics.getProviderStats, {
          provider: "openai",
          timeRange: { start, end },
        });
        const want = naive("openai", start, end, hourRows);
        expect({ ...got, totalCost: 0 }).toEqual({ ...want, totalCost: 0 });
        expect(got.totalCost).toBeCloseTo(want.totalCost, 10);
      }
    }
  });

  test("whole hours are read from the hourly rollups", async () => {
    await t.run(async (ctx) => {
      for (const r of await ctx.db.query("aiRequestLogs").collect()) await ctx.db.delete(r._id);
      for (const r of await ctx.db.query("providerRollups").collect()) await ctx.db.delete(r._id);
    });
    const stats = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: H0 - 2 * H, end: H0 + 5 * H },
    });
    expect(stats.totalRequests).toBe(times.length);
  });
});

describe("logs:writeBatch", () => {
  test("a retried batch is written once", async () => {
    const key = await t.mutation(internal.apiKeys.create, {
      kind: "ai", keyHash: "h1", prefix: "cg_", name: "k", scopes: [], createdAt: M,
    });
    const batch = {
      batchId: "batch-42",
      aiRequests: rows,
      embeddingRequests: [
        { requestId: "r1", apiKeyHash: "e1", timestamp: M, batchSize: 8, latencyMs: 12, tokensUsed: 100, success: true, model: "m" },
      ],
      authFailures: [{ keyHash: "bad", timestamp: M, ip: "192.0.2.9" }],
      botEvents: [
        { timestamp: M, fingerprint: "fp", ip: "192.0.2.1", userAgent: "bot", detectionType: "bot_useragent" as const, action: "blocked" as const, metadata: { previousAttempts: 3 } },
      ],
      keyUsage: [{ keyId: key.id, lastUsed: M + 1, requests: 5 }],
    };
    expect(await t.mutation(internal.logs.writeBatch, batch)).toEqual({ applied: true });
    expect(await t.mutation(internal.logs.writeBatch, batch)).toEqual({ applied: false });
    const counts = await t.run(async (ctx) => ({
      ai: (await ctx.db.query("aiRequestLogs").collect()).length,
      emb: (await ctx.db.query("embeddingRequests").collect()).length,
      fail: (await ctx.db.query("embeddingAuthFailures").collect()).length,
      bots: (await ctx.db.query("botDetectionEvents").collect()).length,
      rollupRequests: (await ctx.db.query("providerRollups").collect()).reduce((s, r) => s + r.requests, 0),
    }));
    expect(counts).toEqual({ ai: 5, emb: 1, fail: 1, bots: 1, rollupRequests: 5 });
    const record = await t.query(internal.apiKeys.getByHash, { keyHash: "h1" });
    expect(record).toMatchObject({ requestCount: 5, lastUsed: M + 1 });
  });
});

describe("embeddings analytics", () => {
  test("usage, auth failures and the seed's single-row functions", async () => {
    await t.mutation(internal.apiKeys.create, {
      kind: "embedding", keyHash: "e1", prefix: "emb_", name: "e", scopes: [], createdAt: M,
    });
    const req = { apiKeyHash: "e1", batchSize: 4, latencyMs: 10, tokensUsed: 50, success: true };
    await t.mutation(internal.embeddings.analytics.logRequest, { ...req, requestId: "a", timestamp: M });
    await t.mutation(internal.embeddings.analytics.logRequest, { ...req, requestId: "b", timestamp: M + 10, success: false, error: "x" });
    await t.mutation(internal.embeddings.analytics.logRequest, { ...req, requestId: "c", timestamp: M + 99_999 });
    expect(await t.query(internal.embeddings.analytics.getUsage, { keyHash: "e1", start: M, end: M + 10 })).toEqual({
      totalRequests: 2, successfulRequests: 1, totalTokens: 100, totalItems: 8, truncated: false,
    });
    expect(await t.query(internal.embeddings.analytics.getUsage, { keyHash: "zz", start: 0, end: M * 2 })).toEqual({
      totalRequests: 0, successfulRequests: 0, totalTokens: 0, totalItems: 0, truncated: false,
    });
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "e1" })).toMatchObject({
      requestCount: 3, lastUsed: M + 99_999,
    });

    let flagged = false;
    for (let i = 0; i < 11; i++) {
      ({ flagged } = await t.mutation(internal.embeddings.analytics.logAuthFailure, { keyHash: "bad", timestamp: M + i }));
    }
    expect(flagged).toBe(true);
    expect(await t.query(internal.embeddings.analytics.countAuthFailures, { keyHash: "bad", since: M + 5 })).toBe(6);
    expect(await t.query(internal.embeddings.analytics.countAuthFailures, { keyHash: "bad", since: M + 11 })).toBe(0);
  });

  test("checkRateLimit: the key's own fixed window, through the component", async () => {
    await t.mutation(internal.apiKeys.create, {
      kind: "embedding", keyHash: "e1", prefix: "emb_", name: "e", scopes: [], createdAt: M,
      rateLimit: { requests: 2, period: 60_000 },
    });
    const check = () => t.mutation(internal.embeddings.rateLimiting.checkRateLimit, { keyHash: "e1" });
    expect(await check()).toEqual({ allowed: true, remaining: 1, resetAt: M + 660_000 });
    expect(await check()).toEqual({ allowed: true, remaining: 0, resetAt: M + 660_000 });
    expect(await check()).toEqual({
      allowed: false, reason: "Rate limit exceeded", resetAt: M + 660_000, retryAfter: 60_000,
    });
    expect(await t.mutation(internal.embeddings.rateLimiting.checkRateLimit, { keyHash: "nope" })).toEqual({
      allowed: false, reason: "Invalid API key",
    });
  });
});

describe("bot events", () => {
  test("getBotEvents is newest first and bounded; countSince counts by fingerprint", async () => {
    const ev = (i: number, fingerprint: string) => ({
      timestamp: M + i, fingerprint, ip: "192.0.2.1", userAgent: "bot", detectionType: "ai_scraper" as const, action: "allowed" as const,
    });
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "bots",
      botEvents: [ev(1, "a"), ev(2, "b"), ev(3, "a"), ev(4, "a")],
    });
    const events = await t.query(internal.ai.analytics.getBotEvents, { limit: 2, since: M + 2 });
    expect(events.map((e) => e.timestamp)).toEqual([M + 4, M + 3]);
    expect(await t.query(internal.ai.analytics.getBotEvents, { limit: 10, since: M + 5 })).toEqual([]);
    expect(await t.query(internal.bots.countSince, { fingerprint: "a", since: M + 1 })).toBe(3);
    expect(await t.query(internal.bots.countSince, { fingerprint: "a", since: M + 2 })).toBe(2);
  });
});
