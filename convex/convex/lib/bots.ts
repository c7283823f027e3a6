// Bot escalation over the last hour of a fingerprint's and a client address's events.
import type { GenericMutationCtx } from "convex/server";
import type { DataModel } from "../_generated/dataModel";
import type { BotAction, BotCheck } from "./validators";

export const ESCALATION_WINDOW_MS = 3_600_000;
export const CHALLENGE_AFTER = 5;
export const BLOCK_AFTER = 10;
/** Reading BLOCK_AFTER + 1 events is enough to decide; the count saturates there. */
export const ESCALATION_READ_CAP = BLOCK_AFTER + 1;

const SEVERITY: Record<BotAction, number> = { allowed: 0, challenged: 1, blocked: 2 };

/**
 * The seed's escalation, never milder than the policy's own action. The request being decided
 * counts as one of the events: the 6th flagged request in an hour is challenged, the 11th
 * blocked (as the Python MemoryStore decides).
 */
export function escalate(policy: BotAction, previousEvents: number): BotAction {
  const events = previousEvents + 1;
  const history: BotAction =
    events > BLOCK_AFTER
      ? "blocked"
      : events > CHALLENGE_AFTER
        ? "challenged"
        : "allowed";
  return SEVERITY[policy] >= SEVERITY[history] ? policy : history;
}

/**
 * Count the last hour's events (bounded) of the fingerprint and, when given, of the client key,
 * and escalate on the larger: the fingerprint is made of headers the client picks, its
 * address is not. If the bot is still allowed and `limitAdmits` is given, consult it (it
 * consumes the bot's own limit): a denial challenges. Store the final decision as a new event
 * with `metadata.previousAttempts`.
 */
export async function recordBotEvent(
  ctx: Pick<GenericMutationCtx<DataModel>, "db">,
  bot: Omit<BotCheck, "limit">,
  now: number,
  limitAdmits?: () => Promise<boolean>,
): Promise<{ action: BotAction; previousEvents: number }> {
  const recent = await ctx.db
    .query("botDetectionEvents")
    .withIndex("by_fingerprint", (q) =>
      q.eq("fingerprint", bot.fingerprint).gte("timestamp", now - ESCALATION_WINDOW_MS),
    )
    .take(ESCALATION_READ_CAP);
  let previousEvents = recent.length;
  const clientKey = bot.clientKey;
  if (clientKey !== undefined && previousEvents < ESCALATION_READ_CAP) {
    const fromClient = await ctx.db
      .query("botDetectionEvents")
      .withIndex("by_client_key", (q) =>
        q.eq("clientKey", clientKey).gte("timestamp", now - ESCALATION_WINDOW_MS),
      )
      .take(ESCALATION_READ_CAP);
    previousEvents = Math.max(previousEvents, fromClient.length);
  }
  let action = escalate(bot.action, previousEvents);
  if (action === "allowed" && limitAdmits !== undefined && !(await limitAdmits())) {
    action = "challenged";
  }
  await ctx.db.insert("botDetectionEvents", {
    timestamp: now,
    fingerprint: bot.fingerprint,
    ip: bot.ip,
    userAgent: bot.userAgent,
    detectionType: bot.detectionType,
    action,
    metadata: { ...(bot.metadata ?? {}), previousAttempts: previousEvents },
    ...(clientKey === undefined ? {} : { clientKey }),
  });
  return { action, previousEvents };
}
