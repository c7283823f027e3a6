// Batched log writes: one mutation per flush of the Python logger, idempotent by batch id.
import { v } from "convex/values";
import { internalMutation } from "./_generated/server";
import { evaluateAlerts, vAlertRule } from "./lib/alerts";
import { applySettlement, vSettlement } from "./lib/limits";
import {
  applyKeyUsage,
  insertAIRequests,
  insertAuthFailures,
  insertBotEvents,
  insertEmbeddingRequests,
} from "./lib/logs";
import {
  vAIRequest,
  vAuthFailure,
  vBotEvent,
  vEmbeddingRequest,
  vKeyUsage,
} from "./lib/validators";

/**
 * Insert every row of the batch, fold the AI rows into the provider rollups, apply the key
 * usage and remember `batchId` — all in one transaction. A batch id seen before is skipped
 * (`applied: false`), so a retry after a lost answer lands once. Keep batches to a few
 * thousand rows: a mutation may write at most 8192 documents.
 *
 * `writer` names the sender (one id per app process): the rollups and key-usage rows a batch
 * patches are that writer's own, so batches of different instances never write the same
 * document and never conflict. Without it, batches share one set of rows, as before.
 *
 * `settlements` (token and cost rules' reservations corrected by what the requests used) are
 * applied to the limits in the same transaction, so they land once per batch id with the rows:
 * a settled request costs no round trip of its own.
 *
 * `alertRules` (the Python side's configured rules, sent with every batch: the instances'
 * own settings decide, and a deployment needs no variable of its own) are evaluated against
 * the rows now stored, in this same transaction: one anomaly is one alert, whichever
 * instance's batch finds it.
 */
export const writeBatch = internalMutation({
  args: {
    batchId: v.string(),
    writer: v.optional(v.string()),
    aiRequests: v.array(vAIRequest),
    embeddingRequests: v.array(vEmbeddingRequest),
    authFailures: v.array(vAuthFailure),
    botEvents: v.array(vBotEvent),
    keyUsage: v.array(vKeyUsage),
    settlements: v.optional(v.array(vSettlement)),
    alertRules: v.optional(v.array(vAlertRule)),
  },
  returns: v.object({ applied: v.boolean() }),
  handler: async (ctx, args) => {
    const seen = await ctx.db
      .query("logBatches")
      .withIndex("by_batch_id", (q) => q.eq("batchId", args.batchId))
      .first();
    if (seen !== null) return { applied: false };
    await ctx.db.insert("logBatches", { batchId: args.batchId, processedAt: Date.now() });
    await insertAIRequests(ctx, args.aiRequests, args.writer);
    await insertEmbeddingRequests(ctx, args.embeddingRequests);
    await insertAuthFailures(ctx, args.authFailures);
    await insertBotEvents(ctx, args.botEvents);
    await applyKeyUsage(ctx, args.keyUsage, args.writer);
    if (args.settlements !== undefined) {
      const now = Date.now();
      for (const settlement of args.settlements) await applySettlement(ctx, settlement, now);
    }
    if (args.alertRules !== undefined && args.alertRules.length > 0) {
      await evaluateAlerts(ctx, args.alertRules, args, Date.now());
    }
    return { applied: true };
  },
});
