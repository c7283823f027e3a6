// Retention: raw rows older than CONVEX_GUARD_RETENTION_DAYS (default 30) are deleted in
// bounded batches; the hourly cron (crons.ts) starts a run, which reschedules itself while
// more remain. Alerts go by the same period once they are finished (delivered or failed).
// The audit trail (auditLog) is kept for ever unless CONVEX_GUARD_AUDIT_RETENTION_DAYS is set.
import type {
  DocumentByName,
  FieldTypeFromFieldPath,
  GenericDatabaseReader,
  GenericDataModel,
  IndexNames,
  NamedIndex,
  NamedTableInfo,
} from "convex/server";
import { v } from "convex/values";
import { internal } from "./_generated/api";
import type { DataModel, Id, TableNames } from "./_generated/dataModel";
import { internalMutation } from "./_generated/server";
import { FOLD_IDLE_MS, foldIdleUsage } from "./lib/keys";

export const DEFAULT_RETENTION_DAYS = 30;
/** Rows deleted per table per run. */
export const BATCH = 500;
const DAY = 24 * 60 * 60 * 1000;

/**
 * A table, one of its indexes and the time field the range is on, checked against the
 * schema: the index's first field, or its second after `prefix`, an equality on its first
 * (the range then covers only the rows with that value).
 */
type TimeIndex = {
  [T in TableNames]: {
    [I in IndexNames<NamedTableInfo<DataModel, T>>]:
      | {
          table: T;
          index: I;
          field: NamedIndex<NamedTableInfo<DataModel, T>, I>[0];
          grace: number;
          prefix?: undefined;
        }
      | {
          table: T;
          index: I;
          prefix: {
            [F in NamedIndex<NamedTableInfo<DataModel, T>, I>[0]]: readonly [
              F,
              FieldTypeFromFieldPath<DocumentByName<DataModel, T>, F>,
            ];
          }[NamedIndex<NamedTableInfo<DataModel, T>, I>[0]];
          field: NamedIndex<NamedTableInfo<DataModel, T>, I>[1];
          grace: number;
        };
  }[IndexNames<NamedTableInfo<DataModel, T>>];
}[TableNames];

/**
 * The tables retention deletes from, each by an index on its time field: a row goes once
 * that time is older than the cutoff by `grace` ms.
 */
const PURGED = [
  { table: "aiRequestLogs", index: "by_timestamp", field: "timestamp", grace: 0 },
  { table: "botDetectionEvents", index: "by_timestamp", field: "timestamp", grace: 0 },
  { table: "embeddingRequests", index: "by_timestamp", field: "timestamp", grace: 0 },
  { table: "embeddingAuthFailures", index: "by_timestamp", field: "timestamp", grace: 0 },
  { table: "logBatches", index: "by_processed_at", field: "processedAt", grace: 0 },
  // A rollup goes once its whole minute (hour) is older than the cutoff.
  { table: "providerRollups", index: "by_minute", field: "minute", grace: 60_000 },
  { table: "providerHourlyRollups", index: "by_hour", field: "hour", grace: 3_600_000 },
  { table: "keyRollups", index: "by_minute", field: "minute", grace: 60_000 },
  { table: "keyHourlyRollups", index: "by_hour", field: "hour", grace: 3_600_000 },
  // An alert goes once it is finished and was last seen before the cutoff. A pending one
  // stays, however old: only a deliverer (which knows its attempts) ends it, delivered or
  // failed, and deleting it first would lose an alert nobody was told of.
  ...(["delivered", "failed"] as const).map(
    (status) =>
      ({
        table: "alerts",
        index: "by_status_last_seen",
        prefix: ["status", status],
        field: "lastSeen",
        grace: 0,
      }) as const,
  ),
] as const satisfies readonly TimeIndex[];

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
 * How many days audit entries are kept: undefined (for ever, the default) unless
 * CONVEX_GUARD_AUDIT_RETENTION_DAYS is set. Apart from the rows' retention: who changed a key
 * is asked long after the requests it served are gone.
 */
export function auditRetentionDays(): number | undefined {
  const raw = process.env.CONVEX_GUARD_AUDIT_RETENTION_DAYS;
  if (raw === undefined || raw.trim() === "") return undefined;
  const days = Number(raw);
  if (!Number.isFinite(days) || days <= 0) {
    throw new Error(
      `CONVEX_GUARD_AUDIT_RETENTION_DAYS must be a positive number of days, got ${JSON.stringify(raw)}`,
    );
  }
  return days;
}

/**
 * Delete up to BATCH rows older than `cutoff` (epoch ms; default now minus the retention)
 * from each table, and audit entries older than `auditCutoff` (default: none, unless
 * CONVEX_GUARD_AUDIT_RETENTION_DAYS is set), fold up to BATCH key-usage rows idle for
 * FOLD_IDLE_MS into their keys, and schedule the next run at once if any table had more.
 */
export const purge = internalMutation({
  args: { cutoff: v.optional(v.number()), auditCutoff: v.optional(v.number()) },
  returns: v.object({ deleted: v.number(), more: v.boolean() }),
  handler: async (ctx, args) => {
    const cutoff = args.cutoff ?? Date.now() - retentionDays() * DAY;
    const auditDays = auditRetentionDays();
    const auditCutoff =
      args.auditCutoff ?? (auditDays === undefined ? undefined : Date.now() - auditDays * DAY);
    // One loop over the tables: TypeScript cannot follow a table, its index and field
    // together through a union, so the loop reads through the untyped view of the
    // database; PURGED's entries were checked against the schema above.
    const db = ctx.db as unknown as GenericDatabaseReader<GenericDataModel>;
    const batches: { _id: Id<TableNames> }[][] = [];
    for (const entry of PURGED) {
      const { table, index, field, grace } = entry;
      const prefix = "prefix" in entry ? entry.prefix : undefined;
      const rows = await db
        .query(table)
        .withIndex(index, (q) => {
          // After the equality the untyped builder no longer knows which fields remain.
          const range = prefix === undefined ? q : (q.eq(prefix[0], prefix[1]) as unknown as typeof q);
          return range.lt(field, cutoff - grace);
        })
        .take(BATCH);
      batches.push(rows as { _id: Id<TableNames> }[]);
    }
    if (auditCutoff !== undefined) {
      batches.push(
        await ctx.db
          .query("auditLog")
          .withIndex("by_timestamp", (q) => q.lt("timestamp", auditCutoff))
          .take(BATCH),
      );
    }
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
    if (more) {
      await ctx.scheduler.runAfter(0, internal.retention.purge, {
        cutoff,
        ...(auditCutoff === undefined ? {} : { auditCutoff }),
      });
    }
    return { deleted, more };
  },
});
