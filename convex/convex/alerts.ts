// Alerts for the Python side: listing them, and claiming each for delivery by one instance.
import { v } from "convex/values";
import { internalMutation, internalQuery } from "./_generated/server";
import type { Doc } from "./_generated/dataModel";
import { alertFields } from "./lib/alerts";

/** Rows a listing returns at most, whatever it asks. */
export const MAX_LIST = 500;

const vAlert = v.object({ id: v.string(), ...alertFields });

function record(doc: Doc<"alerts">) {
  const { _id, _creationTime, ...fields } = doc;
  return { id: _id, ...fields };
}

/** Alerts seen (`lastSeen`) at or after `since`, most recent first. */
export const list = internalQuery({
  args: { since: v.number(), limit: v.number() },
  returns: v.array(vAlert),
  handler: async (ctx, { since, limit }) => {
    const rows = await ctx.db
      .query("alerts")
      .withIndex("by_last_seen", (q) => q.gte("lastSeen", since))
      .order("desc")
      .take(Math.max(0, Math.min(Math.floor(limit), MAX_LIST)));
    return rows.map(record);
  },
});

/** Pending alerts no live claim holds, oldest first. */
export const pending = internalQuery({
  args: { limit: v.number() },
  returns: v.array(vAlert),
  handler: async (ctx, { limit }) => {
    const now = Date.now();
    const want = Math.max(0, Math.min(Math.floor(limit), MAX_LIST));
    // Claimed rows are read and skipped: a read of twice the listing's cap bounds it.
    const rows = await ctx.db
      .query("alerts")
      .withIndex("by_status", (q) => q.eq("status", "pending"))
      .take(2 * MAX_LIST);
    const out = rows.filter((r) => r.leaseUntil === undefined || r.leaseUntil <= now).slice(0, want);
    return out.map(record);
  },
});

/**
 * Take an alert for delivery until now + leaseMs. Mutations are serializable, so of claimers
 * racing for one alert exactly one sees it free and succeeds; a claimer that dies leaves a
 * lease that runs out, and the alert can be claimed again (each claim counts an attempt).
 */
export const claim = internalMutation({
  args: { id: v.string(), owner: v.string(), leaseMs: v.number() },
  returns: v.boolean(),
  handler: async (ctx, { id, owner, leaseMs }) => {
    const alertId = ctx.db.normalizeId("alerts", id);
    if (alertId === null) return false;
    const row = await ctx.db.get(alertId);
    const now = Date.now();
    if (row === null || row.status !== "pending") return false;
    if (row.leaseUntil !== undefined && row.leaseUntil > now) return false;
    await ctx.db.patch(alertId, { owner, leaseUntil: now + leaseMs, attempts: row.attempts + 1 });
    return true;
  },
});

/** End `owner`'s claim: delivered, failed (final), or retry (pending again, unclaimed). */
export const mark = internalMutation({
  args: {
    id: v.string(),
    owner: v.string(),
    outcome: v.union(v.literal("delivered"), v.literal("failed"), v.literal("retry")),
  },
  returns: v.boolean(),
  handler: async (ctx, { id, owner, outcome }) => {
    const alertId = ctx.db.normalizeId("alerts", id);
    if (alertId === null) return false;
    const row = await ctx.db.get(alertId);
    if (row === null || row.owner !== owner || row.status !== "pending") return false;
    await ctx.db.patch(alertId, {
      owner: undefined,
      leaseUntil: undefined,
      ...(outcome === "retry" ? {} : { status: outcome }),
    });
    return true;
  },
});
