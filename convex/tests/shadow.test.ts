// Shadow refusals (rows with `shadow`) in the rollups, the provider stats and the dashboard
// snapshot, and streamed rows' time to first output: old rows and rollups stay valid.
import { beforeEach, describe, expect, test } from "vitest";
import { internal } from "../convex/_generated/api";
import type { AIRequest } from "../convex/lib/validators";
import { newDeployment, T0, type Deployment } from "./setup";

const MIN = 60_000;
const emptyBatch = { aiRequests: [], embeddingRequests: [], authFailures: [], botEvents: [], keyUsage: [] };

function row(at: number, extra: Partial<AIRequest> = {}): AIRequest {
  return {
    provider: "openai",
    model: "m",
    fingerprint: "fp",
    ip: "192.0.2.1",
    timestamp: at,
    success: true,
    latencyMs: 40,
    tokensUsed: 10,
    ...extra,
  };
}

let t: Deployment;
beforeEach(() => {
  t = newDeployment();
});

describe("shadow refusals", () => {
  test("counted by reason in the rollups, summed over writers, apart from refusals", async () => {
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "a",
      writer: "w1",
      aiRequests: [
        row(T0 + 1_000, { shadow: "rate_limited:tight", ttftMs: 120 }),
        row(T0 + 2_000, { shadow: "bot_blocked rate_limited:tight" }),
        row(T0 + 3_000, { success: false, error: "rate_limited:loose", shadow: "rate_limited:tight" }),
      ],
    });
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "b",
      writer: "w2",
      aiRequests: [row(T0 + MIN + 5, { shadow: "rate_limited:tight" }), row(T0 + MIN + 6)],
    });
    const snap = await t.query(internal.dashboard.snapshot, { start: T0, end: T0 + 2 * MIN, bucketMs: MIN });
    expect(snap.shadowRefusals).toEqual({ limit: 3, bot: 1, key: 0, budget: 0, body: 0 });
    expect(snap.refusals).toEqual({ limit: 1, bot: 0, key: 0, budget: 0, body: 0 });
    expect(snap.providers[0].requests).toEqual([3, 2]);

    // Whole minutes from the rollups, the partial ones from raw rows: the same count.
    for (const [start, end] of [[T0, T0 + 2 * MIN], [T0 + 1_500, T0 + MIN + 5], [T0 - 1, T0 + 3 * MIN]]) {
      const stats = await t.query(internal.ai.analytics.getProviderStats, {
        provider: "openai",
        timeRange: { start, end },
      });
      const raw = [1_000, 2_000, 3_000, MIN + 5].filter((at) => T0 + at >= start && T0 + at <= end);
      expect(stats.shadowRefusals).toBe(raw.length);
    }
    const stored = await t.run((ctx) => ctx.db.query("aiRequestLogs").collect());
    expect(stored.find((r) => r.ttftMs !== undefined)?.ttftMs).toBe(120);
  });

  test("a rollup from before shadow rules counts none", async () => {
    await t.run(async (ctx) => {
      await ctx.db.insert("providerRollups", {
        provider: "openai", minute: T0, requests: 4, successes: 4, latencySum: 40, tokens: 0, cost: 0,
      });
    });
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "n",
      aiRequests: [row(T0 + 9, { shadow: "rate_limited:x" })],
    });
    const snap = await t.query(internal.dashboard.snapshot, { start: T0, end: T0 + MIN, bucketMs: MIN });
    expect(snap.shadowRefusals.limit).toBe(1);
    expect(snap.providers[0].requests).toEqual([5]);
    const stats = await t.query(internal.ai.analytics.getProviderStats, {
      provider: "openai",
      timeRange: { start: T0, end: T0 + MIN },
    });
    expect(stats.totalRequests).toBe(5);
    expect(stats.shadowRefusals).toBe(1);
  });
});
