// Retention: raw rows older than CONVEX_GUARD_RETENTION_DAYS (default 30) are deleted in
// bounded batches; the hourly cron (crons.ts) starts a run, which reschedules itself while
// more remain.
import { v } from "convex/values";
import { internal } from "./_generated/api";
import { internalMutation } from "./_generated/server";
import { FOLD_IDLE_MS, foldIdleUsage } from "./lib/keys";

export const DEFAULT_RETENTION_DAYS = 30;
/** Rows deleted per table per run. */
export const BATCH = 500;
const DAY = 24 * 60 * 60 * 1000;

export function retentionDays(): number {
  const raw = process.env.CONVEX_GUARD_RETENTION_DAYS;
  if (raw === undefined || raw.trim() === "") return DEFAULT_RETENTION_DAYS;
  const days = Number(raw);
  if (!Number.isFinite(days) || days <= 0) {
    throw new Error(
      `CONVEX_GUARD_RETENTION_DAYS must be a positive number of days, got ${JSON.stringify(raw)}`,
    );
  }
  return days;
}

/**
 * Delete up to BATCH rows older than `cutoff` (epoch ms; default now minus the retention)
 * from each table, fold up to BATCH key-usage rows idle for FOLD_IDLE_MS into their keys,
 * and schedule the next run at once if any table had more.
 */
export const purge = internalMutation({
  args: { cutoff: v.optional(v.number()) },
  returns: v.object({ deleted: v.number(), more: v.boolean() }),
  handler: async (ctx, args) => {
    const cutoff = args.cutoff ?? Date.now() - retentionDays() * DAY;
    const batches = [
      await ctx.db
        .query("aiRequestLogs")
        .withIndex("by_timestamp", (q) => q.lt("timestamp", cutoff))
        .take(BATCH),
      await ctx.db
        .query("botDetectionEvents")
        .withIndex("by_timestamp", (q) => q.lt("timestamp", cutoff))
        .take(BATCH),
      await ctx.db
        .query("embeddingRequests")
        .withIndex("by_timestamp", (q) => q.lt("timestamp", cutoff))
        .take(BATCH),
      await ctx.db
        .query("embeddingAuthFailures")
        .withIndex("by_timestamp", (q) => q.lt("timestamp", cutoff))
        .take(BATCH),
      await ctx.db
        .query("logBatches")
        .withIndex("by_processed_at", (q) => q.lt("processedAt", cutoff))
        .take(BATCH),
      // A rollup goes once its whole minute is older than the cutoff.
      await ctx.db
        .query("providerRollups")
        .withIndex("by_minute", (q) => q.lt("minute", cutoff - 60_000))
        .take(BATCH),
      await ctx.db
        .query("providerHourlyRollups")
        .withIndex("by_hour", (q) => q.lt("hour", cutoff - 3_600_000))
        .take(BATCH),
    ];
    let deleted = 0;
    for (const rows of batches) {
      for (const row of rows) {
        await ctx.db.delete(row._id);
        deleted += 1;
      }
    }
    const folded = await foldIdleUsage(ctx, Date.now() - FOLD_IDLE_MS, BATCH);
    deleted += folded;
    const more = folded === BATCH || batches.some((rows) => rows.length === BATCH);
    if (more) await ctx.scheduler.runAfter(0, internal.retention.purge, { cutoff });
    return { deleted, more };
  },
});
