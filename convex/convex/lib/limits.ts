// Deciding limits through the rate limiter component, and reading a limit's state back.
import type { GenericMutationCtx, GenericQueryCtx } from "convex/server";
import { v, type Infer } from "convex/values";
import { components } from "../_generated/api";
import type { DataModel } from "../_generated/dataModel";
import {
  type LeaseRequest,
  type LeaseResult,
  type LimitConfig,
  type LimitRequest,
  type LimitResult,
  vLimitConfig,
} from "./validators";

type RunQueryCtx = Pick<GenericQueryCtx<DataModel>, "runQuery">;
type RunMutationCtx = Pick<GenericMutationCtx<DataModel>, "runQuery" | "runMutation">;

/** From this many shards on, the component's `rateLimit` samples two of them (its `MIN_CHOOSE_TWO`). */
const CHOOSE_TWO = 3;

function shardsOf(config: LimitConfig): number {
  return Math.max(1, Math.round(config.shards ?? 1));
}

/**
 * The most one call may count against a sharded limit: the component's `validateRequest`
 * throws above `capacity / (shards / 2)` once it samples two shards.
 */
export function maxPerCall(config: LimitConfig): number {
  const shards = shardsOf(config);
  const capacity = config.capacity ?? config.rate;
  return shards < CHOOSE_TWO ? capacity : capacity / (shards / 2);
}

/**
 * The stored state of a limit: `value` tokens counted at `ts` (epoch ms), in the units of
 * the whole limit. An absent state is full (`capacity`, default `rate`), counted at `now`
 * (a fixed window with `start`: at the start of the current window).
 *
 * A sharded limit is estimated from `sample` shards (the fullest, scaled up by the shard
 * count). The hot path samples one, so a decision reads at most the component's own two
 * shards plus this one, whatever the shard count; `peek` may sample them all.
 */
export async function limitState(
  ctx: RunQueryCtx,
  name: string,
  key: string | undefined,
  config: LimitConfig,
  now: number,
  sample = 1,
): Promise<{ value: number; ts: number }> {
  const shards = shardsOf(config);
  const got = await ctx.runQuery(components.rateLimiter.lib.getValue, {
    name,
    ...(key === undefined ? {} : { key }),
    config,
    sampleShards: Math.max(1, Math.min(sample, shards)),
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
  // Tokens handed back (a negative count) can leave a shard above its capacity until its
  // next decision cuts it: answer the usable amount.
  return { value: Math.min(got.value * shards, config.capacity ?? config.rate), ts: got.ts };
}

async function rateLimit(
  ctx: RunMutationCtx,
  name: string,
  key: string | undefined,
  config: LimitConfig,
  count: number,
  reserve?: boolean,
): Promise<{ ok: boolean; retryAfter?: number }> {
  return await ctx.runMutation(components.rateLimiter.lib.rateLimit, {
    name,
    ...(key === undefined ? {} : { key }),
    count,
    ...(reserve === undefined ? {} : { reserve }),
    config,
  });
}

/**
 * Decide one limit through the component's `rateLimit` mutation (which stores the new state
 * only when the request is admitted), then read the state back (an estimate when sharded,
 * see `limitState`).
 */
export async function decideLimit(
  ctx: RunMutationCtx,
  request: LimitRequest,
  now: number,
): Promise<LimitResult> {
  const { name, key, count, reserve, config } = request;
  const status = await rateLimit(ctx, name, key, config, count ?? 1, reserve);
  const state = await limitState(ctx, name, key, config, now);
  const result: LimitResult = { ok: status.ok, value: state.value, ts: state.ts };
  if (status.retryAfter !== undefined) result.retryAfter = status.retryAfter;
  return result;
}

/** The start of the fixed window `now` falls in, for a limit stored at `ts`. */
function currentWindow(config: LimitConfig, ts: number, now: number): number {
  return ts + Math.floor((now - ts) / config.period) * config.period;
}

/**
 * Take or return a block of an unkeyed limit's tokens for a process to admit from locally.
 *
 * `want` is taken if the limit has it, else `need`, else nothing (`retryAfter` of the last
 * attempt). Neither is ever asked above `maxPerCall`: the component would throw. A negative
 * `want` hands tokens back; for a fixed window only when `window` is still the current
 * window, since a past window's tokens are gone for everyone. The answer carries the limit's
 * state after (an estimate when sharded).
 */
export async function decideLease(
  ctx: RunMutationCtx,
  lease: LeaseRequest,
  now: number,
): Promise<LeaseResult> {
  const { name, config, want, need, window } = lease;
  let granted = 0;
  let retryAfter: number | undefined;
  if (want < 0) {
    let current = true;
    if (config.kind === "fixed window") {
      const before = await limitState(ctx, name, undefined, config, now);
      current = window !== undefined && currentWindow(config, before.ts, now) === window;
    }
    if (current) {
      // The component puts them on one shard; above its share they are cut by its next
      // decision: a loss to the limit, never a gain.
      await rateLimit(ctx, name, undefined, config, want);
      granted = want;
    }
  } else {
    const most = maxPerCall(config);
    const asks = [Math.min(want, most)];
    if (need > 0 && need < asks[0]) asks.push(Math.min(need, most));
    for (const count of asks) {
      if (count <= 0) continue;
      const status = await rateLimit(ctx, name, undefined, config, count);
      if (status.ok) {
        granted = count;
        retryAfter = undefined;
        break;
      }
      retryAfter = status.retryAfter;
    }
  }
  const state = await limitState(ctx, name, undefined, config, now);
  const capacity = config.capacity ?? config.rate;
  let { value, ts } = state;
  if (config.kind === "fixed window") {
    // A refusal leaves the stored window as it was: answer as of the current one.
    const windows = Math.max(0, Math.floor((now - ts) / config.period));
    value += windows * config.rate;
    ts += windows * config.period;
  }
  // Tokens handed back to a full limit are cut at its capacity by its next decision.
  value = Math.min(value, capacity);
  return retryAfter === undefined
    ? { granted, value, ts }
    : { granted, retryAfter, value, ts };
}

/**
 * The correction of one reservation (a token or cost rule's estimate), sent with a log batch:
 * `amount` is charged (as a count with `reserve`: always applied, the limit may go into debt)
 * or, when negative, handed back, at most to the window it was taken from (`reservedAt`, the
 * `now` of the `guard:check` that reserved it). The Python `Settlement`.
 */
export const vSettlement = v.object({
  name: v.string(),
  key: v.optional(v.string()),
  config: vLimitConfig,
  amount: v.number(),
  reservedAt: v.number(),
});
export type Settlement = Infer<typeof vSettlement>;

/**
 * Apply one settlement, as `MemoryStore` does: a charge through the component with
 * `reserve`, a refund as a negative count, but only to a state that still exists and, for a
 * fixed window, is still in the window of `reservedAt` (a past window's tokens are gone; a
 * later window must not admit more than its rate).
 */
export async function applySettlement(
  ctx: RunMutationCtx,
  settlement: Settlement,
  now: number,
): Promise<void> {
  const { name, key, config, amount, reservedAt } = settlement;
  if (!Number.isFinite(amount) || !Number.isFinite(reservedAt)) {
    throw new Error(`settlement of ${name}: amount and reservedAt must be finite`);
  }
  if (amount === 0) return;
  if (amount > 0) {
    await rateLimit(ctx, name, key, config, amount, true);
    return;
  }
  const got = await ctx.runQuery(components.rateLimiter.lib.getValue, {
    name,
    ...(key === undefined ? {} : { key }),
    config,
    sampleShards: 1,
  });
  if (got.ts === 0) return; // no state: the limit is full, a refund would be cut at once
  if (config.kind === "fixed window" && reservedAt < currentWindow(config, got.ts, now)) return;
  await rateLimit(ctx, name, key, config, amount);
}
