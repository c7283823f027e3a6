// Validators shared by the schema and the functions.
import { v, type Infer } from "convex/values";

export const vDetectionType = v.union(
  v.literal("bot_useragent"),
  v.literal("ai_scraper"),
  v.literal("suspicious_pattern"),
  v.literal("rate_limit"),
);

export const vBotAction = v.union(
  v.literal("blocked"),
  v.literal("challenged"),
  v.literal("allowed"),
);
export type BotAction = Infer<typeof vBotAction>;

/** Flat JSON-like metadata stored with a bot event. */
export const vMetadata = v.record(
  v.string(),
  v.union(v.string(), v.number(), v.boolean(), v.null()),
);

export const vKind = v.union(v.literal("ai"), v.literal("embedding"));
export type KeyKind = Infer<typeof vKind>;

/**
 * One rate limit's configuration, exactly the component's own config object
 * (`@convex-dev/rate-limiter` `configValidator`) without `applyUpdates`: the hot path
 * decides transactionally, never asynchronously.
 */
export const vTokenBucket = v.object({
  kind: v.literal("token bucket"),
  rate: v.number(),
  period: v.number(),
  capacity: v.optional(v.number()),
  maxReserved: v.optional(v.number()),
  shards: v.optional(v.number()),
  start: v.optional(v.null()),
});
export const vFixedWindow = v.object({
  kind: v.literal("fixed window"),
  rate: v.number(),
  period: v.number(),
  capacity: v.optional(v.number()),
  maxReserved: v.optional(v.number()),
  shards: v.optional(v.number()),
  start: v.optional(v.number()),
});
export const vLimitConfig = v.union(vTokenBucket, vFixedWindow);
export type LimitConfig = Infer<typeof vLimitConfig>;

export const vLimitRequest = v.object({
  name: v.string(),
  key: v.optional(v.string()),
  count: v.optional(v.number()),
  reserve: v.optional(v.boolean()),
  config: vLimitConfig,
});
export type LimitRequest = Infer<typeof vLimitRequest>;

/** A limit's answer: the decision and the limit's state (`value` tokens at `ts`) after it. */
export const vLimitResult = v.object({
  ok: v.boolean(),
  retryAfter: v.optional(v.number()),
  value: v.number(),
  ts: v.number(),
});
export type LimitResult = Infer<typeof vLimitResult>;

/**
 * A lease on an unkeyed limit: take `want` tokens, or if that is refused `need` (the request's
 * own count), else refuse with `retryAfter`. A negative `want` hands tokens back (for a fixed
 * window only while `window`, the `ts` the tokens were granted in, is still the current one).
 */
export const vLeaseRequest = v.object({
  name: v.string(),
  config: vLimitConfig,
  want: v.number(),
  need: v.number(),
  window: v.optional(v.number()),
});
export type LeaseRequest = Infer<typeof vLeaseRequest>;

/** A lease's answer: the tokens granted (negative: returned) and the limit's state after. */
export const vLeaseResult = v.object({
  granted: v.number(),
  retryAfter: v.optional(v.number()),
  value: v.number(),
  ts: v.number(),
});
export type LeaseResult = Infer<typeof vLeaseResult>;

/**
 * A flagged request. `action` is the category policy's own action; `limit` (the
 * `suspiciousBehavior` limit per fingerprint) is consumed when the history still allows the
 * bot, and a denial challenges it. `clientKey` is the client address's limit key (an IPv6
 * client's /64): its history escalates too, whatever headers the fingerprint is made of.
 */
export const vBotCheck = v.object({
  fingerprint: v.string(),
  ip: v.string(),
  userAgent: v.string(),
  detectionType: vDetectionType,
  action: vBotAction,
  metadata: v.optional(vMetadata),
  limit: v.optional(vLimitRequest),
  clientKey: v.optional(v.string()),
});
export type BotCheck = Infer<typeof vBotCheck>;

export const vBotVerdict = v.object({ action: vBotAction, previousEvents: v.number() });

/** A recorded decision; `ip` is the address, `clientKey` its limit key (absent on old rows). */
export const vBotEvent = v.object({
  timestamp: v.number(),
  fingerprint: v.string(),
  ip: v.string(),
  userAgent: v.string(),
  detectionType: vDetectionType,
  action: vBotAction,
  metadata: v.optional(vMetadata),
  clientKey: v.optional(v.string()),
});
export type BotEvent = Infer<typeof vBotEvent>;

export const vAIRequest = v.object({
  timestamp: v.number(),
  provider: v.string(),
  model: v.string(),
  userId: v.optional(v.string()),
  fingerprint: v.string(),
  ip: v.string(),
  success: v.boolean(),
  error: v.optional(v.string()),
  tokensUsed: v.optional(v.number()),
  latencyMs: v.number(),
  cost: v.optional(v.number()),
  // A streamed answer's time to its first output (absent otherwise, and on older rows).
  ttftMs: v.optional(v.number()),
  // What a shadow rule (or a guard in shadow mode) would have refused the request for, in
  // `error`'s words; the request went on.
  shadow: v.optional(v.string()),
});
export type AIRequest = Infer<typeof vAIRequest>;

export const vEmbeddingRequest = v.object({
  requestId: v.string(),
  apiKeyHash: v.string(),
  timestamp: v.number(),
  batchSize: v.number(),
  latencyMs: v.number(),
  tokensUsed: v.number(),
  success: v.boolean(),
  error: v.optional(v.string()),
  model: v.string(),
});
export type EmbeddingRequest = Infer<typeof vEmbeddingRequest>;

/**
 * A failed authentication; `clientKey` is the client address's limit key (an IPv6 client's
 * network), absent on rows from before it and from callers that send none.
 */
export const vAuthFailure = v.object({
  keyHash: v.string(),
  timestamp: v.number(),
  ip: v.optional(v.string()),
  userAgent: v.optional(v.string()),
  clientKey: v.optional(v.string()),
});
export type AuthFailure = Infer<typeof vAuthFailure>;

export const vKeyUsage = v.object({
  keyId: v.string(),
  lastUsed: v.number(),
  requests: v.number(),
});
export type KeyUsage = Infer<typeof vKeyUsage>;

/** A key's own limit: `requests` per `period` milliseconds, as a fixed window. */
export const vKeyRateLimit = v.object({ requests: v.number(), period: v.number() });

/**
 * A key's own token limit or budget (its tier, the Python `KeyQuota`): `amount` per `period`
 * milliseconds, a fixed window from the epoch.
 */
export const vKeyQuota = v.object({
  unit: v.union(v.literal("tokens"), v.literal("cost")),
  amount: v.number(),
  period: v.number(),
});

/** What creating a key takes (the Python `NewApiKey`); the record adds what use changes. */
export const newApiKeyFields = {
  kind: vKind,
  keyHash: v.string(),
  prefix: v.string(),
  name: v.string(),
  owner: v.optional(v.string()),
  scopes: v.array(v.string()),
  rateLimit: v.optional(vKeyRateLimit),
  createdAt: v.number(),
  expiresAt: v.optional(v.number()),
  quotas: v.optional(v.array(vKeyQuota)),
};

export const vApiKeyRecord = v.object({
  id: v.string(),
  ...newApiKeyFields,
  lastUsed: v.optional(v.number()),
  requestCount: v.number(),
  active: v.boolean(),
});
export type ApiKeyRecord = Infer<typeof vApiKeyRecord>;

export const vProviderStats = v.object({
  totalRequests: v.number(),
  successRate: v.number(),
  averageLatency: v.number(),
  totalTokens: v.number(),
  totalCost: v.number(),
  // The query stopped at a read cap: the figures cover only part of the range.
  truncated: v.boolean(),
  // Requests a shadow rule would have refused (rows with `shadow`).
  shadowRefusals: v.number(),
});
export type ProviderStats = Infer<typeof vProviderStats>;
