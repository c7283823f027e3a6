// Alerts raised by the batch mutation: once per anomaly whichever writer finds it, deduplicated
// over the cool-down, and claimed for delivery by exactly one instance.
import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import type { AlertRule } from "../convex/lib/alerts";
import type { AIRequest, AuthFailure, BotEvent } from "../convex/lib/validators";
import { newDeployment, T0, type Deployment } from "./setup";

const MIN = 60_000;
const H = 60 * MIN;
const emptyBatch = { aiRequests: [], embeddingRequests: [], authFailures: [], botEvents: [], keyUsage: [] };
const AUTH: AlertRule = { kind: "auth_failures", threshold: 10, windowMs: H, cooldownMs: H, minRequests: 0 };
const WAVE: AlertRule = { kind: "bot_wave", threshold: 5, windowMs: MIN, cooldownMs: 10 * MIN, minRequests: 0 };
const ERRORS: AlertRule = { kind: "error_rate", threshold: 0.5, windowMs: 5 * MIN, cooldownMs: 15 * MIN, minRequests: 4 };
const RULES = [AUTH, WAVE, ERRORS];

let t: Deployment;
let batches = 0;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(T0 + 10 * H + 30_000);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
});

function failure(keyHash: string, ip: string, timestamp = Date.now()): AuthFailure {
  return { keyHash, timestamp, ip, userAgent: "curl/8" };
}

type Rows = { aiRequests?: AIRequest[]; authFailures?: AuthFailure[]; botEvents?: BotEvent[] };

async function write(rows: Rows, writer: string, alertRules: AlertRule[] = RULES) {
  batches += 1;
  return t.mutation(internal.logs.writeBatch, {
    ...emptyBatch,
    ...rows,
    batchId: `b${batches}`,
    writer,
    alertRules,
  });
}

async function allAlerts() {
  return t.query(internal.alerts.list, { since: 0, limit: 100 });
}

describe("auth failures", () => {
  test("the 11th failure of one key in an hour opens one alert per key and per client, across writers", async () => {
    const key = "a".repeat(64);
    for (let i = 0; i < 10; i++) await write({ authFailures: [failure(key, "198.51.100.7")] }, `w${i % 2}`);
    expect(await allAlerts()).toEqual([]);
    await write({ authFailures: [failure(key, "198.51.100.7")] }, "w1");
    const alerts = await allAlerts();
    expect(alerts.map((a) => a.subject).sort()).toEqual([`client:198.51.100.7`, `key:${key}`]);
    for (const a of alerts) {
      expect(a).toMatchObject({ kind: "auth_failures", value: 11, threshold: 10, windowMs: H, count: 1, status: "pending" });
    }
    // More failures within the cool-down update the open alerts, from any writer.
    await write({ authFailures: [failure(key, "198.51.100.7")] }, "w0");
    const again = await allAlerts();
    expect(again).toHaveLength(2);
    expect(again.every((a) => a.count === 2)).toBe(true);
  });

  test("failures without a key alert only for their client; old failures do not count", async () => {
    for (let i = 0; i < 11; i++) {
      await write({ authFailures: [failure("no-key", "203.0.113.9", Date.now() - 2 * H)] }, "w");
    }
    expect(await allAlerts()).toEqual([]);
    for (let i = 0; i < 11; i++) await write({ authFailures: [failure("no-key", "203.0.113.9")] }, "w");
    expect((await allAlerts()).map((a) => a.subject)).toEqual(["client:203.0.113.9"]);
  });

  test("an IPv6 client rotating through its /64 is one subject: its client key", async () => {
    const net = "2001:db8:1:2::/64";
    for (let n = 1; n <= 11; n++) {
      const row = { ...failure(`key-${n}`, `2001:db8:1:2::${n.toString(16)}`), clientKey: net };
      await write({ authFailures: [row] }, `w${n % 2}`);
    }
    expect(await allAlerts()).toMatchObject([{ kind: "auth_failures", subject: `client:${net}`, value: 11 }]);
    const stored = await t.run(async (ctx) => ctx.db.query("embeddingAuthFailures").collect());
    expect(new Set(stored.map((r) => r.ip)).size).toBe(11);
    expect(new Set(stored.map((r) => r.clientKey))).toEqual(new Set([net]));
  });

  test("failures sent without a client key are keyed, and counted, by their ip", async () => {
    for (let i = 0; i < 6; i++) await write({ authFailures: [failure("no-key", "192.0.2.44")] }, "old");
    // The same client from an instance that sends its key (an IPv4 address is its own key).
    for (let i = 0; i < 5; i++) {
      await write({ authFailures: [{ ...failure("no-key", "192.0.2.44"), clientKey: "192.0.2.44" }] }, "new");
    }
    expect((await allAlerts()).map((a) => [a.subject, a.value])).toEqual([["client:192.0.2.44", 11]]);
    const stored = await t.run(async (ctx) => ctx.db.query("embeddingAuthFailures").collect());
    expect(stored.every((r) => r.clientKey === "192.0.2.44")).toBe(true);
  });

  test("after the cool-down a running anomaly opens a new alert", async () => {
    for (let i = 0; i < 11; i++) await write({ authFailures: [failure("b".repeat(64), "")] }, "w");
    expect(await allAlerts()).toHaveLength(1);
    vi.setSystemTime(Date.now() + H);
    for (let i = 0; i < 11; i++) await write({ authFailures: [failure("b".repeat(64), "")] }, "w");
    const alerts = await allAlerts();
    expect(alerts).toHaveLength(2);
    expect(alerts[0].firstSeen - alerts[1].firstSeen).toBe(H);
  });

  test("a batch of more subjects than MAX_SUBJECTS evaluates a bounded number, within the transaction limits", async () => {
    const rows = Array.from({ length: 60 }, (_, i) => failure(i.toString(16).padStart(64, "0"), `10.0.0.${i}`));
    for (let round = 0; round < 11; round++) await write({ authFailures: rows }, `w${round}`);
    // Every subject is over the threshold; each batch evaluates MAX_SUBJECTS (50) of each kind.
    const alerts = await t.query(internal.alerts.list, { since: 0, limit: 500 });
    expect(alerts.length).toBe(100);
    expect(alerts.every((a) => a.value === 11)).toBe(true);
  }, 60_000);

  test("without rules nothing is evaluated", async () => {
    for (let i = 0; i < 12; i++) await write({ authFailures: [failure("c".repeat(64), "192.0.2.4")] }, "w", []);
    expect(await allAlerts()).toEqual([]);
  });
});

describe("bot waves and error rates, over whole minutes that have ended", () => {
  function bot(timestamp: number, i: number): BotEvent {
    return {
      timestamp,
      fingerprint: `fp${i}`,
      ip: "192.0.2.1",
      userAgent: "python-requests",
      detectionType: "bot_useragent",
      action: "allowed",
    };
  }

  test("more than the threshold of flagged requests in the last minute is a wave", async () => {
    const lastMinute = Math.floor(Date.now() / MIN) * MIN - MIN;
    await write({ botEvents: Array.from({ length: 5 }, (_, i) => bot(lastMinute + i, i)) }, "w");
    // The current minute's events are not read: a wave is judged once its minute ended.
    await write({ botEvents: Array.from({ length: 9 }, (_, i) => bot(Date.now(), i)) }, "w");
    expect(await allAlerts()).toEqual([]);
    await write({ botEvents: [bot(lastMinute + 10, 99)] }, "w");
    expect(await allAlerts()).toMatchObject([{ kind: "bot_wave", subject: "all", value: 6 }]);
  });

  test("a provider failing more than half of its requests, over every writer's rollups", async () => {
    const earlier = Math.floor(Date.now() / MIN) * MIN - 2 * MIN;
    const row = (success: boolean): AIRequest => ({
      timestamp: earlier,
      provider: "groq",
      model: "m",
      fingerprint: "fp",
      ip: "192.0.2.1",
      success,
      latencyMs: 5,
    });
    await write({ aiRequests: [row(false), row(false)] }, "w0");
    await write({ aiRequests: [row(true)] }, "w1");
    expect(await allAlerts()).toEqual([]); // 3 requests: fewer than minRequests
    await write({ aiRequests: [row(false)] }, "w2");
    expect(await allAlerts()).toMatchObject([{ kind: "error_rate", subject: "provider:groq", value: 0.75 }]);
  });
});

describe("limits near exhaustion", () => {
  test("a watched limit with more than the threshold of its tokens spent alerts, with its period", async () => {
    const config = { kind: "fixed window" as const, rate: 10, period: H, start: T0 };
    const limits = [{ name: "perKey", key: "key-1", config }];
    const rule: AlertRule = { kind: "limit_exhaustion", threshold: 0.8, windowMs: H, cooldownMs: H, minRequests: 0, limits };
    const spend = async (n: number) => {
      for (let i = 0; i < n; i++) {
        await t.mutation(internal.guard.check, { limits: [{ name: "perKey", key: "key-1", config }] });
      }
    };
    await write({}, "w", [rule]);
    await spend(8);
    await write({}, "w", [rule]);
    expect(await allAlerts()).toEqual([]); // 80% spent: not more than the threshold
    await spend(1);
    await write({}, "w", [rule]);
    expect(await allAlerts()).toMatchObject([
      { kind: "limit_exhaustion", subject: "limit:perKey:key-1", value: 0.9, threshold: 0.8, windowMs: H },
    ]);
    // The next window refills it: nothing new, and the open alert is left as it was.
    vi.setSystemTime(Date.now() + H);
    await write({}, "w", [rule]);
    expect(await allAlerts()).toMatchObject([{ count: 1 }]);
  });
});

describe("delivery claims", () => {
  async function oneAlert() {
    for (let i = 0; i < 11; i++) await write({ authFailures: [failure("d".repeat(64), "")] }, "w");
    const [alert] = await t.query(internal.alerts.pending, { limit: 10 });
    return alert;
  }

  test("one claimer wins; the lease keeps others out until it runs out", async () => {
    const alert = await oneAlert();
    expect(await t.mutation(internal.alerts.claim, { id: alert.id, owner: "A", leaseMs: 10_000 })).toBe(true);
    expect(await t.mutation(internal.alerts.claim, { id: alert.id, owner: "B", leaseMs: 10_000 })).toBe(false);
    expect(await t.query(internal.alerts.pending, { limit: 10 })).toEqual([]);
    vi.setSystemTime(Date.now() + 10_000);
    // A's lease ran out (A died): B takes it, and A can no longer mark it.
    expect(await t.mutation(internal.alerts.claim, { id: alert.id, owner: "B", leaseMs: 10_000 })).toBe(true);
    expect(await t.mutation(internal.alerts.mark, { id: alert.id, owner: "A", outcome: "delivered" })).toBe(false);
    expect(await t.mutation(internal.alerts.mark, { id: alert.id, owner: "B", outcome: "delivered" })).toBe(true);
    const [done] = await allAlerts();
    expect(done).toMatchObject({ status: "delivered", attempts: 2 });
    expect(done.owner).toBeUndefined();
    expect(await t.mutation(internal.alerts.claim, { id: alert.id, owner: "C", leaseMs: 1 })).toBe(false);
  });

  test("retry hands the alert back; failed is final; a bad id is refused", async () => {
    const alert = await oneAlert();
    await t.mutation(internal.alerts.claim, { id: alert.id, owner: "A", leaseMs: 60_000 });
    expect(await t.mutation(internal.alerts.mark, { id: alert.id, owner: "A", outcome: "retry" })).toBe(true);
    expect(await t.query(internal.alerts.pending, { limit: 10 })).toMatchObject([{ id: alert.id, attempts: 1 }]);
    await t.mutation(internal.alerts.claim, { id: alert.id, owner: "B", leaseMs: 60_000 });
    await t.mutation(internal.alerts.mark, { id: alert.id, owner: "B", outcome: "failed" });
    expect(await allAlerts()).toMatchObject([{ status: "failed", attempts: 2 }]);
    expect(await t.query(internal.alerts.pending, { limit: 10 })).toEqual([]);
    expect(await t.mutation(internal.alerts.claim, { id: "nonsense", owner: "A", leaseMs: 1 })).toBe(false);
  });
});
