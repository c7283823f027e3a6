// Data migrations, run by the @convex-dev/migrations component (convex.config.ts): each one
// walks its table (or a range of an index) in batches, one mutation per batch, recording its
// cursor in the component, so a run that fails or is stopped resumes where it was and a
// finished one is not run again.
// `make convex-migrate` starts `run` (every migration of ALL, in order) and waits on `status`.
//
// A migration must be idempotent (a reset walks rows it has migrated already), and the code
// must read both shapes until it has finished on every deployment.
import { Migrations, type MigrationStatus } from "@convex-dev/migrations";
import { components, internal } from "./_generated/api";
import { internalMutation, internalQuery } from "./_generated/server";
import { clientKeyOf, DEFAULT_IPV6_PREFIX } from "./lib/addresses";
import schema from "./schema";

// The schema lets a migration walk one range of an index (`customRange`), not its table.
export const migrations = new Migrations(components.migrations, { internalMutation, schema });

/** The IPv6 network the app keys clients by (CONVEX_GUARD_IPV6_PREFIX; its ipv6_prefix). */
export function ipv6Prefix(): number {
  const raw = process.env.CONVEX_GUARD_IPV6_PREFIX;
  if (raw === undefined || raw.trim() === "") return DEFAULT_IPV6_PREFIX;
  const bits = Number(raw);
  if (!Number.isInteger(bits) || bits < 0 || bits > 128) {
    throw new Error(
      `CONVEX_GUARD_IPV6_PREFIX must be the app's ipv6_prefix, an integer from 0 to 128, got ${JSON.stringify(raw)}`,
    );
  }
  return bits;
}

/**
 * Bot events recorded before events carried their client key sit in the `by_client_key`
 * index under no key, so escalation per client address does not count them: a client
 * that rotates its fingerprint right after an upgrade starts from a clean history. This
 * gives each such event the key its `ip` has now. Events with a key already, and those
 * whose `ip` is no address ("unknown": new events get no key either), are left as they are.
 */
export const backfillBotClientKey = migrations.define({
  table: "botDetectionEvents",
  // Only the events without a key (an index holds a missing field as undefined), in time
  // order: a month of keyed events is not read. An event patched leaves the range behind
  // the cursor, so none is visited twice; one an old instance writes meanwhile with a time
  // behind the cursor is missed, hence: migrate once no old instance is left (README).
  customRange: (query) => query.withIndex("by_client_key", (q) => q.eq("clientKey", undefined)),
  migrateOne: (_ctx, event) => {
    if (event.clientKey !== undefined) return;
    const clientKey = clientKeyOf(event.ip, ipv6Prefix());
    return clientKey === undefined ? undefined : { clientKey };
  },
});

/** Every migration, oldest first: a deployment of any age runs what it has not yet. */
const ALL = [internal.migrations.backfillBotClientKey];

/**
 * Start (or resume) every migration not yet done, one after another; a migration in
 * progress is left to finish. Arguments as the component's runners take them: `{dryRun:
 * true}` runs the first pending batch and rolls it back, `{reset: true}` starts over.
 */
export const run = migrations.runner(ALL);

/** Where each migration is: `state` "success" for every one means the upgrade is done. */
export const status = internalQuery({
  args: {},
  handler: async (ctx): Promise<MigrationStatus[]> =>
    await migrations.getStatus(ctx, { migrations: ALL }),
});
