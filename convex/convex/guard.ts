// The hot path: one mutation per request decides the bot verdict and every limit together.
import { ConvexError, v, type Infer } from "convex/values";
import { internal } from "./_generated/api";
import { internalMutation } from "./_generated/server";
import { recordBotEvent } from "./lib/bots";
import { decideLease, decideLimit } from "./lib/limits";
import {
  vBotCheck,
  vBotVerdict,
  vLeaseRequest,
  vLeaseResult,
  type LeaseResult,
  vLimitRequest,
  vLimitResult,
  type LimitResult,
} from "./lib/validators";

/** The `kind` of the ConvexError that `consumeLimits` throws to roll back its writes. */
export const LIMITS_DENIED = "LimitsDenied";

const vCheckAnswer = v.object({
  ok: v.boolean(),
  now: v.number(),
  results: v.array(vLimitResult),
  bot: v.optional(vBotVerdict),
  leases: v.optional(v.array(vLeaseResult)),
});
type CheckAnswer = Infer<typeof vCheckAnswer>;

/**
 * Take or return the `leases` (if given), escalate and record `bot` (if given), then decide
 * all `limits` all-or-nothing.
 *
 * Leases are blocks of an unkeyed limit's tokens that the caller admits from locally (see
 * `decideLease`). They are decided first and outside the all-or-nothing decision: a granted
 * block commits whatever the rest answers. A lease that grants less than its `need` denies the
 * request, so `limits` are then decided but none is consumed. `leases` in the answer are in
 * the order asked; without `leases` the answer is as it always was. With `deny` the request is
 * refused by the caller: its limits are decided but none is consumed (its bot is recorded).
 *
 * A bot still allowed by its history consumes its own `limit` (if given; denied → challenged).
 * A blocked or challenged bot consumes none of `limits` (`results` is empty). Otherwise the limits
 * are decided in a nested mutation that throws when any of them denies, so none is consumed,
 * while this mutation still commits the bot event. `now` is this call's clock (epoch ms, read
 * after the decisions, so never earlier than a result's `ts`);
 * each result carries the limit's state after the decision (`value` tokens at `ts`).
 */
export const check = internalMutation({
  args: {
    limits: v.array(vLimitRequest),
    bot: v.optional(vBotCheck),
    leases: v.optional(v.array(vLeaseRequest)),
    deny: v.optional(v.boolean()),
  },
  returns: vCheckAnswer,
  handler: async (ctx, { limits, bot, leases, deny }): Promise<CheckAnswer> => {
    const now = Date.now();
    let granted: LeaseResult[] | undefined;
    // `deny`: the caller refuses the request already (a lease it knows is spent until its
    // retryAfter), so the limits are decided for their answers and none is consumed.
    let leaseDenied = deny === true;
    if (leases !== undefined) {
      granted = [];
      for (const lease of leases) {
        const result = await decideLease(ctx, lease, now);
        if (lease.need > 0 && result.granted < lease.need) leaseDenied = true;
        granted.push(result);
      }
    }
    const withLeases = (answer: CheckAnswer): CheckAnswer =>
      granted === undefined ? answer : { ...answer, leases: granted };
    let verdict: { action: "blocked" | "challenged" | "allowed"; previousEvents: number } | undefined;
    if (bot !== undefined) {
      const { limit, ...check } = bot;
      // The bot's own limit is consumed outside the all-or-nothing decision below: it counts
      // the flagged request even when the request's limits then deny.
      const limitAdmits =
        limit === undefined ? undefined : async () => (await decideLimit(ctx, limit, now)).ok;
      verdict = await recordBotEvent(ctx, check, now, limitAdmits);
      if (verdict.action !== "allowed") {
        return withLeases({ ok: false, now, results: [], bot: verdict });
      }
    }
    let ok = true;
    let results: LimitResult[] = [];
    if (limits.length > 0) {
      try {
        results = await ctx.runMutation(internal.guard.consumeLimits, {
          limits,
          now,
          ...(leaseDenied ? { rollBack: true } : {}),
        });
      } catch (error) {
        const data = convexErrorData(error);
        if (!isDenied(data)) throw error;
        ok = false;
        results = data.results;
      }
    }
    // The component reads its own clock; answer with one no earlier than any result's `ts`.
    if (leaseDenied) ok = false;
    const answeredAt = Math.max(now, Date.now());
    return withLeases(
      verdict === undefined
        ? { ok, now: answeredAt, results }
        : { ok, now: answeredAt, results, bot: verdict },
    );
  },
});

/** The data of a ConvexError (recognised by its marker, as Convex does), else undefined. */
function convexErrorData(error: unknown): unknown {
  if (typeof error !== "object" || error === null) return undefined;
  if (!(error instanceof ConvexError) && !(Symbol.for("ConvexError") in error)) return undefined;
  const data = (error as { data?: unknown }).data;
  if (typeof data !== "string") return data;
  try {
    return JSON.parse(data) as unknown; // serialized on its way out of the nested call
  } catch {
    return data;
  }
}

function isDenied(data: unknown): data is { kind: string; results: LimitResult[] } {
  return (
    typeof data === "object" &&
    data !== null &&
    (data as { kind?: unknown }).kind === LIMITS_DENIED &&
    Array.isArray((data as { results?: unknown }).results)
  );
}

/**
 * Decide every limit in order (a limit named twice sees its own earlier consumption) and
 * return the results when all admit; otherwise, or when `rollBack` is set (the request is
 * denied elsewhere), throw a ConvexError carrying the results, so this sub-transaction's
 * writes are rolled back.
 */
export const consumeLimits = internalMutation({
  args: { limits: v.array(vLimitRequest), now: v.number(), rollBack: v.optional(v.boolean()) },
  returns: v.array(vLimitResult),
  handler: async (ctx, { limits, now, rollBack }) => {
    const results: LimitResult[] = [];
    for (const request of limits) {
      results.push(await decideLimit(ctx, request, now));
    }
    if (rollBack === true || results.some((r) => !r.ok)) {
      throw new ConvexError({ kind: LIMITS_DENIED, results });
    }
    return results;
  },
});
