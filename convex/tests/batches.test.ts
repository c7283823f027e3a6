// Batch writes from many app instances: no shared documents, the same answers, and capped
// reads that say so.
import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import { BOT_EVENTS_CAP, EDGE_READ_CAP, ROLLUP_READ_CAP } from "../convex/ai/analytics";
import { LIST_CAP } from "../convex/apiKeys";
import { USAGE_READ_CAP } from "../convex/embeddings/analytics";
import { FOLD_IDLE_MS } from "../convex/lib/keys";
import type { AIRequest } from "../convex/lib/validators";
import { newDeployment, T0, type Deployment } from "./setup";

const M = T0;
const H = 3_600_000;
const emptyBatch = { aiRequests: [], embeddingRequests: [], authFailures: [], botEvents: [], keyUsage: [] };

// Tests that write thousands of rows: slow on a shared machine.
const HEAVY = { timeout: 60_000 };

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(M + 10 * H);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
});

/** Rows over three hours, of two providers, with uneven figures. */
function someRows(n: number): AIRequest[] {
  return Array.from({ length: n }, (_, i) => ({
    provider: i % 3 === 0 ? "groq" : "openai",
    model: "m",
    fingerprint: "fp",
    ip: "192.0.2.1",
    timestamp: M + ((i * 7_919_113) % (3 * H)),
    success: i % 4 !== 0,
    latencyMs: 10 + (i % 17),
    tokensUsed: i % 5,
    cost: (i % 7) / 100,
  }));
}

const ranges: [number, number][] = [
  [M, M + 3 * H],
  [M - 1, M + 3 * H + 1],
  [M + 12_345, M + H + 59_999],
  [M + H, M + 2 * H - 1],
  [M + 30 * 60_000 + 17, M + 2 * H + 61_001],
  [M + 5, M + 5],
];

describe("rollups per writer", () => {
  test("several writers give the same stats as one", HEAVY, async () => {
    const rows = someRows(120);
    const one = newDeployment();
    await one.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "all", writer: "solo", aiRequests: rows });
    // Three writers, interleaved batches of their own.
    for (let b = 0; b < 6; b++) {
      await t.mutation(internal.logs.writeBatch, {
        ...emptyBatch,
        batchId: `b${b}`,
        writer: `w${b % 3}`,
        aiRequests: rows.slice(b * 20, (b + 1) * 20),
      });
    }
    for (const provider of ["openai", "groq"]) {
      for (const [start, end] of ranges) {
        const args = { provider, timeRange: { start, end } };
        const want = await one.query(internal.ai.analytics.getProviderStats, args);
        const got = await t.query(internal.ai.analytics.getProviderStats, args);
        expect({ ...got, totalCost: 0, averageLatency: 0 }).toEqual({ ...want, totalCost: 0, averageLatency: 0 });
        expect(got.totalCost).toBeCloseTo(want.totalCost, 10);
        expect(got.averageLatency).toBeCloseTo(want.averageLatency, 10);
        expect(got.truncated).toBe(false);
      }
    }
    // Every rollup row belongs to one writer, and no two rows share (provider, unit, writer).
    const keys = await t.run(async (ctx) => [
      ...(await ctx.db.query("providerRollups").collect()).map((r) => `m ${r.provider} ${r.minute} ${r.writer}`),
      ...(await ctx.db.query("providerHourlyRollups").collect()).map((r) => `h ${r.provider} ${r.hour} ${r.writer}`),
    ]);
    expect(keys.every((k) => /w[012]$/.test(k))).toBe(true);
    expect(new Set(keys).size).toBe(keys.length);
  });

  test("a writer's batch writes only rollups of its own", async () => {
    const rows = someRows(30);
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "a", writer: "A", aiRequests: rows });
    const before = await t.run(async (ctx) => [
      ...(await ctx.db.query("providerRollups").collect()),
      ...(await ctx.db.query("providerHourlyRollups").collect()),
    ]);
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "b", writer: "B", aiRequests: rows });
    const after = await t.run(async (ctx) => [
      ...(await ctx.db.query("providerRollups").collect()),
      ...(await ctx.db.query("providerHourlyRollups").collect()),
    ]);
    // A's rows are untouched by B's batch; B added rows of its own for the same units.
    for (const row of before) expect(after).toContainEqual(row);
    expect(after.filter((r) => r.writer === "B")).toHaveLength(before.length);
    const stats = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: M, end: M + 3 * H },
    });
    expect(stats.totalRequests).toBe(2 * rows.filter((r) => r.provider === "openai").length);
  });
});

describe("retention of per-writer rollups", () => {
  test("every writer's old rollups are purged, recent ones kept", async () => {
    const DAY = 86_400_000;
    vi.setSystemTime(M + 40 * DAY);
    const old = someRows(12);
    const recent = someRows(12).map((r) => ({ ...r, timestamp: r.timestamp + 39 * DAY }));
    for (const [i, rows] of [old, recent].entries()) {
      for (const writer of ["w0", "w1", "w2"]) {
        await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: `${i}${writer}`, writer, aiRequests: rows });
      }
    }
    const count = () =>
      t.run(async (ctx) => ({
        minutes: (await ctx.db.query("providerRollups").collect()).filter((r) => r.minute < M + 30 * DAY).length,
        hours: (await ctx.db.query("providerHourlyRollups").collect()).filter((r) => r.hour < M + 30 * DAY).length,
        recent: (await ctx.db.query("providerHourlyRollups").collect()).filter((r) => r.hour >= M + 30 * DAY).length,
      }));
    const before = await count();
    expect(before.minutes).toBeGreaterThan(0);
    expect(before.hours).toBe(before.recent); // the same rows, a day apart, per writer
    await t.mutation(internal.retention.purge, {});
    expect(await count()).toEqual({ minutes: 0, hours: 0, recent: before.recent });
  });
});

describe("key usage per writer", () => {
  const aiKey = { kind: "ai" as const, keyHash: "h-ai", prefix: "cg_", name: "k", scopes: [], createdAt: M };
  const embKey = { kind: "embedding" as const, keyHash: "h-emb", prefix: "emb_", name: "e", scopes: [], createdAt: M };

  test("batches never patch the key document; records add the writers' rows up", async () => {
    const ai = await t.mutation(internal.apiKeys.create, aiKey);
    const emb = await t.mutation(internal.apiKeys.create, embKey);
    const docsBefore = await t.run(async (ctx) => [await ctx.db.get(ai.id as never), await ctx.db.get(emb.id as never)]);
    for (let b = 0; b < 9; b++) {
      await t.mutation(internal.logs.writeBatch, {
        ...emptyBatch,
        batchId: `k${b}`,
        writer: `w${b % 3}`,
        keyUsage: [
          { keyId: ai.id, lastUsed: M + 100 * b, requests: b + 1 },
          { keyId: emb.id, lastUsed: M + 1_000 - b, requests: 2 },
        ],
      });
    }
    const docsAfter = await t.run(async (ctx) => [await ctx.db.get(ai.id as never), await ctx.db.get(emb.id as never)]);
    expect(docsAfter).toEqual(docsBefore);
    const usageRows = await t.run(async (ctx) => ctx.db.query("apiKeyUsage").collect());
    expect(usageRows).toHaveLength(6); // one per (key, writer)

    const want = { ai: { requestCount: 45, lastUsed: M + 800 }, emb: { requestCount: 18, lastUsed: M + 1_000 } };
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "h-ai" })).toMatchObject(want.ai);
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "h-emb" })).toMatchObject(want.emb);
    const listed = await t.query(internal.apiKeys.list, {});
    expect(listed.keys.find((k) => k.id === ai.id)).toMatchObject(want.ai);
    expect(listed.keys.find((k) => k.id === emb.id)).toMatchObject(want.emb);
    expect(await t.mutation(internal.apiKeys.update, { id: ai.id, active: false })).toMatchObject({
      ...want.ai,
      active: false,
    });

    // Retention folds rows idle for an hour into the key document: the record is unchanged.
    vi.setSystemTime(M + 10 * H + FOLD_IDLE_MS + 1);
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "late",
      writer: "w0",
      keyUsage: [{ keyId: ai.id, lastUsed: M + 5_000, requests: 5 }],
    });
    const purged = await t.mutation(internal.retention.purge, {});
    expect(purged.deleted).toBe(5); // the five idle rows; w0's row of the AI key is fresh
    const left = await t.run(async (ctx) => ctx.db.query("apiKeyUsage").collect());
    expect(left.map((r) => [r.keyId, r.writer, r.requests])).toEqual([[ai.id, "w0", 1 + 4 + 7 + 5]]);
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "h-ai" })).toMatchObject({
      requestCount: 50,
      lastUsed: M + 5_000,
    });
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "h-emb" })).toMatchObject(want.emb);
    const folded = await t.run(async (ctx) => ctx.db.get(emb.id as never));
    expect(folded).toMatchObject({ requestCount: 18, lastUsed: M + 1_000 });
  });

  test("embeddings logRequest counts the call without patching the key", async () => {
    const emb = await t.mutation(internal.apiKeys.create, embKey);
    const before = await t.run(async (ctx) => ctx.db.get(emb.id as never));
    const req = { apiKeyHash: "h-emb", batchSize: 1, latencyMs: 1, tokensUsed: 1, success: true };
    await t.mutation(internal.embeddings.analytics.logRequest, { ...req, requestId: "1", timestamp: M + 1 });
    await t.mutation(internal.embeddings.analytics.logRequest, { ...req, requestId: "2", timestamp: M + 9, writer: "a" });
    await t.mutation(internal.embeddings.analytics.logRequest, { ...req, requestId: "3", timestamp: M + 5, writer: "a" });
    expect(await t.run(async (ctx) => ctx.db.get(emb.id as never))).toEqual(before);
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "h-emb" })).toMatchObject({
      requestCount: 3,
      lastUsed: M + 9,
    });
  });

  test("usage rows of a deleted key are dropped by the fold", async () => {
    const ai = await t.mutation(internal.apiKeys.create, aiKey);
    await t.mutation(internal.apiKeys.recordUsage, { usage: [{ keyId: ai.id, lastUsed: M, requests: 1 }], writer: "x" });
    await t.run(async (ctx) => ctx.db.delete(ai.id as never));
    vi.setSystemTime(M + 10 * H + FOLD_IDLE_MS + 1);
    expect(await t.mutation(internal.retention.purge, {})).toEqual({ deleted: 1, more: false });
    expect(await t.run(async (ctx) => ctx.db.query("apiKeyUsage").collect())).toEqual([]);
  });
});

describe("capped reads say so", () => {
  const row = { provider: "openai", model: "m", fingerprint: "fp", ip: "192.0.2.1", success: true, latencyMs: 1 };

  test("getProviderStats: a partial-minute edge over EDGE_READ_CAP rows", HEAVY, async () => {
    const edge = Array.from({ length: EDGE_READ_CAP + 1 }, (_, i) => ({ ...row, timestamp: M + 1 + (i % 50_000) }));
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "edge", writer: "w", aiRequests: edge });
    const capped = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: M + 1, end: M + 59_999 },
    });
    expect(capped).toMatchObject({ totalRequests: EDGE_READ_CAP, truncated: true });
    // The whole minute comes from its rollup: complete, not truncated.
    const whole = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: M, end: M + 60_000 },
    });
    expect(whole).toMatchObject({ totalRequests: EDGE_READ_CAP + 1, truncated: false });
  });

  test("getProviderStats: more than ROLLUP_READ_CAP rollups", HEAVY, async () => {
    const n = ROLLUP_READ_CAP + 1;
    await t.run(async (ctx) => {
      for (let i = 0; i < n; i++) {
        const sums = { requests: 1, successes: 1, latencySum: 1, tokens: 0, cost: 0 };
        await ctx.db.insert("providerHourlyRollups", { provider: "openai", hour: M - H * (i % 24), writer: `w${i}`, ...sums });
      }
    });
    const range = { start: M - 24 * H, end: M + H - 1 };
    const capped = await t.query(internal.ai.analytics.getProviderStats, { provider: "openai", timeRange: range });
    expect(capped).toMatchObject({ totalRequests: ROLLUP_READ_CAP, truncated: true });
  });

  test("getUsage: more than USAGE_READ_CAP rows", HEAVY, async () => {
    const req = { apiKeyHash: "k", batchSize: 2, latencyMs: 1, tokensUsed: 3, success: true, model: "m" };
    const rows = Array.from({ length: USAGE_READ_CAP + 1 }, (_, i) => ({ ...req, requestId: `${i}`, timestamp: M + i }));
    // Two batches: one mutation may write at most 8,192 documents.
    const half = Math.ceil(rows.length / 2);
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "u1", embeddingRequests: rows.slice(0, half) });
    await t.mutation(internal.logs.writeBatch, { ...emptyBatch, batchId: "u2", embeddingRequests: rows.slice(half) });
    const all = await t.query(internal.embeddings.analytics.getUsage, { keyHash: "k", start: M, end: M + rows.length });
    expect(all).toEqual({
      totalRequests: USAGE_READ_CAP,
      successfulRequests: USAGE_READ_CAP,
      totalTokens: 3 * USAGE_READ_CAP,
      totalItems: 2 * USAGE_READ_CAP,
      truncated: true,
    });
    const exact = await t.query(internal.embeddings.analytics.getUsage, { keyHash: "k", start: M + 1, end: M + rows.length });
    expect(exact).toMatchObject({ totalRequests: USAGE_READ_CAP, truncated: false });
  });

  test("apiKeys:list: more than LIST_CAP keys of a kind", HEAVY, async () => {
    await t.run(async (ctx) => {
      for (let i = 0; i <= LIST_CAP; i++) {
        await ctx.db.insert("apiKeys", {
          key: `h${i}`, prefix: "cg_", name: `k${i}`, scopes: [], createdAt: M, requestCount: 0, active: true,
          ...(i === 0 ? { userId: "one" } : {}),
        });
      }
    });
    const all = await t.query(internal.apiKeys.list, { kind: "ai" });
    expect(all.keys).toHaveLength(LIST_CAP);
    expect(all.truncated).toBe(true);
    expect(await t.query(internal.apiKeys.list, { kind: "embedding" })).toEqual({ keys: [], truncated: false });
    const one = await t.query(internal.apiKeys.list, { owner: "one" });
    expect(one.keys.map((k) => k.name)).toEqual(["k0"]);
    expect(one.truncated).toBe(false);
  });
});

describe("bot events past one query's cap", () => {
  const ev = (i: number) => ({
    timestamp: M + Math.floor(i / 3), // ties: three events per millisecond
    fingerprint: `fp${i}`,
    ip: "192.0.2.1",
    userAgent: "bot",
    detectionType: "ai_scraper" as const,
    action: "allowed" as const,
  });

  test("getBotEvents refuses a limit above its cap; pageBotEvents pages through all", HEAVY, async () => {
    const n = BOT_EVENTS_CAP + 250;
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "many-bots",
      botEvents: Array.from({ length: n }, (_, i) => ev(i)),
    });
    await expect(
      t.query(internal.ai.analytics.getBotEvents, { limit: BOT_EVENTS_CAP + 1, since: 0 }),
    ).rejects.toThrow(/at most 1000 events/);
    expect(await t.query(internal.ai.analytics.getBotEvents, { limit: BOT_EVENTS_CAP, since: 0 })).toHaveLength(
      BOT_EVENTS_CAP,
    );
    const seen: string[] = [];
    let cursor: string | null = null;
    let pages = 0;
    for (;;) {
      const page: { page: { fingerprint: string; timestamp: number }[]; isDone: boolean; continueCursor: string } =
        await t.query(internal.ai.analytics.pageBotEvents, { since: M + 10, numItems: 400, cursor });
      seen.push(...page.page.map((e) => e.fingerprint));
      pages += 1;
      if (page.isDone) break;
      cursor = page.continueCursor;
    }
    const want = Array.from({ length: n }, (_, i) => ev(i)).filter((e) => e.timestamp >= M + 10);
    expect(new Set(seen)).toEqual(new Set(want.map((e) => e.fingerprint)));
    expect(seen).toHaveLength(want.length);
    expect(pages).toBeGreaterThanOrEqual(Math.ceil(want.length / 400));
  });
});
