// API keys of both kinds ("ai" → apiKeys, "embedding" → embeddingApiKeys) as one record
// shape. Only the SHA-256 hash of a key is ever stored. Every change (create, update) inserts
// its audit entry (lib/audit.ts) in the same mutation: both commit, or neither.
import { v } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { internalMutation, internalQuery, type QueryCtx } from "./_generated/server";
import { auditArgs, checkActor, recordAudit, vAuditAction, vAuditEntry } from "./lib/audit";
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

/**
 * The most audit entries one auditLog page returns (ConvexStore's AUDIT_PAGE): a page stays
 * under a query's 16 MiB read while entries average below 80 KB (a key's scopes, twice).
 */
export const AUDIT_PAGE_CAP = 200;

/**
 * Store a new key and its `key.created` entry (by `actor`, default "unknown"; `related`: the
 * key it replaces, on a rotation); the returned record's `id` is the document id.
 */
export const create = internalMutation({
  args: { ...newApiKeyFields, ...auditArgs },
  returns: vApiKeyRecord,
  handler: async (ctx, { actor: givenActor, related, ...args }): Promise<ApiKeyRecord> => {
    const actor = checkActor(givenActor); // before any write: a refusal leaves nothing
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
    const record = toRecord(found, { requests: 0, lastUsed: undefined, truncated: false });
    await recordAudit(ctx, { action: "key.created", actor, before: null, after: record, related });
    return record;
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

/**
 * Change `active` and/or `expiresAt` (absent = unchanged) and record the entry (`action`,
 * default "key.updated"; its changes empty when nothing differed); null, and no entry, when
 * the id is unknown.
 */
export const update = internalMutation({
  args: {
    id: v.string(),
    active: v.optional(v.boolean()),
    expiresAt: v.optional(v.number()),
    action: v.optional(vAuditAction),
    ...auditArgs,
  },
  returns: v.union(vApiKeyRecord, v.null()),
  handler: async (ctx, { id, active, expiresAt, action = "key.updated", actor, related }) => {
    const who = checkActor(actor);
    if (action === "key.created") throw new Error("key.created is not an action of an update");
    const found = await findKeyById(ctx, id);
    if (found === null) return null;
    // Usage is not audited: the state before needs no usage rows read.
    const before = toRecord(found, { requests: 0, lastUsed: undefined, truncated: false });
    const patch = {
      ...(active === undefined ? {} : { active }),
      ...(expiresAt === undefined ? {} : { expiresAt }),
    };
    await ctx.db.patch(found.doc._id, patch);
    const again = await findKeyById(ctx, id);
    if (again === null) return null;
    const after = await readRecord(ctx, again);
    await recordAudit(ctx, { action, actor: who, before, after, related });
    return after;
  },
});

/**
 * Audit entries at or after `since`, of one `record` (key id) when given, newest first: one
 * page of at most AUDIT_PAGE_CAP (ConvexStore pages through with `continueCursor`).
 */
export const auditLog = internalQuery({
  args: {
    since: v.optional(v.number()),
    record: v.optional(v.string()),
    numItems: v.optional(v.number()),
    cursor: v.optional(v.union(v.string(), v.null())),
  },
  returns: v.object({
    page: v.array(vAuditEntry),
    isDone: v.boolean(),
    continueCursor: v.string(),
  }),
  handler: async (ctx, { since = 0, record, numItems, cursor = null }) => {
    const n = Math.max(1, Math.min(Math.floor(numItems ?? 100), AUDIT_PAGE_CAP));
    const rows =
      record === undefined
        ? ctx.db.query("auditLog").withIndex("by_timestamp", (q) => q.gte("timestamp", since))
        : ctx.db
            .query("auditLog")
            .withIndex("by_record", (q) => q.eq("record", record).gte("timestamp", since));
    const result = await rows.order("desc").paginate({ numItems: n, cursor });
    return {
      page: result.page.map(({ _id, _creationTime, ...entry }) => ({ id: _id, ...entry })),
      isDone: result.isDone,
      continueCursor: result.continueCursor,
    };
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
