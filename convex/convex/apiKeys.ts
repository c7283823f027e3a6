// API keys of both kinds ("ai" → apiKeys, "embedding" → embeddingApiKeys) as one record
// shape. Only the SHA-256 hash of a key is ever stored.
import { v } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { internalMutation, internalQuery, type QueryCtx } from "./_generated/server";
import {
  findKeyByHash,
  findKeyById,
  pendingUsage,
  readRecord,
  toRecord,
  type FoundKey,
} from "./lib/keys";
import { applyKeyUsage } from "./lib/logs";
import {
  newApiKeyFields,
  vApiKeyRecord,
  vKeyUsage,
  vKind,
  type ApiKeyRecord,
} from "./lib/validators";

/** The most records `list` returns per table. */
export const LIST_CAP = 1000;

/** A key table's documents, all or one owner's: one more than LIST_CAP, to see a cut. */
function keysOf(ctx: QueryCtx, table: "apiKeys", owner?: string): Promise<Doc<"apiKeys">[]>;
function keysOf(
  ctx: QueryCtx,
  table: "embeddingApiKeys",
  owner?: string,
): Promise<Doc<"embeddingApiKeys">[]>;
async function keysOf(ctx: QueryCtx, table: "apiKeys" | "embeddingApiKeys", owner?: string) {
  const all = ctx.db.query(table);
  if (owner === undefined) return all.take(LIST_CAP + 1);
  return all.withIndex("by_user", (q) => q.eq("userId", owner)).take(LIST_CAP + 1);
}

/** Store a new key; the returned record's `id` is the document id. */
export const create = internalMutation({
  args: newApiKeyFields,
  returns: vApiKeyRecord,
  handler: async (ctx, args): Promise<ApiKeyRecord> => {
    const common = {
      prefix: args.prefix,
      name: args.name,
      scopes: args.scopes,
      createdAt: args.createdAt,
      requestCount: 0,
      active: true,
      ...(args.owner === undefined ? {} : { userId: args.owner }),
      ...(args.expiresAt === undefined ? {} : { expiresAt: args.expiresAt }),
      ...(args.quotas === undefined || args.quotas.length === 0 ? {} : { quotas: args.quotas }),
    };
    let found: FoundKey | null;
    if (args.kind === "ai") {
      const id = await ctx.db.insert("apiKeys", {
        ...common,
        key: args.keyHash,
        ...(args.rateLimit === undefined ? {} : { rateLimit: args.rateLimit }),
      });
      const doc = await ctx.db.get(id);
      found = doc === null ? null : { kind: "ai", doc };
    } else {
      const id = await ctx.db.insert("embeddingApiKeys", {
        ...common,
        keyHash: args.keyHash,
        ...(args.rateLimit === undefined
          ? {}
          : {
              rateLimit: {
                requests: args.rateLimit.requests,
                windowSeconds: args.rateLimit.period / 1000,
              },
            }),
      });
      const doc = await ctx.db.get(id);
      found = doc === null ? null : { kind: "embedding", doc };
    }
    if (found === null) throw new Error("inserted key vanished");
    return toRecord(found, { requests: 0, lastUsed: undefined, truncated: false });
  },
});

/** The key with this hash, from either table, or null. */
export const getByHash = internalQuery({
  args: { keyHash: v.string() },
  returns: v.union(vApiKeyRecord, v.null()),
  handler: async (ctx, { keyHash }) => {
    const found = await findKeyByHash(ctx, keyHash);
    return found === null ? null : readRecord(ctx, found);
  },
});

/**
 * Keys of one kind or both, optionally of one owner; at most LIST_CAP per table.
 * `truncated` says a table had more (or a key more usage rows than are read).
 */
export const list = internalQuery({
  args: { kind: v.optional(vKind), owner: v.optional(v.string()) },
  returns: v.object({ keys: v.array(vApiKeyRecord), truncated: v.boolean() }),
  handler: async (ctx, { kind, owner }) => {
    const found: FoundKey[] = [];
    let truncated = false;
    const capped = <D>(docs: D[]): D[] => {
      truncated ||= docs.length > LIST_CAP;
      return docs.slice(0, LIST_CAP);
    };
    if (kind === undefined || kind === "ai") {
      const docs = capped(await keysOf(ctx, "apiKeys", owner));
      for (const doc of docs) found.push({ kind: "ai", doc });
    }
    if (kind === undefined || kind === "embedding") {
      const docs = capped(await keysOf(ctx, "embeddingApiKeys", owner));
      for (const doc of docs) found.push({ kind: "embedding", doc });
    }
    const keys: ApiKeyRecord[] = [];
    for (const key of found) {
      const pending = await pendingUsage(ctx, key.doc._id);
      truncated ||= pending.truncated;
      keys.push(toRecord(key, pending));
    }
    return { keys, truncated };
  },
});

/** Change `active` and/or `expiresAt` (absent = unchanged); null when the id is unknown. */
export const update = internalMutation({
  args: { id: v.string(), active: v.optional(v.boolean()), expiresAt: v.optional(v.number()) },
  returns: v.union(vApiKeyRecord, v.null()),
  handler: async (ctx, { id, active, expiresAt }) => {
    const found = await findKeyById(ctx, id);
    if (found === null) return null;
    const patch = {
      ...(active === undefined ? {} : { active }),
      ...(expiresAt === undefined ? {} : { expiresAt }),
    };
    await ctx.db.patch(found.doc._id, patch);
    const again = await findKeyById(ctx, id);
    return again === null ? null : readRecord(ctx, again);
  },
});

/**
 * Add batched usage (`requests` since the last flush, `lastUsed` the latest use) to keys, in
 * `writer`'s own usage rows (see logs:writeBatch). Unknown ids are skipped; returns how many
 * keys were updated.
 */
export const recordUsage = internalMutation({
  args: { usage: v.array(vKeyUsage), writer: v.optional(v.string()) },
  returns: v.number(),
  handler: async (ctx, { usage, writer }) => applyKeyUsage(ctx, usage, writer),
});
