// API key documents of both tables, as one record shape.
import type { GenericDatabaseReader, GenericDatabaseWriter } from "convex/server";
import type { DataModel, Doc } from "../_generated/dataModel";
import type { ApiKeyRecord } from "./validators";

const SECOND = 1000;
const MINUTE = 60 * SECOND;
const HOUR = 60 * MINUTE;
/**
 * Usage rows read per key, at most. A key has one row per writer that used it since its last
 * fold (retention folds rows idle for FOLD_IDLE_MS), so this is far above what is met.
 */
export const KEY_USAGE_ROWS_CAP = 512;
/** A writer's usage row is folded into its key document once idle for this long. */
export const FOLD_IDLE_MS = 60 * 60 * 1000;

type Reader = { db: GenericDatabaseReader<DataModel> };
type Writer = { db: GenericDatabaseWriter<DataModel> };

/** Usage not yet in the key document: the sum over writers' rows. */
export type PendingUsage = { requests: number; lastUsed: number | undefined; truncated: boolean };

export type FoundKey =
  | { kind: "ai"; doc: Doc<"apiKeys"> }
  | { kind: "embedding"; doc: Doc<"embeddingApiKeys"> };

/** The writers' usage rows of a key, added up (bounded: see KEY_USAGE_ROWS_CAP). */
export async function pendingUsage(ctx: Reader, keyId: string): Promise<PendingUsage> {
  const rows = await ctx.db
    .query("apiKeyUsage")
    .withIndex("by_key_writer", (q) => q.eq("keyId", keyId))
    .take(KEY_USAGE_ROWS_CAP + 1);
  const usage: PendingUsage = {
    requests: 0,
    lastUsed: undefined,
    truncated: rows.length > KEY_USAGE_ROWS_CAP,
  };
  for (const row of rows.slice(0, KEY_USAGE_ROWS_CAP)) {
    usage.requests += row.requests;
    usage.lastUsed = Math.max(usage.lastUsed ?? row.lastUsed, row.lastUsed);
  }
  return usage;
}

/** Add `requests` (latest use `lastUsed`) to `writer`'s usage row of the key. */
export async function addKeyUsage(
  ctx: Writer,
  keyId: string,
  writer: string | undefined,
  requests: number,
  lastUsed: number,
  now: number,
): Promise<void> {
  const name = writer ?? "";
  const row = await ctx.db
    .query("apiKeyUsage")
    .withIndex("by_key_writer", (q) => q.eq("keyId", keyId).eq("writer", name))
    .unique();
  if (row === null) {
    await ctx.db.insert("apiKeyUsage", { keyId, writer: name, requests, lastUsed, updatedAt: now });
  } else {
    await ctx.db.patch(row._id, {
      requests: row.requests + requests,
      lastUsed: Math.max(row.lastUsed, lastUsed),
      updatedAt: now,
    });
  }
}

/**
 * Add `requests` to `writer`'s rollups of the key for the minute and the hour of `lastUsed`
 * (a flush's usage is a few seconds of use, counted at its latest): what the dashboard ranks
 * keys by within a window. Only `writer`'s own rows, as for the provider rollups.
 */
export async function addKeyRollups(
  ctx: Writer,
  keyId: string,
  writer: string | undefined,
  requests: number,
  lastUsed: number,
): Promise<void> {
  const mine = writer === undefined ? {} : { writer };
  const minute = Math.floor(lastUsed / MINUTE) * MINUTE;
  const byMinute = await ctx.db
    .query("keyRollups")
    .withIndex("by_key_minute", (q) =>
      q.eq("keyId", keyId).eq("minute", minute).eq("writer", writer),
    )
    .unique();
  if (byMinute === null) {
    await ctx.db.insert("keyRollups", { keyId, minute, ...mine, requests, lastUsed });
  } else {
    await ctx.db.patch(byMinute._id, {
      requests: byMinute.requests + requests,
      lastUsed: Math.max(byMinute.lastUsed, lastUsed),
    });
  }
  const hour = Math.floor(lastUsed / HOUR) * HOUR;
  const byHour = await ctx.db
    .query("keyHourlyRollups")
    .withIndex("by_key_hour", (q) => q.eq("keyId", keyId).eq("hour", hour).eq("writer", writer))
    .unique();
  if (byHour === null) {
    await ctx.db.insert("keyHourlyRollups", { keyId, hour, ...mine, requests, lastUsed });
  } else {
    await ctx.db.patch(byHour._id, {
      requests: byHour.requests + requests,
      lastUsed: Math.max(byHour.lastUsed, lastUsed),
    });
  }
}

/**
 * Fold up to `n` usage rows last written before `before` into their key documents (rows of a
 * deleted key are dropped); returns how many rows went. Run from retention, once an hour: the
 * only regular writer of key documents besides `apiKeys:update`.
 */
export async function foldIdleUsage(ctx: Writer, before: number, n: number): Promise<number> {
  const rows = await ctx.db
    .query("apiKeyUsage")
    .withIndex("by_updated", (q) => q.lt("updatedAt", before))
    .take(n);
  for (const row of rows) {
    const found = await findKeyById(ctx, row.keyId);
    if (found !== null) {
      const { doc } = found;
      const fields = {
        requestCount: doc.requestCount + row.requests,
        lastUsed: Math.max(doc.lastUsed ?? row.lastUsed, row.lastUsed),
      };
      if (found.kind === "ai") await ctx.db.patch(found.doc._id, fields);
      else await ctx.db.patch(found.doc._id, fields);
    }
    await ctx.db.delete(row._id);
  }
  return rows.length;
}

/** The key's record, its use counted from the key document and the writers' usage rows. */
export async function readRecord(ctx: Reader, found: FoundKey): Promise<ApiKeyRecord> {
  return toRecord(found, await pendingUsage(ctx, found.doc._id));
}

export function toRecord(found: FoundKey, pending: PendingUsage): ApiKeyRecord {
  const d = found.doc;
  const record: ApiKeyRecord = {
    id: d._id,
    kind: found.kind,
    keyHash: found.kind === "ai" ? found.doc.key : found.doc.keyHash,
    prefix: d.prefix,
    name: d.name,
    scopes: d.scopes,
    createdAt: d.createdAt,
    requestCount: d.requestCount + pending.requests,
    active: d.active,
  };
  if (d.userId !== undefined) record.owner = d.userId;
  if (d.expiresAt !== undefined) record.expiresAt = d.expiresAt;
  if (d.quotas !== undefined && d.quotas.length > 0) record.quotas = d.quotas;
  const lastUsed =
    pending.lastUsed === undefined ? d.lastUsed : Math.max(d.lastUsed ?? 0, pending.lastUsed);
  if (lastUsed !== undefined) record.lastUsed = lastUsed;
  if (found.kind === "ai") {
    if (found.doc.rateLimit !== undefined) record.rateLimit = found.doc.rateLimit;
  } else if (found.doc.rateLimit !== undefined) {
    record.rateLimit = {
      requests: found.doc.rateLimit.requests,
      period: found.doc.rateLimit.windowSeconds * SECOND,
    };
  }
  return record;
}

export async function findKeyById(
  ctx: Reader,
  id: string,
): Promise<FoundKey | null> {
  const aiId = ctx.db.normalizeId("apiKeys", id);
  if (aiId !== null) {
    const doc = await ctx.db.get(aiId);
    return doc === null ? null : { kind: "ai", doc };
  }
  const embeddingId = ctx.db.normalizeId("embeddingApiKeys", id);
  if (embeddingId !== null) {
    const doc = await ctx.db.get(embeddingId);
    return doc === null ? null : { kind: "embedding", doc };
  }
  return null;
}

export async function findKeyByHash(
  ctx: Reader,
  keyHash: string,
): Promise<FoundKey | null> {
  const ai = await ctx.db
    .query("apiKeys")
    .withIndex("by_key", (q) => q.eq("key", keyHash))
    .first();
  if (ai !== null) return { kind: "ai", doc: ai };
  const embedding = await ctx.db
    .query("embeddingApiKeys")
    .withIndex("by_key_hash", (q) => q.eq("keyHash", keyHash))
    .first();
  return embedding === null ? null : { kind: "embedding", doc: embedding };
}
