import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import { BATCH } from "../convex/retention";
import { newDeployment, T0, type Deployment } from "./setup";

const DAY = 86_400_000;
const NOW = T0 + 100 * DAY;

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(NOW);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllEnvs();
});

function batch(id: string, timestamp: number, n = 1) {
  const ai = { provider: "openai", model: "m", fingerprint: "fp", ip: "192.0.2.1", success: true, latencyMs: 5 };
  return {
    batchId: id,
    aiRequests: Array.from({ length: n }, (_, i) => ({ ...ai, timestamp: timestamp + i })),
    embeddingRequests: [
      { requestId: id, apiKeyHash: "e", timestamp, batchSize: 1, latencyMs: 1, tokensUsed: 1, success: true, model: "m" },
    ],
    authFailures: [{ keyHash: "k", timestamp }],
    botEvents: [
      { timestamp, fingerprint: "fp", ip: "192.0.2.1", userAgent: "bot", detectionType: "rate_limit" as const, action: "allowed" as const },
    ],
    keyUsage: [],
  };
}

async function counts() {
  return t.run(async (ctx) => ({
    ai: (await ctx.db.query("aiRequestLogs").collect()).length,
    bots: (await ctx.db.query("botDetectionEvents").collect()).length,
    emb: (await ctx.db.query("embeddingRequests").collect()).length,
    fail: (await ctx.db.query("embeddingAuthFailures").collect()).length,
    rollups: (await ctx.db.query("providerRollups").collect()).length,
    hourly: (await ctx.db.query("providerHourlyRollups").collect()).length,
  }));
}

describe("retention", () => {
  test("deletes rows older than 30 days only", async () => {
    await t.mutation(internal.logs.writeBatch, batch("old", NOW - 31 * DAY));
    await t.mutation(internal.logs.writeBatch, batch("new", NOW - 29 * DAY));
    expect(await counts()).toEqual({ ai: 2, bots: 2, emb: 2, fail: 2, rollups: 2, hourly: 2 });
    // Both batch ids were processed "now": they stay.
    expect(await t.mutation(internal.retention.purge, {})).toEqual({ deleted: 6, more: false });
    expect(await counts()).toEqual({ ai: 1, bots: 1, emb: 1, fail: 1, rollups: 1, hourly: 1 });
    const left = await t.run(async (ctx) => ctx.db.query("aiRequestLogs").first());
    expect(left?.timestamp).toBe(NOW - 29 * DAY);
  });

  test("CONVEX_GUARD_RETENTION_DAYS overrides the retention", async () => {
    vi.stubEnv("CONVEX_GUARD_RETENTION_DAYS", "7");
    await t.mutation(internal.logs.writeBatch, batch("a", NOW - 8 * DAY));
    await t.mutation(internal.logs.writeBatch, batch("b", NOW - 6 * DAY));
    await t.mutation(internal.retention.purge, {});
    expect((await counts()).ai).toBe(1);
  });

  test("deletes in bounded batches and reschedules itself while more remain", async () => {
    await t.mutation(internal.logs.writeBatch, batch("old", NOW - 40 * DAY, BATCH + 20));
    const first = await t.mutation(internal.retention.purge, {});
    expect(first.more).toBe(true);
    expect((await counts()).ai).toBe(20);
    await t.finishAllScheduledFunctions(vi.runAllTimers);
    expect(await counts()).toEqual({ ai: 0, bots: 0, emb: 0, fail: 0, rollups: 0, hourly: 0 });
  });
});

describe("retention of alerts", () => {
  type Status = "pending" | "delivered" | "failed";
  async function seed(subject: string, status: Status, lastSeen: number, firstSeen = lastSeen, attempts = 0) {
    await t.run(async (ctx) => {
      await ctx.db.insert("alerts", {
        kind: "auth_failures",
        subject,
        value: 11,
        threshold: 10,
        windowMs: 3_600_000,
        firstSeen,
        lastSeen,
        count: 1,
        status,
        attempts,
        // A claim whose lease ran out long ago: the alert is pending again, for any deliverer.
        ...(attempts > 0 ? { owner: "gone", leaseUntil: lastSeen + 60_000 } : {}),
      });
    });
  }
  async function left() {
    const rows = await t.run(async (ctx) => ctx.db.query("alerts").collect());
    return rows.map((r) => r.subject).sort();
  }

  test("finished alerts last seen before the cutoff go; pending ones stay, however old", async () => {
    await seed("old-delivered", "delivered", NOW - 31 * DAY);
    await seed("old-failed", "failed", NOW - 40 * DAY, NOW - 40 * DAY, 3);
    await seed("old-pending", "pending", NOW - 31 * DAY);
    await seed("old-pending-retried", "pending", NOW - 35 * DAY, NOW - 35 * DAY, 2);
    await seed("new-delivered", "delivered", NOW - 29 * DAY);
    await seed("new-pending", "pending", NOW - DAY);
    // Opened before the cutoff, but seen again since (within its cool-down): it stays.
    await seed("seen-again", "delivered", NOW - 29 * DAY, NOW - 31 * DAY);
    expect(await t.mutation(internal.retention.purge, {})).toEqual({ deleted: 2, more: false });
    expect(await left()).toEqual([
      "new-delivered",
      "new-pending",
      "old-pending",
      "old-pending-retried",
      "seen-again",
    ]);
    // Delivered later, an old pending alert goes with the next run.
    await t.mutation(internal.alerts.claim, { id: await idOf("old-pending"), owner: "me", leaseMs: 60_000 });
    await t.mutation(internal.alerts.mark, { id: await idOf("old-pending"), owner: "me", outcome: "delivered" });
    expect(await t.mutation(internal.retention.purge, {})).toEqual({ deleted: 1, more: false });
    expect(await left()).not.toContain("old-pending");
  });

  test("CONVEX_GUARD_RETENTION_DAYS sets the alerts' retention too", async () => {
    vi.stubEnv("CONVEX_GUARD_RETENTION_DAYS", "7");
    await seed("a", "failed", NOW - 8 * DAY);
    await seed("b", "delivered", NOW - 6 * DAY);
    await t.mutation(internal.retention.purge, {});
    expect(await left()).toEqual(["b"]);
  });

  test("old pending alerts past a batch never keep a run rescheduling itself", async () => {
    for (let i = 0; i < BATCH + 5; i++) await seed(`p${i}`, "pending", NOW - 60 * DAY);
    await seed("done", "delivered", NOW - 60 * DAY);
    expect(await t.mutation(internal.retention.purge, {})).toEqual({ deleted: 1, more: false });
    expect((await left()).length).toBe(BATCH + 5);
  });

  test("a batch of finished alerts beyond BATCH is finished by the rescheduled run", async () => {
    for (let i = 0; i < BATCH + 3; i++) await seed(`d${i}`, "delivered", NOW - 31 * DAY);
    const first = await t.mutation(internal.retention.purge, {});
    expect(first).toEqual({ deleted: BATCH, more: true });
    await t.finishAllScheduledFunctions(vi.runAllTimers);
    expect(await left()).toEqual([]);
  });
});

async function idOf(subject: string): Promise<string> {
  const row = await t.run(async (ctx) =>
    (await ctx.db.query("alerts").collect()).find((r) => r.subject === subject),
  );
  if (row === undefined) throw new Error(`no alert ${subject}`);
  return row._id;
}
