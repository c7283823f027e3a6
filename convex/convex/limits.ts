// Single-limit operations for the Python store: reset and peek.
import { v } from "convex/values";
import { components } from "./_generated/api";
import { internalMutation, internalQuery } from "./_generated/server";
import { limitState } from "./lib/limits";
import { vLimitConfig } from "./lib/validators";

/** Forget a limit's state (all shards): the next request starts full. */
export const reset = internalMutation({
  args: { name: v.string(), key: v.optional(v.string()) },
  returns: v.null(),
  handler: async (ctx, { name, key }) => {
    await ctx.runMutation(components.rateLimiter.lib.resetRateLimit, {
      name,
      ...(key === undefined ? {} : { key }),
    });
    return null;
  },
});

/** The limit's stored state (`value` tokens at `ts`) and this call's clock, consuming nothing. */
export const peek = internalQuery({
  args: { name: v.string(), key: v.optional(v.string()), config: vLimitConfig },
  returns: v.object({ value: v.number(), ts: v.number(), now: v.number() }),
  handler: async (ctx, { name, key, config }) => {
    const now = Date.now();
    // Off the hot path: every shard is read, for the best estimate of a sharded limit.
    const state = await limitState(ctx, name, key, config, now, Number.POSITIVE_INFINITY);
    return { ...state, now };
  },
});
