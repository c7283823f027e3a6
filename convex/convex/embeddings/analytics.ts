// The seed's embeddings usage tracking, with bounded reads.
import { v } from "convex/values";
import { internalMutation, internalQuery } from "../_generated/server";
import { addKeyUsage } from "../lib/keys";
import { insertAuthFailures, insertEmbeddingRequests } from "../lib/logs";

/** Rows getUsage reads at most (a read stays inside one query's limits). */
export const USAGE_READ_CAP = 10_000;
/** Counting auth failures stops here. */
export const FAILURE_COUNT_CAP = 1000;
/** The seed's threshold for flagging a key under attack: more than this in an hour. */
export const ATTACK_THRESHOLD = 10;

/**
 * Log one embeddings request (the seed's function) and count it in the key's use
 * (`lastUsed`, `requestCount`). `timestamp` defaults to now and `model` to "self-hosted", as
 * in the seed. The use goes to `writer`'s usage row of the key, not to the key document that
 * every limit check of the key reads; callers that log concurrently should each pass their
 * own `writer` (as logs:writeBatch's), or they share one row per key.
 */
export const logRequest = internalMutation({
  args: {
    requestId: v.string(),
    apiKeyHash: v.string(),
    timestamp: v.optional(v.number()),
    batchSize: v.number(),
    latencyMs: v.number(),
    tokensUsed: v.number(),
    success: v.boolean(),
    error: v.optional(v.string()),
    model: v.optional(v.string()),
    writer: v.optional(v.string()),
  },
  returns: v.null(),
  handler: async (ctx, { writer, ...args }) => {
    const timestamp = args.timestamp ?? Date.now();
    await insertEmbeddingRequests(ctx, [
      { ...args, timestamp, model: args.model ?? "self-hosted" },
    ]);
    const key = await ctx.db
      .query("embeddingApiKeys")
      .withIndex("by_key_hash", (q) => q.eq("keyHash", args.apiKeyHash))
      .first();
    if (key !== null) await addKeyUsage(ctx, key._id, writer, 1, timestamp, Date.now());
    return null;
  },
});

/**
 * Record a failed authentication (the seed's function). Returns whether the key hash has had
 * more than ATTACK_THRESHOLD failures in the last hour (the seed only logged a warning).
 */
export const logAuthFailure = internalMutation({
  args: {
    keyHash: v.string(),
    timestamp: v.optional(v.number()),
    ip: v.optional(v.string()),
    userAgent: v.optional(v.string()),
  },
  returns: v.object({ flagged: v.boolean() }),
  handler: async (ctx, args) => {
    const timestamp = args.timestamp ?? Date.now();
    await insertAuthFailures(ctx, [{ ...args, timestamp }]);
    const recent = await ctx.db
      .query("embeddingAuthFailures")
      .withIndex("by_key", (q) =>
        q.eq("keyHash", args.keyHash).gte("timestamp", timestamp - 3_600_000),
      )
      .take(ATTACK_THRESHOLD + 1);
    const flagged = recent.length > ATTACK_THRESHOLD;
    if (flagged) console.warn(`Potential bot attack detected: ${args.keyHash}`);
    return { flagged };
  },
});

/**
 * Usage of one key over `[start, end]` (inclusive), reading at most USAGE_READ_CAP rows (the
 * earliest): `truncated` says the range held more, and the figures stop short of `end`.
 */
export const getUsage = internalQuery({
  args: { keyHash: v.string(), start: v.number(), end: v.number() },
  returns: v.object({
    totalRequests: v.number(),
    successfulRequests: v.number(),
    totalTokens: v.number(),
    totalItems: v.number(),
    truncated: v.boolean(),
  }),
  handler: async (ctx, { keyHash, start, end }) => {
    const usage = {
      totalRequests: 0,
      successfulRequests: 0,
      totalTokens: 0,
      totalItems: 0,
      truncated: false,
    };
    if (end < start) return usage;
    const rows = await ctx.db
      .query("embeddingRequests")
      .withIndex("by_api_key", (q) =>
        q.eq("apiKeyHash", keyHash).gte("timestamp", start).lte("timestamp", end),
      )
      .take(USAGE_READ_CAP + 1);
    usage.truncated = rows.length > USAGE_READ_CAP;
    for (const row of rows.slice(0, USAGE_READ_CAP)) {
      usage.totalRequests += 1;
      usage.successfulRequests += row.success ? 1 : 0;
      usage.totalTokens += row.tokensUsed;
      usage.totalItems += row.batchSize;
    }
    return usage;
  },
});

/** Failed authentications for a key hash since `since` (inclusive), capped at 1000. */
export const countAuthFailures = internalQuery({
  args: { keyHash: v.string(), since: v.number() },
  returns: v.number(),
  handler: async (ctx, { keyHash, since }) => {
    const rows = await ctx.db
      .query("embeddingAuthFailures")
      .withIndex("by_key", (q) => q.eq("keyHash", keyHash).gte("timestamp", since))
      .take(FAILURE_COUNT_CAP);
    return rows.length;
  },
});
