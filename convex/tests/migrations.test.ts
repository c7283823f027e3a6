import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import type { Doc } from "../convex/_generated/dataModel";
import { clientKeyOf } from "../convex/lib/addresses";
import { newDeployment, T0, type Deployment } from "./setup";

const NAME = "migrations:backfillBotClientKey";
const MINUTE = 60_000;

/** A bot event as the code before client keys wrote it: no `clientKey`. */
function oldEvent(ip: string, i: number) {
  return {
    timestamp: T0 - (i + 1) * MINUTE,
    fingerprint: `fp-old-${i}`,
    ip,
    userAgent: "curl/8.0",
    detectionType: "bot_useragent",
    action: "allowed",
    metadata: { previousAttempts: 0 },
  } as const;
}

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(T0);
  t = newDeployment();
});
afterEach(() => {
  vi.unstubAllEnvs();
  vi.useRealTimers();
});

async function seed(ips: string[]): Promise<void> {
  await t.run(async (ctx) => {
    for (const [i, ip] of ips.entries()) await ctx.db.insert("botDetectionEvents", oldEvent(ip, i));
  });
}

async function events(): Promise<Doc<"botDetectionEvents">[]> {
  return await t.run(async (ctx) => await ctx.db.query("botDetectionEvents").collect());
}

const keysByIp = async () => Object.fromEntries((await events()).map((e) => [e.ip, e.clientKey]));

/** What `make convex-migrate` does: start the runner, then let its scheduled batches run. */
async function migrate(args: Record<string, unknown> = {}) {
  const started = await t.mutation(internal.migrations.run, args);
  await t.finishAllScheduledFunctions(vi.runAllTimers);
  return started;
}

async function status() {
  const [only, ...rest] = await t.query(internal.migrations.status, {});
  expect(rest).toEqual([]);
  expect(only.name).toBe(NAME);
  return only;
}

describe("clientKeyOf", () => {
  // What convex_guard.core.clientip.peer_keys(ip, prefix)[1] gives for each (Python's
  // ipaddress), "unknown" written as undefined; a recorded `ip` is that function's address.
  const cases: [string, string | undefined, string | undefined, string | undefined][] = [
    // ip, /64, /56, /128
    ["203.0.113.7", "203.0.113.7", "203.0.113.7", "203.0.113.7"],
    ["2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64", "2001:db8:1::/56", "2001:db8:1:2:3:4:5:6"],
    ["2001:DB8:0:0:1::1", "2001:db8::/64", "2001:db8::/56", "2001:db8::1:0:0:1"],
    ["::ffff:198.51.100.4", "198.51.100.4", "198.51.100.4", "198.51.100.4"],
    ["::ffff:0:1", "0.0.0.1", "0.0.0.1", "0.0.0.1"],
    ["::1", "::/64", "::/56", "::1"],
    ["1::", "1::/64", "1::/56", "1::"],
    ["0:0:1::", "0:0:1::/64", "0:0:1::/56", "0:0:1::"],
    ["fe80::1%eth0", "fe80::/64", "fe80::/56", "fe80::1"],
    [
      "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff",
      "2001:db8:aaaa:bbbb::/64",
      "2001:db8:aaaa:bb00::/56",
      "2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff",
    ],
    ["::1.2.3.4", "::/64", "::/56", "::102:304"],
    ["1:0:0:2:0:0:0:3", "1:0:0:2::/64", "1::/56", "1:0:0:2::3"],
    ["1:2:3:4:5:6:7::", "1:2:3:4::/64", "1:2:3::/56", "1:2:3:4:5:6:7:0"],
    // Of two equal runs of zeros the first is "::"; a single zero is written out.
    ["1:0:0:2:0:0:3:4", "1:0:0:2::/64", "1::/56", "1::2:0:0:3:4"],
    ["2001:db8:1:0:3:4:5:6", "2001:db8:1::/64", "2001:db8:1::/56", "2001:db8:1:0:3:4:5:6"],
    ...["unknown", "testclient", "01.2.3.4", "1.2.3", "1:2:3:4:5:6:7:8:9", "::1:2:3:4:5:6:7:8"]
      .concat(["1::2::3", "fe80::1%", "12345::", ":1::", ""])
      .map((ip): [string, undefined, undefined, undefined] => [ip, undefined, undefined, undefined]),
  ];
  test.each(cases)("%j keys as the Python side keys it", (ip, at64, at56, at128) => {
    expect([clientKeyOf(ip), clientKeyOf(ip, 56), clientKeyOf(ip, 128)]).toEqual([at64, at56, at128]);
  });

  test("an ip that is a network already (no fingerprint middleware) is its own key", () => {
    expect(clientKeyOf("2001:db8:1:2::/64")).toBe("2001:db8:1:2::/64");
    expect(clientKeyOf("2001:db8:1:2::/64", 56)).toBe("2001:db8:1:2::/64");
    expect(clientKeyOf("2001:db8::/129")).toBeUndefined();
    expect(clientKeyOf("unknown/64")).toBeUndefined();
  });
});

describe("migrations:backfillBotClientKey", () => {
  test("old events get the key their ip has now; keyed and addressless ones are left", async () => {
    await seed(["203.0.113.7", "2001:db8:1:2:3:4:5:6", "::ffff:198.51.100.4", "unknown"]);
    await seed(["2001:db8:9:9::/64"]);
    const keyed = await t.run(async (ctx) =>
      ctx.db.insert("botDetectionEvents", { ...oldEvent("192.0.2.1", 9), clientKey: "kept-as-written" }),
    );
    expect((await status()).state).toBe("unknown"); // never started

    await migrate();

    expect(await keysByIp()).toEqual({
      "203.0.113.7": "203.0.113.7",
      "2001:db8:1:2:3:4:5:6": "2001:db8:1:2::/64",
      "::ffff:198.51.100.4": "198.51.100.4",
      unknown: undefined,
      "2001:db8:9:9::/64": "2001:db8:9:9::/64",
      "192.0.2.1": "kept-as-written",
    });
    // Nothing else of a row changes.
    const [first] = await events();
    expect(first).toMatchObject(oldEvent("203.0.113.7", 0));
    expect((await t.run(async (ctx) => ctx.db.get(keyed)))?.clientKey).toBe("kept-as-written");
    // The keyed event is not even read: the migration walks the events without a key.
    expect(await status()).toMatchObject({ state: "success", isDone: true, processed: 5 });
  });

  test("backfilled events count in the per-client escalation", async () => {
    const ip = "2001:db8:1:2:3:4:5:6";
    await seed(Array(10).fill(ip));
    const { timestamp: _, metadata: __, ...flagged } = oldEvent(ip, 0);
    const check = (fingerprint: string) =>
      t.mutation(internal.guard.check, {
        limits: [],
        bot: { ...flagged, fingerprint, clientKey: "2001:db8:1:2::/64" },
      });
    // Before: ten events of this client in the last hour, and none of them counts.
    expect((await check("fp-rotated-1")).bot).toEqual({ action: "allowed", previousEvents: 0 });

    await migrate();

    // After: they do (with the one the check above wrote): the 12th event is blocked.
    expect((await check("fp-rotated-2")).bot).toEqual({ action: "blocked", previousEvents: 11 });
  });

  test("uses the deployment's CONVEX_GUARD_IPV6_PREFIX", async () => {
    vi.stubEnv("CONVEX_GUARD_IPV6_PREFIX", "56");
    await seed(["2001:db8:1:2:3:4:5:6"]);
    await migrate();
    expect(await keysByIp()).toEqual({ "2001:db8:1:2:3:4:5:6": "2001:db8:1::/56" });
  });

  test("a failed batch leaves its rows; the next run resumes at the component's cursor", async () => {
    await seed(["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"]);
    // The first batch of two runs in the runner's own mutation; the rest are scheduled.
    const started = await t.mutation(internal.migrations.run, { batchSize: 2 });
    expect(started).toMatchObject({ Name: NAME, processed: 2 });
    vi.stubEnv("CONVEX_GUARD_IPV6_PREFIX", "sixty-four");
    await t.finishAllScheduledFunctions(vi.runAllTimers);

    const failed = await status();
    expect(failed).toMatchObject({ state: "failed", isDone: false, processed: 2 });
    expect(failed.error).toContain("CONVEX_GUARD_IPV6_PREFIX must be the app's ipv6_prefix");
    expect(Object.values(await keysByIp()).filter((k) => k !== undefined)).toHaveLength(2);

    vi.unstubAllEnvs();
    await migrate();
    // Resumed, not restarted: five rows processed in all, each once.
    expect(await status()).toMatchObject({ state: "success", isDone: true, processed: 5 });
    expect(Object.values(await keysByIp())).toEqual([
      "192.0.2.1",
      "192.0.2.2",
      "192.0.2.3",
      "192.0.2.4",
      "192.0.2.5",
    ]);
  });

  test("a finished migration is not run again; a reset one changes nothing more", async () => {
    await seed(["198.51.100.7", "2001:db8::1"]);
    await migrate();
    const after = await events();
    const done = await status();

    // Rows written since (in the old shape, as an old instance still running would) are
    // not revisited by the done migration: the runner answers at once.
    await seed(["203.0.113.99"]);
    vi.advanceTimersByTime(MINUTE);
    expect(await migrate()).toMatchObject({ Status: "Migration already done.", processed: 2 });
    expect(await status()).toEqual(done);
    expect((await keysByIp())["203.0.113.99"]).toBeUndefined();

    // A reset walks the events without a key again: the keyed rows stay as they were.
    await migrate({ reset: true });
    expect(await status()).toMatchObject({ state: "success", processed: 1 });
    const again = await events();
    expect(again.slice(0, 2)).toEqual(after);
    expect(again[2].clientKey).toBe("203.0.113.99");
  });

  test("a dry run shows a batch and commits nothing", async () => {
    await seed(["198.51.100.7"]);
    const dry = await migrate({ dryRun: true });
    expect(dry).toMatchObject({ Name: NAME, DryRun: "No changes were committed." });
    expect(await keysByIp()).toEqual({ "198.51.100.7": undefined });
    expect((await status()).state).toBe("unknown");
  });
});
