// Deciding limits through the rate limiter component, and reading a limit's state back.
import type { GenericMutationCtx, GenericQueryCtx } from "convex/server";
import { components } from "../_generated/api";
import type { DataModel } from "../_generated/dataModel";
import type { LimitConfig, LimitRequest, LimitResult } from "./validators";

type RunQueryCtx = Pick<GenericQueryCtx<DataModel>, "runQuery">;
type RunMutationCtx = Pick<GenericMutationCtx<DataModel>, "runQuery" | "runMutation">;

function shardsOf(config: LimitConfig): number {
  return Math.max(1, Math.round(config.shards ?? 1));
}

/**
 * The stored state of a limit: `value` tokens counted at `ts` (epoch ms), in the units of
 * the whole limit. An absent state is full (`capacity`, default `rate`), counted at `now`
 * (a fixed window with `start`: at the start of the current window). For a sharded limit
 * this is the fullest sampled shard scaled up by the shard count (an estimate).
 */
export async function limitState(
  ctx: RunQueryCtx,
  name: string,
  key: string | undefined,
  config: LimitConfig,
  now: number,
): Promise<{ value: number; ts: number }> {
  const shards = shardsOf(config);
  const got = await ctx.runQuery(components.rateLimiter.lib.getValue, {
    name,
    ...(key === undefined ? {} : { key }),
    config,
    sampleShards: shards,
  });
  if (got.ts === 0) {
    // getValue's answer for a shard that has no state yet.
    const capacity = config.capacity ?? config.rate;
    let ts = now;
    if (config.kind === "fixed window" && typeof config.start === "number") {
      ts = config.start + Math.floor((now - config.start) / config.period) * config.period;
    }
    return { value: capacity, ts };
  }
  return { value: got.value * shards, ts: got.ts };
}

/**
 * Decide one limit through the component's `rateLimit` mutation (which stores the new state
 * only when the request is admitted), then read the state back.
 */
export async function decideLimit(
  ctx: RunMutationCtx,
  request: LimitRequest,
  now: number,
): Promise<LimitResult> {
  const { name, key, count, reserve, config } = request;
  const status = await ctx.runMutation(components.rateLimiter.lib.rateLimit, {
    name,
    ...(key === undefined ? {} : { key }),
    ...(count === undefined ? {} : { count }),
    ...(reserve === undefined ? {} : { reserve }),
    config,
  });
  const state = await limitState(ctx, name, key, config, now);
  const result: LimitResult = { ok: status.ok, value: state.value, ts: state.ts };
  if (status.retryAfter !== undefined) result.retryAfter = status.retryAfter;
  return result;
}
