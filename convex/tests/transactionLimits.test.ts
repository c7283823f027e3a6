// The deployment under test enforces Convex's per-transaction limits (the options form of
// convexTest), so a batch the backend would refuse fails here too, and writes nothing.
import { describe, expect, test } from "vitest";
import { internal } from "../convex/_generated/api";
import type { AIRequest, EmbeddingRequest } from "../convex/lib/validators";
import { newDeployment, T0 } from "./setup";

const ai = (n: number): AIRequest => ({
  timestamp: T0 + n,
  provider: "openai",
  model: "m",
  fingerprint: "f",
  ip: "192.0.2.1",
  success: true,
  latencyMs: 1,
});
const embedding = (n: number): EmbeddingRequest => ({
  requestId: `r${n}`,
  apiKeyHash: "h",
  timestamp: T0 + n,
  batchSize: 1,
  latencyMs: 1,
  tokensUsed: 1,
  success: true,
  model: "m",
});

function batch(batchId: string, aiRows: number, embeddingRows: number) {
  return {
    batchId,
    aiRequests: Array.from({ length: aiRows }, (_, n) => ai(n)),
    embeddingRequests: Array.from({ length: embeddingRows }, (_, n) => embedding(n)),
    authFailures: [],
    botEvents: [],
    keyUsage: [],
  };
}

describe("transaction limits", () => {
  test("a batch over 16,000 writes fails and is rolled back", async () => {
    const t = newDeployment();
    await expect(t.mutation(internal.logs.writeBatch, batch("big", 8192, 7900))).rejects.toThrow(
      /too many documents in a single function execution \(limit: 16000\)/i,
    );
    const written = await t.run(async (ctx) => ({
      logs: (await ctx.db.query("aiRequestLogs").take(1)).length,
      batches: (await ctx.db.query("logBatches").take(1)).length,
    }));
    expect(written).toEqual({ logs: 0, batches: 0 });
  }, 60_000);

  test("a read over 32,000 documents fails", async () => {
    const t = newDeployment();
    // Written in chunks under the write limit, then read in one transaction.
    for (let i = 0; i < 5; i++) {
      await t.mutation(internal.logs.writeBatch, batch(`chunk${i}`, 0, 6500));
    }
    await expect(
      t.run(async (ctx) => (await ctx.db.query("embeddingRequests").collect()).length),
    ).rejects.toThrow(/too many documents in a single function execution \(limit: 32000\)/i);
    expect(await t.run(async (ctx) => (await ctx.db.query("embeddingRequests").take(10)).length)).toBe(10);
  }, 120_000);
});
