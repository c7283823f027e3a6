// Settlements in logs:writeBatch: token and cost reservations corrected by what was used.
import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import { newDeployment, T0, type Deployment } from "./setup";

const MINUTE = 60_000;
const tpm = { kind: "fixed window", rate: 100, period: MINUTE, start: 0 } as const;
const bucket = { kind: "token bucket", rate: 100, period: MINUTE } as const;
const emptyBatch = { aiRequests: [], embeddingRequests: [], authFailures: [], botEvents: [], keyUsage: [] };

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(T0 + 10_000);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
});

async function reserve(config: typeof tpm | typeof bucket, count: number, key = "k") {
  return await t.mutation(internal.guard.check, { limits: [{ name: "tpm", key, count, config }] });
}

async function settle(batchId: string, config: typeof tpm | typeof bucket, amount: number, reservedAt: number, key = "k") {
  return await t.mutation(internal.logs.writeBatch, {
    ...emptyBatch,
    batchId,
    settlements: [{ name: "tpm", key, config, amount, reservedAt }],
  });
}

async function value(config: typeof tpm | typeof bucket, key = "k") {
  return (await t.query(internal.limits.peek, { name: "tpm", key, config })).value;
}

describe("writeBatch settlements", () => {
  test("a charge and a refund land once per batch id", async () => {
    const reserved = await reserve(tpm, 30);
    expect(reserved.ok).toBe(true);
    expect(await value(tpm)).toBe(70);
    expect(await settle("up", tpm, 20, reserved.now)).toEqual({ applied: true });
    expect(await value(tpm)).toBe(50);
    expect(await settle("up", tpm, 20, reserved.now)).toEqual({ applied: false });
    expect(await value(tpm)).toBe(50);
    await settle("down", tpm, -45, reserved.now);
    expect(await value(tpm)).toBe(95);
  });

  test("a charge past what is left is a debt the next requests wait out", async () => {
    const reserved = await reserve(tpm, 90);
    await settle("over", tpm, 50, reserved.now);
    expect(await value(tpm)).toBe(-40);
    const next = await reserve(tpm, 1);
    expect(next.ok).toBe(false);
    // The next window starts 40 tokens short.
    vi.advanceTimersByTime(MINUTE);
    const later = await reserve(tpm, 60);
    expect(later.ok).toBe(true);
    expect(later.results[0].value).toBe(0);
  });

  test("a refund never reaches a later fixed window, but a token bucket takes it", async () => {
    const reserved = await reserve(tpm, 30);
    vi.advanceTimersByTime(MINUTE);
    await settle("late", tpm, -30, reserved.now);
    expect((await reserve(tpm, 100)).ok).toBe(true); // the new window's 100, no more
    expect((await reserve(tpm, 1)).ok).toBe(false);

    const held = await reserve(bucket, 80, "b");
    await settle("bucket", bucket, -50, held.now, "b");
    expect(await value(bucket, "b")).toBe(70);
  });

  test("a refund to a limit with no state is dropped: it would be cut at capacity", async () => {
    await settle("nothing", tpm, -10, Date.now(), "unseen");
    expect(await value(tpm, "unseen")).toBe(100);
  });

  test("an unkeyed settlement settles the shared state", async () => {
    const reserved = await t.mutation(internal.guard.check, {
      limits: [{ name: "tpm", count: 40, config: tpm }],
    });
    expect(reserved.ok).toBe(true);
    await t.mutation(internal.logs.writeBatch, {
      ...emptyBatch,
      batchId: "shared",
      settlements: [{ name: "tpm", config: tpm, amount: -15, reservedAt: reserved.now }],
    });
    expect((await t.query(internal.limits.peek, { name: "tpm", config: tpm })).value).toBe(75);
  });
});
