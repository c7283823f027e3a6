// Row inserts shared by the single-row functions (the seed's) and the batched writer.
import type { GenericMutationCtx } from "convex/server";
import type { DataModel } from "../_generated/dataModel";
import type {
  AIRequest,
  AuthFailure,
  BotEvent,
  EmbeddingRequest,
  KeyUsage,
} from "./validators";
import { findKeyById } from "./keys";

type Ctx = Pick<GenericMutationCtx<DataModel>, "db">;

export const MINUTE = 60_000;

export function minuteOf(timestamp: number): number {
  return Math.floor(timestamp / MINUTE) * MINUTE;
}

type Rollup = {
  provider: string;
  minute: number;
  requests: number;
  successes: number;
  latencySum: number;
  tokens: number;
  cost: number;
};

/** Insert AI request rows and fold them into the per-provider per-minute rollups. */
export async function insertAIRequests(ctx: Ctx, rows: AIRequest[]): Promise<void> {
  // Aggregate in memory first: one rollup write per (provider, minute) per call.
  const rollups = new Map<string, Rollup>();
  for (const row of rows) {
    await ctx.db.insert("aiRequestLogs", row);
    const minute = minuteOf(row.timestamp);
    const slot = `${minute}\u0000${row.provider}`;
    let r = rollups.get(slot);
    if (r === undefined) {
      r = {
        provider: row.provider,
        minute,
        requests: 0,
        successes: 0,
        latencySum: 0,
        tokens: 0,
        cost: 0,
      };
      rollups.set(slot, r);
    }
    r.requests += 1;
    r.successes += row.success ? 1 : 0;
    r.latencySum += row.latencyMs;
    r.tokens += row.tokensUsed ?? 0;
    r.cost += row.cost ?? 0;
  }
  for (const r of rollups.values()) {
    const existing = await ctx.db
      .query("providerRollups")
      .withIndex("by_provider_minute", (q) =>
        q.eq("provider", r.provider).eq("minute", r.minute),
      )
      .unique();
    if (existing === null) {
      await ctx.db.insert("providerRollups", r);
    } else {
      await ctx.db.patch(existing._id, {
        requests: existing.requests + r.requests,
        successes: existing.successes + r.successes,
        latencySum: existing.latencySum + r.latencySum,
        tokens: existing.tokens + r.tokens,
        cost: existing.cost + r.cost,
      });
    }
  }
}

export async function insertEmbeddingRequests(
  ctx: Ctx,
  rows: EmbeddingRequest[],
): Promise<void> {
  for (const row of rows) await ctx.db.insert("embeddingRequests", row);
}

export async function insertAuthFailures(ctx: Ctx, rows: AuthFailure[]): Promise<void> {
  for (const row of rows) await ctx.db.insert("embeddingAuthFailures", row);
}

export async function insertBotEvents(ctx: Ctx, rows: BotEvent[]): Promise<void> {
  for (const row of rows) await ctx.db.insert("botDetectionEvents", row);
}

/** Add usage to keys (unknown or malformed ids are skipped); returns how many were updated. */
export async function applyKeyUsage(ctx: Ctx, usage: KeyUsage[]): Promise<number> {
  let updated = 0;
  for (const u of usage) {
    const found = await findKeyById(ctx, u.keyId);
    if (found === null) continue;
    const { doc } = found;
    const lastUsed = Math.max(u.lastUsed, doc.lastUsed ?? 0);
    const requestCount = doc.requestCount + u.requests;
    if (found.kind === "ai") {
      await ctx.db.patch(found.doc._id, { lastUsed, requestCount });
    } else {
      await ctx.db.patch(found.doc._id, { lastUsed, requestCount });
    }
    updated += 1;
  }
  return updated;
}
