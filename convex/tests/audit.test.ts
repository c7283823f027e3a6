import { convexTest } from "convex-test";
import { afterEach, beforeEach, describe, expect, test, vi } from "vitest";
import { internal } from "../convex/_generated/api";
import schema from "../convex/schema";
import { modules, newDeployment, T0, type Deployment } from "./setup";

const DAY = 86_400_000;

let t: Deployment;
beforeEach(() => {
  vi.useFakeTimers();
  vi.setSystemTime(T0);
  t = newDeployment();
});
afterEach(() => {
  vi.useRealTimers();
  vi.unstubAllEnvs();
});

const aiKey = {
  kind: "ai" as const,
  keyHash: "a".repeat(64),
  prefix: "cg_ai_AbCd",
  name: "backend",
  owner: "user-1",
  scopes: ["chat"],
  rateLimit: { requests: 100, period: 60_000 },
  createdAt: 1_000,
  expiresAt: 9_000,
};

async function rows() {
  return t.run(async (ctx) => ({
    keys: (await ctx.db.query("apiKeys").collect()).length,
    entries: await ctx.db.query("auditLog").collect(),
  }));
}

describe("audit trail", () => {
  test("create records one key.created entry: the set fields, by id, never hash or prefix", async () => {
    const key = await t.mutation(internal.apiKeys.create, { ...aiKey, actor: " ann@host " });
    const { entries } = await rows();
    expect(entries).toHaveLength(1);
    const [entry] = entries;
    expect(entry).toMatchObject({
      timestamp: T0,
      action: "key.created",
      record: key.id,
      actor: "ann@host",
      changes: [
        { field: "kind", before: null, after: "ai" },
        { field: "name", before: null, after: "backend" },
        { field: "owner", before: null, after: "user-1" },
        { field: "scopes", before: null, after: ["chat"] },
        { field: "rateLimit", before: null, after: { requests: 100, period: 60_000 } },
        { field: "expiresAt", before: null, after: 9_000 },
        { field: "active", before: null, after: true },
      ],
    });
    expect(entry).not.toHaveProperty("related");
    const text = JSON.stringify(entry);
    expect(text).not.toContain(aiKey.keyHash);
    expect(text).not.toContain(aiKey.prefix);
    // No actor: "unknown".
    await t.mutation(internal.apiKeys.create, { ...aiKey, keyHash: "b".repeat(64) });
    expect((await rows()).entries[1].actor).toBe("unknown");
  });

  test("update records one entry with what changed; a missing key none", async () => {
    const key = await t.mutation(internal.apiKeys.create, aiKey);
    vi.setSystemTime(T0 + 5);
    await t.mutation(internal.apiKeys.update, {
      id: key.id,
      active: false,
      action: "key.revoked",
      actor: "ops",
    });
    // Setting what is already there still records the call, with no changes.
    await t.mutation(internal.apiKeys.update, { id: key.id, active: false });
    expect(await t.mutation(internal.apiKeys.update, { id: "no-such-id", active: false })).toBeNull();
    await t.run(async (ctx) => {
      await ctx.db.delete(key.id as never);
    });
    expect(await t.mutation(internal.apiKeys.update, { id: key.id, active: true })).toBeNull();
    const { entries } = await rows();
    expect(entries.map((e) => [e.action, e.actor, e.changes])).toEqual([
      ["key.created", "unknown", expect.any(Array)],
      ["key.revoked", "ops", [{ field: "active", before: true, after: false }]],
      ["key.updated", "unknown", []],
    ]);
    expect(entries[1].timestamp).toBe(T0 + 5);
  });

  test("a refused actor or action writes nothing", async () => {
    for (const actor of ["", "   ", "x".repeat(201), "a\nb", `me cg_ai_${"Z".repeat(43)}`]) {
      await expect(t.mutation(internal.apiKeys.create, { ...aiKey, actor })).rejects.toThrow(/actor/);
    }
    const key = await t.mutation(internal.apiKeys.create, aiKey);
    await expect(
      t.mutation(internal.apiKeys.update, { id: key.id, active: false, action: "key.created" }),
    ).rejects.toThrow(/not an action/);
    await expect(t.mutation(internal.apiKeys.update, { id: key.id, active: false, actor: "" })).rejects.toThrow();
    const { keys, entries } = await rows();
    expect(keys).toBe(1);
    expect(entries).toHaveLength(1);
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: aiKey.keyHash })).toMatchObject({ active: true });
  });

  test("a mutation that throws after its change's write rolls the change back: neither lands", async () => {
    // One write per transaction: the key's insert (or patch) passes, the entry's insert throws.
    const tight = convexTest({ schema, modules, transactionLimits: { documentsWritten: 1 } });
    await expect(tight.mutation(internal.apiKeys.create, aiKey)).rejects.toThrow(/Wrote too many documents/);
    expect(await tight.run(async (ctx) => (await ctx.db.query("apiKeys").collect()).length)).toBe(0);
    expect(await tight.run(async (ctx) => (await ctx.db.query("auditLog").collect()).length)).toBe(0);

    // A key made elsewhere (t.run is not limited), then an update that cannot record.
    const id = await tight.run(async (ctx) =>
      ctx.db.insert("apiKeys", {
        key: "c".repeat(64),
        prefix: "p",
        name: "n",
        scopes: [],
        createdAt: 0,
        requestCount: 0,
        active: true,
      }),
    );
    await expect(tight.mutation(internal.apiKeys.update, { id, active: false })).rejects.toThrow(
      /Wrote too many documents/,
    );
    expect(await tight.run(async (ctx) => (await ctx.db.get(id))?.active)).toBe(true);
    expect(await tight.run(async (ctx) => (await ctx.db.query("auditLog").collect()).length)).toBe(0);
  });

  test("auditLog reads newest first, by time and by record, in pages", async () => {
    const a = await t.mutation(internal.apiKeys.create, aiKey);
    vi.setSystemTime(T0 + 10);
    const b = await t.mutation(internal.apiKeys.create, { ...aiKey, keyHash: "b".repeat(64), kind: "embedding" });
    vi.setSystemTime(T0 + 20);
    await t.mutation(internal.apiKeys.update, { id: a.id, expiresAt: 5_000, action: "key.rotated", related: b.id });
    const all = await t.query(internal.apiKeys.auditLog, {});
    expect(all.isDone).toBe(true);
    expect(all.page.map((e) => [e.action, e.record])).toEqual([
      ["key.rotated", a.id],
      ["key.created", b.id],
      ["key.created", a.id],
    ]);
    expect(all.page[0]).toMatchObject({
      related: b.id,
      changes: [{ field: "expiresAt", before: 9_000, after: 5_000 }],
    });
    expect(typeof all.page[0].id).toBe("string");
    const ofA = await t.query(internal.apiKeys.auditLog, { record: a.id });
    expect(ofA.page.map((e) => e.action)).toEqual(["key.rotated", "key.created"]);
    const recent = await t.query(internal.apiKeys.auditLog, { since: T0 + 10 });
    expect(recent.page).toHaveLength(2);
    expect((await t.query(internal.apiKeys.auditLog, { record: a.id, since: T0 + 1 })).page).toHaveLength(1);
    // An embedding key's rate limit reads back in ms, as the record has it.
    expect(all.page[1].changes).toContainEqual({
      field: "rateLimit",
      before: null,
      after: { requests: 100, period: 60_000 },
    });

    const first = await t.query(internal.apiKeys.auditLog, { numItems: 2 });
    expect(first.page).toHaveLength(2);
    expect(first.isDone).toBe(false);
    const second = await t.query(internal.apiKeys.auditLog, { numItems: 2, cursor: first.continueCursor });
    expect([...first.page, ...second.page].map((e) => e.id)).toEqual(all.page.map((e) => e.id));
  });

  test("retention keeps the trail unless CONVEX_GUARD_AUDIT_RETENTION_DAYS is set", async () => {
    await t.mutation(internal.apiKeys.create, aiKey);
    vi.setSystemTime(T0 + 400 * DAY);
    await t.mutation(internal.apiKeys.create, { ...aiKey, keyHash: "b".repeat(64) });
    await t.mutation(internal.retention.purge, {});
    expect((await rows()).entries).toHaveLength(2);
    vi.stubEnv("CONVEX_GUARD_AUDIT_RETENTION_DAYS", "365");
    expect(await t.mutation(internal.retention.purge, {})).toEqual({ deleted: 1, more: false });
    expect((await rows()).entries.map((e) => e.timestamp)).toEqual([T0 + 400 * DAY]);
    vi.stubEnv("CONVEX_GUARD_AUDIT_RETENTION_DAYS", "forever");
    await expect(t.mutation(internal.retention.purge, {})).rejects.toThrow(/AUDIT_RETENTION_DAYS/);
  });
});
