import { beforeEach, describe, expect, test } from "vitest";
import { internal } from "../convex/_generated/api";
import { newDeployment, type Deployment } from "./setup";

let t: Deployment;
beforeEach(() => {
  t = newDeployment();
});

const aiKey = {
  kind: "ai" as const,
  keyHash: "a".repeat(64),
  prefix: "cg_live_ab",
  name: "backend",
  owner: "user-1",
  scopes: ["chat", "embed"],
  rateLimit: { requests: 100, period: 60_000 },
  createdAt: 1_000,
  expiresAt: 9_000,
};
const embeddingKey = {
  kind: "embedding" as const,
  keyHash: "b".repeat(64),
  prefix: "emb_cd",
  name: "indexer",
  scopes: [],
  rateLimit: { requests: 10, period: 30_000 },
  createdAt: 2_000,
};

describe("apiKeys", () => {
  test("create returns the record; getByHash finds it in either table", async () => {
    const ai = await t.mutation(internal.apiKeys.create, aiKey);
    expect(ai).toEqual({
      id: ai.id,
      kind: "ai",
      keyHash: aiKey.keyHash,
      prefix: "cg_live_ab",
      name: "backend",
      owner: "user-1",
      scopes: ["chat", "embed"],
      rateLimit: { requests: 100, period: 60_000 },
      createdAt: 1_000,
      expiresAt: 9_000,
      requestCount: 0,
      active: true,
    });
    const emb = await t.mutation(internal.apiKeys.create, embeddingKey);
    expect(emb).toMatchObject({ kind: "embedding", rateLimit: { requests: 10, period: 30_000 } });
    expect(emb).not.toHaveProperty("owner");
    // The embeddings table keeps the seed's { requests, windowSeconds }.
    const stored = await t.run(async (ctx) => ctx.db.query("embeddingApiKeys").first());
    expect(stored?.rateLimit).toEqual({ requests: 10, windowSeconds: 30 });

    expect(await t.query(internal.apiKeys.getByHash, { keyHash: aiKey.keyHash })).toEqual(ai);
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: embeddingKey.keyHash })).toEqual(emb);
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: "c".repeat(64) })).toBeNull();
  });

  test("list filters by kind and owner", async () => {
    await t.mutation(internal.apiKeys.create, aiKey);
    await t.mutation(internal.apiKeys.create, { ...aiKey, keyHash: "d", owner: "user-2" });
    await t.mutation(internal.apiKeys.create, { ...embeddingKey, owner: "user-1" });
    expect((await t.query(internal.apiKeys.list, {})).keys.length).toBe(3);
    expect((await t.query(internal.apiKeys.list, { kind: "ai" })).keys.length).toBe(2);
    expect((await t.query(internal.apiKeys.list, { kind: "embedding" })).keys.length).toBe(1);
    const mine = await t.query(internal.apiKeys.list, { owner: "user-1" });
    expect(mine.keys.map((r) => r.kind).sort()).toEqual(["ai", "embedding"]);
    expect(mine.truncated).toBe(false);
    expect(await t.query(internal.apiKeys.list, { kind: "ai", owner: "nobody" })).toEqual({
      keys: [],
      truncated: false,
    });
  });

  test("update changes active and expiresAt; unknown ids give null", async () => {
    const ai = await t.mutation(internal.apiKeys.create, aiKey);
    const emb = await t.mutation(internal.apiKeys.create, embeddingKey);
    expect(await t.mutation(internal.apiKeys.update, { id: ai.id, active: false })).toMatchObject({
      active: false,
      expiresAt: 9_000,
    });
    expect(await t.mutation(internal.apiKeys.update, { id: emb.id, expiresAt: 5_000 })).toMatchObject({
      active: true,
      expiresAt: 5_000,
    });
    expect(await t.mutation(internal.apiKeys.update, { id: "not-an-id", active: false })).toBeNull();
    // A well-formed id of a deleted key.
    await t.run(async (ctx) => {
      await ctx.db.delete(ai.id as never);
    });
    expect(await t.mutation(internal.apiKeys.update, { id: ai.id, active: true })).toBeNull();
  });

  test("recordUsage adds requests and keeps the latest lastUsed", async () => {
    const ai = await t.mutation(internal.apiKeys.create, aiKey);
    const emb = await t.mutation(internal.apiKeys.create, embeddingKey);
    expect(
      await t.mutation(internal.apiKeys.recordUsage, {
        usage: [
          { keyId: ai.id, lastUsed: 5_000, requests: 3 },
          { keyId: emb.id, lastUsed: 6_000, requests: 1 },
          { keyId: "bogus", lastUsed: 1, requests: 1 },
        ],
      }),
    ).toBe(2);
    await t.mutation(internal.apiKeys.recordUsage, { usage: [{ keyId: ai.id, lastUsed: 4_000, requests: 2 }] });
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: aiKey.keyHash })).toMatchObject({
      requestCount: 5,
      lastUsed: 5_000,
    });
    expect(await t.query(internal.apiKeys.getByHash, { keyHash: embeddingKey.keyHash })).toMatchObject({
      requestCount: 1,
      lastUsed: 6_000,
    });
  });
});
