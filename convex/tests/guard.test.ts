import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import { decideLimit } from "../convex/lib/limits";
import { newDeployment, T0, type Deployment } from "./setup";

const MINUTE = 60_000;
const bucket = { kind: "token bucket", rate: 10, period: MINUTE, capacity: 3 } as const;
const window = { kind: "fixed window", rate: 2, period: MINUTE, start: 0 } as const;
const bot = {
  fingerprint: "fp-1",
  ip: "203.0.113.7",
  userAgent: "curl/8.0",
  detectionType: "bot_useragent",
  action: "allowed",
} as const;

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(T0 + 10_000);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
});

describe("guard:check limits", () => {
  test("token bucket admits up to capacity, then denies with retryAfter", async () => {
    const limits = [{ name: "b", key: "k", config: bucket }];
    for (const expected of [2, 1, 0]) {
      const r = await t.mutation(internal.guard.check, { limits });
      expect(r.ok).toBe(true);
      expect(r.now).toBe(T0 + 10_000);
      expect(r.results).toEqual([{ ok: true, value: expected, ts: T0 + 10_000 }]);
    }
    const denied = await t.mutation(internal.guard.check, { limits });
    expect(denied.ok).toBe(false);
    // One token takes period / rate = 6 s to refill; the state is left unchanged.
    expect(denied.results).toEqual([{ ok: false, retryAfter: 6000, value: 0, ts: T0 + 10_000 }]);
    vi.advanceTimersByTime(6000);
    const again = await t.mutation(internal.guard.check, { limits });
    expect(again.ok).toBe(true);
    expect(again.results[0].value).toBeCloseTo(0);
  });

  test("fixed window admits rate per window, aligned to start", async () => {
    const limits = [{ name: "w", config: window }];
    const first = await t.mutation(internal.guard.check, { limits });
    expect(first.results).toEqual([{ ok: true, value: 1, ts: T0 }]);
    const second = await t.mutation(internal.guard.check, { limits });
    expect(second.results).toEqual([{ ok: true, value: 0, ts: T0 }]);
    const denied = await t.mutation(internal.guard.check, { limits });
    expect(denied.ok).toBe(false);
    expect(denied.results).toEqual([{ ok: false, retryAfter: 50_000, value: 0, ts: T0 }]);
    vi.setSystemTime(T0 + MINUTE);
    const next = await t.mutation(internal.guard.check, { limits });
    expect(next.results).toEqual([{ ok: true, value: 1, ts: T0 + MINUTE }]);
  });

  test("count and keys are separate states", async () => {
    const r = await t.mutation(internal.guard.check, {
      limits: [
        { name: "b", key: "a", count: 3, config: bucket },
        { name: "b", key: "z", config: bucket },
      ],
    });
    expect(r.ok).toBe(true);
    expect(r.results.map((x) => x.value)).toEqual([0, 2]);
  });

  test("a limit named twice sees its own consumption", async () => {
    const r = await t.mutation(internal.guard.check, {
      limits: [
        { name: "w", config: window },
        { name: "w", config: window },
        { name: "w", config: window },
      ],
    });
    expect(r.ok).toBe(false);
    expect(r.results.map((x) => x.ok)).toEqual([true, true, false]);
    // Nothing was consumed.
    const peek = await t.query(internal.limits.peek, { name: "w", config: window });
    expect(peek.value).toBe(2);
  });

  test("all or nothing: a denied second limit leaves the first unconsumed", async () => {
    const tight = { kind: "fixed window", rate: 1, period: MINUTE, start: 0 } as const;
    const limits = [
      { name: "b", key: "user", config: bucket },
      { name: "tight", config: tight },
    ];
    const first = await t.mutation(internal.guard.check, { limits });
    expect(first.ok).toBe(true);
    expect(first.results.map((x) => x.value)).toEqual([2, 0]);

    const second = await t.mutation(internal.guard.check, { limits });
    expect(second.ok).toBe(false);
    expect(second.results[0]).toMatchObject({ ok: true, value: 1 }); // decided, then rolled back
    expect(second.results[1]).toMatchObject({ ok: false, retryAfter: 50_000 });

    // The nested mutation's write to the first limit was rolled back.
    const peek = await t.query(internal.limits.peek, { name: "b", key: "user", config: bucket });
    expect(peek).toEqual({ value: 2, ts: T0 + 10_000, now: T0 + 10_000 });
  });

  test("reserve admits ahead of time with retryAfter, up to maxReserved", async () => {
    const reserved = { ...bucket, maxReserved: 2 };
    const limits = [{ name: "r", count: 3, reserve: true, config: reserved }];
    const full = await t.mutation(internal.guard.check, { limits });
    expect(full.results[0]).toEqual({ ok: true, value: 0, ts: T0 + 10_000 });
    const one = await t.mutation(internal.guard.check, {
      limits: [{ name: "r", count: 2, reserve: true, config: reserved }],
    });
    expect(one.results[0]).toEqual({ ok: true, retryAfter: 12_000, value: -2, ts: T0 + 10_000 });
    const over = await t.mutation(internal.guard.check, {
      limits: [{ name: "r", count: 1, reserve: true, config: reserved }],
    });
    expect(over.ok).toBe(false);
    expect(over.results[0]).toMatchObject({ ok: false, retryAfter: 18_000, value: -2 });
  });

  test("a count no window could admit is a configuration error, not a deny", async () => {
    await expect(
      t.mutation(internal.guard.check, { limits: [{ name: "b", count: 4, config: bucket }] }),
    ).rejects.toThrow(/exceeds/);
  });

  test("reset forgets the state; peek consumes nothing", async () => {
    const limits = [{ name: "b", key: "k", count: 3, config: bucket }];
    await t.mutation(internal.guard.check, { limits });
    expect((await t.query(internal.limits.peek, { name: "b", key: "k", config: bucket })).value).toBe(0);
    expect((await t.query(internal.limits.peek, { name: "b", key: "k", config: bucket })).value).toBe(0);
    await t.mutation(internal.limits.reset, { name: "b", key: "k" });
    expect(await t.query(internal.limits.peek, { name: "b", key: "k", config: bucket })).toEqual({
      value: 3,
      ts: T0 + 10_000,
      now: T0 + 10_000,
    });
  });

  test("no limits and no bot is ok", async () => {
    expect(await t.mutation(internal.guard.check, { limits: [] })).toEqual({
      ok: true,
      now: T0 + 10_000,
      results: [],
    });
  });
});

describe("guard:check bots", () => {
  test("escalates past 5 and 10 events in the last hour", async () => {
    const actions: string[] = [];
    const previous: number[] = [];
    for (let i = 0; i < 13; i++) {
      const r = await t.mutation(internal.guard.check, { limits: [], bot });
      actions.push(r.bot!.action);
      previous.push(r.bot!.previousEvents);
      vi.advanceTimersByTime(1000);
    }
    // Counting itself, the 6th call makes 6 events (> 5): challenged; the 11th makes 11: blocked.
    expect(actions).toEqual([
      ...Array(5).fill("allowed"),
      ...Array(5).fill("challenged"),
      ...Array(3).fill("blocked"),
    ]);
    // The count saturates at BLOCK_AFTER + 1: that is all the decision needs.
    expect(previous).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11]);
    const events = await t.query(internal.ai.analytics.getBotEvents, { limit: 100, since: 0 });
    expect(events).toHaveLength(13);
    expect(events[0].action).toBe("blocked");
    expect(events[0].metadata).toEqual({ previousAttempts: 11 });
    expect(events[12].metadata).toEqual({ previousAttempts: 0 });
  });

  test("rotating fingerprints from one client key still escalate", async () => {
    const actions: string[] = [];
    for (let i = 0; i < 12; i++) {
      const rotated = { ...bot, fingerprint: `fp-rotated-${i}`, clientKey: "2001:db8:1:2::/64" };
      const r = await t.mutation(internal.guard.check, { limits: [], bot: rotated });
      actions.push(r.bot!.action);
    }
    expect(actions).toEqual([
      ...Array(5).fill("allowed"),
      ...Array(5).fill("challenged"),
      ...Array(2).fill("blocked"),
    ]);
    // Another client key has its own history; a check without one counts per fingerprint.
    const other = { ...bot, fingerprint: "fp-rotated-0", clientKey: "198.51.100.4" };
    expect((await t.mutation(internal.guard.check, { limits: [], bot: other })).bot).toEqual({
      action: "allowed",
      previousEvents: 1,
    });
    const noKey = { ...bot, fingerprint: "fp-fresh" };
    expect((await t.mutation(internal.guard.check, { limits: [], bot: noKey })).bot).toEqual({
      action: "allowed",
      previousEvents: 0,
    });
  });

  test("events older than an hour do not count", async () => {
    for (let i = 0; i < 11; i++) await t.mutation(internal.guard.check, { limits: [], bot });
    vi.advanceTimersByTime(3_600_001);
    const r = await t.mutation(internal.guard.check, { limits: [], bot });
    expect(r.bot).toEqual({ action: "allowed", previousEvents: 0 });
  });

  test("the policy action is kept when it is more severe", async () => {
    const r = await t.mutation(internal.guard.check, {
      limits: [],
      bot: { ...bot, action: "challenged", metadata: { category: "ai_crawler", score: 0.5 } },
    });
    expect(r.bot).toEqual({ action: "challenged", previousEvents: 0 });
    const [event] = await t.query(internal.ai.analytics.getBotEvents, { limit: 1, since: 0 });
    expect(event.metadata).toEqual({ category: "ai_crawler", score: 0.5, previousAttempts: 0 });
  });

  test("a blocked or challenged bot consumes no limit", async () => {
    const limits = [{ name: "b", key: "k", config: bucket }];
    const r = await t.mutation(internal.guard.check, { limits, bot: { ...bot, action: "blocked" } });
    expect(r).toEqual({
      ok: false,
      now: T0 + 10_000,
      results: [],
      bot: { action: "blocked", previousEvents: 0 },
    });
    const peek = await t.query(internal.limits.peek, { name: "b", key: "k", config: bucket });
    expect(peek.value).toBe(3);
  });

  test("an allowed bot with a denied limit still records its event", async () => {
    const tight = { kind: "fixed window", rate: 1, period: MINUTE, start: 0 } as const;
    await t.mutation(internal.guard.check, { limits: [{ name: "tight", config: tight }] });
    const r = await t.mutation(internal.guard.check, {
      limits: [{ name: "tight", config: tight }],
      bot,
    });
    expect(r.ok).toBe(false);
    expect(r.bot).toEqual({ action: "allowed", previousEvents: 0 });
    expect(await t.query(internal.bots.countSince, { fingerprint: "fp-1", since: 0 })).toBe(1);
  });

  test("the bot's own limit is consumed while allowed; its denial challenges", async () => {
    const suspicious = {
      name: "suspiciousBehavior",
      key: "fp-1",
      config: { kind: "fixed window", rate: 2, period: MINUTE, start: 0 },
    } as const;
    const tight = { kind: "fixed window", rate: 1, period: MINUTE, start: 0 } as const;
    const limits = [{ name: "tight", config: tight }];
    const actions: string[] = [];
    const oks: boolean[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await t.mutation(internal.guard.check, { limits, bot: { ...bot, limit: suspicious } });
      actions.push(r.bot!.action);
      oks.push(r.ok);
    }
    expect(actions).toEqual(["allowed", "allowed", "challenged"]);
    // The second request's own limit denied, yet its bot limit stayed consumed.
    expect(oks).toEqual([true, false, false]);
    const peek = await t.query(internal.limits.peek, suspicious);
    expect(peek.value).toBe(0);
    const events = await t.query(internal.ai.analytics.getBotEvents, { limit: 10, since: 0 });
    expect(events.map((e) => e.action)).toEqual(["challenged", "allowed", "allowed"]);
  });

  test("detectBotPatterns keeps the seed's behaviour", async () => {
    const args = { fingerprint: "fp-2", ip: "198.51.100.1", userAgent: "x", detectionType: "ai_scraper" } as const;
    let last = { action: "", previousAttempts: -1 };
    for (let i = 0; i < 7; i++) last = await t.mutation(internal.ai.analytics.detectBotPatterns, args);
    expect(last).toEqual({ action: "challenged", previousAttempts: 6 });
  });
});

describe("guard:check leases", () => {
  const global = { kind: "fixed window", rate: 10, period: MINUTE, start: 0 } as const;
  const pool = { kind: "token bucket", rate: 10, period: MINUTE, capacity: 10 } as const;

  test("without leases the answer has none", async () => {
    const r = await t.mutation(internal.guard.check, { limits: [{ name: "w", config: window }] });
    expect("leases" in r).toBe(false);
  });

  test("grants want, else need, else refuses with retryAfter; state after", async () => {
    const lease = (want: number, need: number) => ({ name: "g", config: global, want, need });
    const first = await t.mutation(internal.guard.check, { limits: [], leases: [lease(6, 1)] });
    expect(first.ok).toBe(true);
    expect(first.leases).toEqual([{ granted: 6, value: 4, ts: T0 }]);
    const second = await t.mutation(internal.guard.check, { limits: [], leases: [lease(6, 3)] });
    expect(second.leases).toEqual([{ granted: 3, value: 1, ts: T0 }]);
    const third = await t.mutation(internal.guard.check, { limits: [], leases: [lease(6, 2)] });
    expect(third.ok).toBe(false);
    expect(third.leases).toEqual([{ granted: 0, retryAfter: 50_000, value: 1, ts: T0 }]);
  });

  test("a refused lease denies the request: its keyed limits are not consumed", async () => {
    await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "g", config: global, want: 10, need: 10 }],
    });
    const keyed = { name: "ip", key: "1.2.3.4", config: window };
    const r = await t.mutation(internal.guard.check, {
      limits: [keyed],
      leases: [{ name: "g", config: global, want: 4, need: 1 }],
    });
    expect(r.ok).toBe(false);
    expect(r.results.map((x) => x.ok)).toEqual([true]);
    expect(r.leases![0].granted).toBe(0);
    const peek = await t.query(internal.limits.peek, keyed);
    expect(peek.value).toBe(2);
  });

  test("deny decides the keyed limits for their answers and consumes none", async () => {
    const keyed = { name: "ip", key: "5.6.7.8", config: window };
    const r = await t.mutation(internal.guard.check, { limits: [keyed], deny: true });
    expect(r.ok).toBe(false);
    expect(r.results.map((x) => x.ok)).toEqual([true]);
    const peek = await t.query(internal.limits.peek, keyed);
    expect(peek.value).toBe(2);
  });

  test("a granted lease commits even when the keyed limits deny", async () => {
    const tight = { name: "ip", key: "k", config: { ...window, rate: 1 } };
    await t.mutation(internal.guard.check, { limits: [tight] });
    const r = await t.mutation(internal.guard.check, {
      limits: [tight],
      leases: [{ name: "g", config: global, want: 5, need: 1 }],
    });
    expect(r.ok).toBe(false);
    expect(r.leases![0].granted).toBe(5);
    expect((await t.query(internal.limits.peek, { name: "g", config: global })).value).toBe(5);
  });

  test("a negative want hands a token bucket's tokens back", async () => {
    await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "b", config: pool, want: 8, need: 1 }],
    });
    const back = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "b", config: pool, want: -5, need: 0 }],
    });
    expect(back.ok).toBe(true);
    expect(back.leases![0].granted).toBe(-5);
    expect(back.leases![0].value).toBeCloseTo(7);
  });

  test("tokens handed back to a refilled bucket never lift it above capacity", async () => {
    await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "b", config: pool, want: 5, need: 1 }],
    });
    vi.advanceTimersByTime(MINUTE);
    const back = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "b", config: pool, want: -5, need: 0 }],
    });
    expect(back.leases![0].value).toBe(10);
    expect((await t.query(internal.limits.peek, { name: "b", config: pool })).value).toBe(10);
    const next = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "b", config: pool, want: 10, need: 1 }],
    });
    expect(next.leases![0]).toMatchObject({ granted: 10, value: 0 });
  });

  test("a fixed window takes tokens back only in the window they were granted in", async () => {
    const take = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "g", config: global, want: 8, need: 1 }],
    });
    const window0 = take.leases![0].ts;
    const back = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "g", config: global, want: -3, need: 0, window: window0 }],
    });
    expect(back.leases![0]).toEqual({ granted: -3, value: 5, ts: window0 });
    vi.setSystemTime(T0 + MINUTE + 1);
    await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "g", config: global, want: 4, need: 1 }],
    });
    const late = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "g", config: global, want: -5, need: 0, window: window0 }],
    });
    expect(late.leases![0]).toEqual({ granted: 0, value: 6, ts: T0 + MINUTE });
  });

  test("a lease never asks a sharded limit for more than one call may count", async () => {
    const sharded = { kind: "fixed window", rate: 80, period: MINUTE, start: 0, shards: 8 } as const;
    // The component throws above capacity / (shards / 2) = 20 per call; a fresh shard holds
    // 10, so the capped ask may be refused and the need granted instead.
    const r = await t.mutation(internal.guard.check, {
      limits: [],
      leases: [{ name: "s", config: sharded, want: 50, need: 1 }],
    });
    expect(r.ok).toBe(true);
    expect([1, 20]).toContain(r.leases![0].granted);
  });
});

describe("sharded limits on the hot path", () => {
  test("a decision reads a bounded number of shard documents, whatever the shard count", async () => {
    for (const shards of [8, 16]) {
      const config = { kind: "token bucket", rate: 1000 * shards, period: MINUTE, shards } as const;
      const name = `sharded-${shards}`;
      // Fill every shard with a state document first.
      for (let i = 0; i < 12 * shards; i++) {
        await t.mutation(internal.guard.check, { limits: [{ name, config }] });
      }
      const reads = await t.run(async (ctx) => {
        const before = await ctx.meta.getTransactionMetrics();
        await decideLimit(ctx, { name, config }, Date.now());
        const after = await ctx.meta.getTransactionMetrics();
        // A patch reads the document it writes: count the documents read by queries.
        const read = after.documentsRead.used - before.documentsRead.used;
        return read - (after.documentsWritten.used - before.documentsWritten.used);
      });
      // Two sampled by the component's decision, one for the answer's estimate.
      expect(reads).toBeGreaterThan(0);
      expect(reads).toBeLessThanOrEqual(3);
    }
  }, 30_000);
});
