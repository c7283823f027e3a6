// API key documents of both tables, as one record shape.
import type { GenericDatabaseReader } from "convex/server";
import type { DataModel, Doc } from "../_generated/dataModel";
import type { ApiKeyRecord } from "./validators";

const SECOND = 1000;

export type FoundKey =
  | { kind: "ai"; doc: Doc<"apiKeys"> }
  | { kind: "embedding"; doc: Doc<"embeddingApiKeys"> };

export function toRecord(found: FoundKey): ApiKeyRecord {
  const d = found.doc;
  const record: ApiKeyRecord = {
    id: d._id,
    kind: found.kind,
    keyHash: found.kind === "ai" ? found.doc.key : found.doc.keyHash,
    prefix: d.prefix,
    name: d.name,
    scopes: d.scopes,
    createdAt: d.createdAt,
    requestCount: d.requestCount,
    active: d.active,
  };
  if (d.userId !== undefined) record.owner = d.userId;
  if (d.expiresAt !== undefined) record.expiresAt = d.expiresAt;
  if (d.lastUsed !== undefined) record.lastUsed = d.lastUsed;
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
  ctx: { db: GenericDatabaseReader<DataModel> },
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
  ctx: { db: GenericDatabaseReader<DataModel> },
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
