// The audit trail of API keys: one append-only `auditLog` row per change, inserted by the
// mutation that makes the change, so a change and its entry commit together or not at all.
import type { GenericDatabaseWriter } from "convex/server";
import { v, type Infer } from "convex/values";
import type { DataModel } from "../_generated/dataModel";
import { type ApiKeyRecord, vKeyQuota } from "./validators";

/** What an entry records as its actor when the caller names none (Python's UNKNOWN_ACTOR). */
export const UNKNOWN_ACTOR = "unknown";
/** The longest actor an entry takes (Python's MAX_ACTOR_LENGTH). */
export const MAX_ACTOR_LENGTH = 200;
// A raw key's text (core/keys.py): an actor holding one is refused, so no entry carries one.
const RAW_KEY = /cg_(?:ai|emb)_[0-9A-Za-z]{16,}/;
// Control characters (Python's `str.isprintable` refuses these and more).
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

export const vAuditAction = v.union(
  v.literal("key.created"),
  v.literal("key.revoked"),
  v.literal("key.rotated"),
  v.literal("key.updated"),
);
export type AuditAction = Infer<typeof vAuditAction>;

/** A field's value before or after: null when absent (or, before a creation, no record). */
export const vAuditValue = v.union(
  v.null(),
  v.string(),
  v.number(),
  v.boolean(),
  v.array(v.string()),
  v.object({ requests: v.number(), period: v.number() }),
  v.array(vKeyQuota),
);
type AuditValue = Infer<typeof vAuditValue>;

export const vAuditChange = v.object({ field: v.string(), before: vAuditValue, after: vAuditValue });

/** An `auditLog` row. `record` is the key's document id: never the key, its hash or prefix. */
export const auditFields = {
  timestamp: v.number(),
  action: vAuditAction,
  record: v.string(),
  actor: v.string(),
  changes: v.array(vAuditChange),
  related: v.optional(v.string()),
};

export const vAuditEntry = v.object({ id: v.string(), ...auditFields });
export type AuditEntry = Infer<typeof vAuditEntry>;

/** The audit arguments a key mutation takes (absent actor: UNKNOWN_ACTOR). */
export const auditArgs = { actor: v.optional(v.string()), related: v.optional(v.string()) };

/** The fields an entry compares, in the order Python's AUDITED_KEY_FIELDS lists them. */
const FIELDS = [
  "kind",
  "name",
  "owner",
  "scopes",
  "rateLimit",
  "quotas",
  "expiresAt",
  "active",
] as const;

/** `actor` as an entry records it, or an error before anything is written. */
export function checkActor(actor: string | undefined): string {
  if (actor === undefined) return UNKNOWN_ACTOR;
  const text = actor.trim();
  if (text.length === 0 || text.length > MAX_ACTOR_LENGTH) {
    throw new Error(`An audit actor must be 1 to ${MAX_ACTOR_LENGTH} characters`);
  }
  if (CONTROL.test(text)) throw new Error("An audit actor must not contain control characters");
  if (RAW_KEY.test(text)) throw new Error("An audit actor must not contain an API key");
  return text;
}

function same(a: AuditValue, b: AuditValue): boolean {
  if (Array.isArray(a) && Array.isArray(b)) {
    // Scopes (strings) or a tier's quotas (small objects, compared by their fields).
    return a.length === b.length && a.every((x, i) => JSON.stringify(x) === JSON.stringify(b[i]));
  }
  if (a !== null && b !== null && typeof a === "object" && typeof b === "object") {
    return !Array.isArray(a) && !Array.isArray(b) && a.requests === b.requests && a.period === b.period;
  }
  return a === b;
}

/** The compared fields that differ between two states of a key (`before` null: created). */
export function keyChanges(before: ApiKeyRecord | null, after: ApiKeyRecord) {
  const changes: Infer<typeof vAuditChange>[] = [];
  for (const field of FIELDS) {
    const old: AuditValue = before === null ? null : (before[field] ?? null);
    const now: AuditValue = after[field] ?? null;
    if (!same(old, now)) changes.push({ field, before: old, after: now });
  }
  return changes;
}

/** Insert the entry of a change this transaction made. */
export async function recordAudit(
  ctx: { db: GenericDatabaseWriter<DataModel> },
  entry: {
    action: AuditAction;
    actor: string;
    before: ApiKeyRecord | null;
    after: ApiKeyRecord;
    related?: string;
  },
): Promise<void> {
  await ctx.db.insert("auditLog", {
    timestamp: Date.now(),
    action: entry.action,
    record: entry.after.id,
    actor: entry.actor,
    changes: keyChanges(entry.before, entry.after),
    ...(entry.related === undefined ? {} : { related: entry.related }),
  });
}
