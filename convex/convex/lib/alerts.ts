// Anomaly rules, evaluated by the batch mutation: once for every instance, where the rows land.
// The same rules as the Python side's convex_guard/alerts/rules.py, which MemoryStore evaluates;
// the store contract (AlertStoreContract) holds both stores to the same answers.
import type { GenericMutationCtx } from "convex/server";
import { v, type Infer } from "convex/values";
import type { DataModel } from "../_generated/dataModel";
import { limitState } from "./limits";
import { MINUTE } from "./logs";
import { vLimitConfig, type AIRequest, type AuthFailure, type LimitConfig } from "./validators";

type Ctx = Pick<GenericMutationCtx<DataModel>, "db">;
type EvalCtx = Pick<GenericMutationCtx<DataModel>, "db" | "runQuery">;

export const vAlertKind = v.union(
  v.literal("auth_failures"),
  v.literal("bot_wave"),
  v.literal("error_rate"),
  v.literal("limit_exhaustion"),
);
export type AlertKind = Infer<typeof vAlertKind>;

/** A rule as the Python side sends it with each batch (`AlertRule.to_convex`). */
export const vAlertRule = v.object({
  kind: vAlertKind,
  threshold: v.number(),
  windowMs: v.number(),
  cooldownMs: v.number(),
  minRequests: v.number(),
  // limit_exhaustion: the limits whose spent share it watches (`WatchedLimit`).
  limits: v.optional(
    v.array(v.object({ name: v.string(), key: v.optional(v.string()), config: vLimitConfig })),
  ),
});
export type AlertRule = Infer<typeof vAlertRule>;

export const vAlertStatus = v.union(
  v.literal("pending"),
  v.literal("delivered"),
  v.literal("failed"),
);

/** An alert row; `owner`/`leaseUntil` name the live delivery claim, if any. */
export const alertFields = {
  kind: vAlertKind,
  subject: v.string(),
  value: v.number(),
  threshold: v.number(),
  windowMs: v.number(),
  firstSeen: v.number(),
  lastSeen: v.number(),
  count: v.number(),
  status: vAlertStatus,
  attempts: v.number(),
  owner: v.optional(v.string()),
  leaseUntil: v.optional(v.number()),
};

/** Subjects looked at per batch and kind, at most: a batch's reads stay bounded. */
export const MAX_SUBJECTS = 50;
/** Rollup rows an error-rate evaluation reads at most (minutes x writers). */
export const MAX_ROLLUPS = 500;
/** The most rows a count reads (the Python side refuses thresholds above MAX_COUNT_THRESHOLD). */
export const MAX_COUNT_READ = 4001;
/** Limits a limit_exhaustion rule reads at most per batch (`MAX_WATCHED` in rules.py). */
export const MAX_WATCHED = 20;
export const ALL_CLIENTS = "all";
const NO_KEY = "no-key";

export function readCap(rule: AlertRule): number {
  return Math.min(Math.floor(rule.threshold) + 1, MAX_COUNT_READ);
}

/**
 * The range [start, end) a rule counts over: auth failures over the last windowMs (no end);
 * bot waves and error rates over whole minutes that have ended, so this never reads the
 * minute the hot path and other writers are still writing (no conflicts with them).
 */
export function windowOf(rule: AlertRule, now: number): [number, number] {
  if (rule.kind === "auth_failures") return [now - rule.windowMs, Infinity];
  const end = Math.floor(now / MINUTE) * MINUTE;
  return [end - rule.windowMs, end];
}

export type Finding = {
  kind: AlertKind;
  subject: string;
  value: number;
  windowMs: number;
  rule: AlertRule;
};

/** Kinds whose value is a share (0 to 1) of a total. */
const SHARES: AlertKind[] = ["error_rate", "limit_exhaustion"];

export function evaluate(
  rule: AlertRule,
  subject: string,
  count: number,
  total?: number,
  windowMs: number = rule.windowMs,
): Finding | null {
  let value = count;
  if (SHARES.includes(rule.kind)) {
    if (total === undefined || total <= 0 || total < rule.minRequests) return null;
    value = Math.min(Math.max(count, 0) / total, 1);
  }
  if (!(value > rule.threshold)) return null;
  return { kind: rule.kind, subject, value, windowMs, rule };
}

/** The tokens a limit holds at `now`, from its stored state (as the component refills). */
export function remainingAt(config: LimitConfig, state: { value: number; ts: number }, now: number): number {
  const capacity = config.capacity ?? config.rate;
  const elapsed = Math.max(0, now - state.ts);
  const refill =
    config.kind === "token bucket"
      ? (elapsed * config.rate) / config.period
      : Math.floor(elapsed / config.period) * config.rate;
  return Math.min(state.value + refill, capacity);
}

function distinct(values: Iterable<string | null>): string[] {
  const out = new Set<string>();
  for (const value of values) {
    if (value !== null) out.add(value);
    if (out.size >= MAX_SUBJECTS) break;
  }
  return [...out];
}

/**
 * Evaluate `rules` against the rows now stored, for the subjects of this batch (and the bot
 * wave, which is about everyone), and raise or update their alerts. Every count is a bounded
 * index read (`threshold` + 1 rows; the rollups of the window's minutes).
 */
export async function evaluateAlerts(
  ctx: EvalCtx,
  rules: AlertRule[],
  batch: { authFailures: AuthFailure[]; aiRequests: AIRequest[] },
  now: number,
): Promise<void> {
  const byKind = new Map<AlertKind, AlertRule>();
  for (const rule of rules) byKind.set(rule.kind, rule);
  const findings: Finding[] = [];

  const auth = byKind.get("auth_failures");
  if (auth !== undefined && batch.authFailures.length > 0) {
    const [start] = windowOf(auth, now);
    const cap = readCap(auth);
    for (const keyHash of distinct(batch.authFailures.map((r) => (r.keyHash === NO_KEY ? null : r.keyHash)))) {
      const rows = await ctx.db
        .query("embeddingAuthFailures")
        .withIndex("by_key", (q) => q.eq("keyHash", keyHash).gte("timestamp", start))
        .take(cap);
      const found = evaluate(auth, `key:${keyHash}`, rows.length);
      if (found !== null) findings.push(found);
    }
    // Per client key (as insertAuthFailures stored it: the row's, else its ip).
    for (const client of distinct(batch.authFailures.map((r) => r.clientKey || r.ip || null))) {
      const rows = await ctx.db
        .query("embeddingAuthFailures")
        .withIndex("by_client_key", (q) => q.eq("clientKey", client).gte("timestamp", start))
        .take(cap);
      const found = evaluate(auth, `client:${client}`, rows.length);
      if (found !== null) findings.push(found);
    }
  }

  const errors = byKind.get("error_rate");
  if (errors !== undefined && batch.aiRequests.length > 0) {
    const [start, end] = windowOf(errors, now);
    for (const provider of distinct(batch.aiRequests.map((r) => r.provider))) {
      const rollups = await ctx.db
        .query("providerRollups")
        .withIndex("by_provider_minute", (q) =>
          q.eq("provider", provider).gte("minute", start).lt("minute", end),
        )
        .take(MAX_ROLLUPS);
      let total = 0;
      let successes = 0;
      for (const row of rollups) {
        total += row.requests;
        successes += row.successes;
      }
      const found = evaluate(errors, `provider:${provider}`, total - successes, total);
      if (found !== null) findings.push(found);
    }
  }

  const wave = byKind.get("bot_wave");
  if (wave !== undefined) {
    const [start, end] = windowOf(wave, now);
    const events = await ctx.db
      .query("botDetectionEvents")
      .withIndex("by_timestamp", (q) => q.gte("timestamp", start).lt("timestamp", end))
      .take(readCap(wave));
    const found = evaluate(wave, ALL_CLIENTS, events.length);
    if (found !== null) findings.push(found);
  }

  const exhaustion = byKind.get("limit_exhaustion");
  for (const watched of (exhaustion?.limits ?? []).slice(0, MAX_WATCHED)) {
    if (exhaustion === undefined) break;
    const { name, key, config } = watched;
    // The component's state (one shard sampled, as the hot path does): a bounded read.
    const state = await limitState(ctx, name, key, config, now);
    const capacity = config.capacity ?? config.rate;
    const spent = Math.min(Math.max(capacity - remainingAt(config, state, now), 0), capacity);
    const subject = key === undefined ? `limit:${name}` : `limit:${name}:${key}`;
    const found = evaluate(exhaustion, subject, spent, capacity, config.period);
    if (found !== null) findings.push(found);
  }

  for (const finding of findings) await raiseAlert(ctx, finding, now);
}

/**
 * Open an alert, or update the open one of its (kind, subject) within its cool-down. Two
 * batches raising the same alert at once read the same row (or its absence): the backend's
 * optimistic concurrency runs one again, which then sees the other's alert and updates it.
 */
export async function raiseAlert(ctx: Ctx, finding: Finding, now: number): Promise<void> {
  const latest = await ctx.db
    .query("alerts")
    .withIndex("by_kind_subject", (q) => q.eq("kind", finding.kind).eq("subject", finding.subject))
    .order("desc")
    .first();
  if (latest !== null && now - latest.firstSeen < finding.rule.cooldownMs) {
    await ctx.db.patch(latest._id, {
      value: finding.value,
      lastSeen: Math.max(latest.lastSeen, now),
      count: latest.count + 1,
    });
    return;
  }
  await ctx.db.insert("alerts", {
    kind: finding.kind,
    subject: finding.subject,
    value: finding.value,
    threshold: finding.rule.threshold,
    windowMs: finding.windowMs,
    firstSeen: now,
    lastSeen: now,
    count: 1,
    status: "pending",
    attempts: 0,
  });
}
