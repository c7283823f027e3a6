// The seed's per-key embeddings limit, decided by the rate limiter component: one mutation
// checks and consumes, so two concurrent requests can never both take the last token.
import { v } from "convex/values";
import { internalMutation } from "../_generated/server";
import { decideLimit } from "../lib/limits";

/** The rate limiter's name for per-key embeddings limits (the key is the key's hash). */
export const EMBEDDING_KEY_LIMIT = "embeddingApiKey";

/**
 * Check and consume one request of the key's own limit (`requests` per `windowSeconds`, a
 * fixed window aligned to the epoch). `window` (seconds, the seed's argument) overrides the
 * key's window when given. Unknown, inactive or expired keys are refused.
 */
export const checkRateLimit = internalMutation({
  args: { keyHash: v.string(), window: v.optional(v.number()) },
  returns: v.object({
    allowed: v.boolean(),
    reason: v.optional(v.string()),
    remaining: v.optional(v.number()),
    resetAt: v.optional(v.number()),
    retryAfter: v.optional(v.number()),
  }),
  handler: async (ctx, { keyHash, window }) => {
    const now = Date.now();
    const key = await ctx.db
      .query("embeddingApiKeys")
      .withIndex("by_key_hash", (q) => q.eq("keyHash", keyHash))
      .first();
    if (key === null || !key.active) return { allowed: false, reason: "Invalid API key" };
    if (key.expiresAt !== undefined && key.expiresAt <= now) {
      return { allowed: false, reason: "Expired API key" };
    }
    if (key.rateLimit === undefined) return { allowed: true };
    const period = (window ?? key.rateLimit.windowSeconds) * 1000;
    const rate = key.rateLimit.requests;
    const result = await decideLimit(
      ctx,
      {
        name: EMBEDDING_KEY_LIMIT,
        key: keyHash,
        config: { kind: "fixed window", rate, period, start: 0 },
      },
      now,
    );
    const resetAt = result.ts + period;
    if (!result.ok) {
      return {
        allowed: false,
        reason: "Rate limit exceeded",
        resetAt,
        retryAfter: result.retryAfter ?? resetAt - now,
      };
    }
    return { allowed: true, remaining: Math.max(0, result.value), resetAt };
  },
});
