// The seed's six tables, plus those this project needs to scale (docs/architecture.md, "The
// schema"): provider rollups per writer, key usage per writer, processed log-batch ids.
// The rate limiter component keeps its own tables (see convex.config.ts).
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import { alertFields } from "./lib/alerts";
import { auditFields } from "./lib/audit";
import {
  vAIRequest,
  vAuthFailure,
  vBotEvent,
  vEmbeddingRequest,
  vKeyQuota,
} from "./lib/validators";

// The sums a provider rollup keeps, per minute or per hour, for one writer (one app
// process's log writer): no two instances ever patch the same rollup, and readers sum over
// writers. Rows without a writer come from callers that name none (and from before writers).
const rollup = {
  provider: v.string(),
  writer: v.optional(v.string()),
  requests: v.number(),
  successes: v.number(),
  latencySum: v.number(),
  tokens: v.number(),
  cost: v.number(),
  // For the dashboard (rollups written before it have neither): requests per latency bucket
  // (lib/logs.ts LATENCY_BOUNDS_MS, plus one for the slower) and the requests the guard
  // refused, by reason.
  latencyBuckets: v.optional(v.array(v.number())),
  refusals: v.optional(
    v.object({
      limit: v.number(),
      bot: v.number(),
      key: v.number(),
      budget: v.number(),
      // Refused by request validation; rollups written before it have none.
      body: v.optional(v.number()),
    }),
  ),
  // The requests a shadow rule would have refused, by reason (rollups from before shadow
  // rules have none: zeros).
  shadowRefusals: v.optional(
    v.object({
      limit: v.number(),
      bot: v.number(),
      key: v.number(),
      budget: v.number(),
      body: v.optional(v.number()),
    }),
  ),
};

// A key's requests in one minute or hour from one writer, and its latest use among them.
const keyRollup = {
  keyId: v.string(),
  writer: v.optional(v.string()),
  requests: v.number(),
  lastUsed: v.number(),
};

export default defineSchema({
  // ---- AI services ------------------------------------------------------------------------
  // Row shapes live in lib/validators.ts, shared with the functions that write them. The seed's
  // userId: v.id("users") names a table that does not exist: the app's user id, as a string;
  // its metadata: v.any() is narrowed to flat JSON-like values (what the Python side sends).
  aiRequestLogs: defineTable(vAIRequest)
    .index("by_timestamp", ["timestamp"])
    .index("by_provider", ["provider", "timestamp"])
    .index("by_fingerprint", ["fingerprint", "timestamp"]),

  botDetectionEvents: defineTable(vBotEvent)
    .index("by_timestamp", ["timestamp"])
    .index("by_fingerprint", ["fingerprint", "timestamp"])
    // Escalation per client address (its limit key); rows without one are not in it (0.1's
    // rows until migrations:backfillBotClientKey gives them theirs, which also reads them
    // here, as clientKey undefined).
    .index("by_client_key", ["clientKey", "timestamp"]),

  // AI API keys. `key` is the seed's name for the SHA-256 hash of the key (never the key).
  apiKeys: defineTable({
    key: v.string(),
    prefix: v.string(),
    name: v.string(),
    userId: v.optional(v.string()),
    scopes: v.array(v.string()),
    // `period` in milliseconds (the rate limiter's unit; the seed's comment said seconds).
    rateLimit: v.optional(v.object({ requests: v.number(), period: v.number() })),
    // The key's tier: its own token limits and budgets (absent on keys from before them).
    quotas: v.optional(v.array(vKeyQuota)),
    createdAt: v.number(),
    lastUsed: v.optional(v.number()),
    expiresAt: v.optional(v.number()),
    requestCount: v.number(),
    active: v.boolean(),
  })
    .index("by_key", ["key"])
    .index("by_user", ["userId"]),

  // ---- Embeddings service -------------------------------------------------------------------
  embeddingApiKeys: defineTable({
    keyHash: v.string(), // SHA-256
    prefix: v.string(),
    name: v.string(),
    userId: v.optional(v.string()),
    scopes: v.array(v.string()),
    createdAt: v.number(),
    expiresAt: v.optional(v.number()),
    lastUsed: v.optional(v.number()),
    requestCount: v.number(),
    active: v.boolean(),
    rateLimit: v.optional(v.object({ requests: v.number(), windowSeconds: v.number() })),
    quotas: v.optional(v.array(vKeyQuota)),
  })
    .index("by_key_hash", ["keyHash"])
    .index("by_user", ["userId"]),

  embeddingRequests: defineTable(vEmbeddingRequest)
    .index("by_timestamp", ["timestamp"])
    .index("by_api_key", ["apiKeyHash", "timestamp"]),

  embeddingAuthFailures: defineTable(vAuthFailure)
    .index("by_key", ["keyHash", "timestamp"])
    // For retention: the seed's only index leads with the key.
    .index("by_timestamp", ["timestamp"])
    // For the auth-failure alert per client: its limit key, so an IPv6 client hopping
    // addresses inside its network is one subject. Rows written without a key are stored
    // under their ip (lib/logs.ts); rows stored before keys, under none, are not counted.
    .index("by_client_key", ["clientKey", "timestamp"]),

  // ---- Scale ----------------------------------------------------------------------------------
  // One row per provider per minute per writer (`minute` = epoch ms at the minute's start),
  // kept up to date with every aiRequestLogs insert, so stats over a day read ~1440 rows per
  // active writer, not every log.
  providerRollups: defineTable({ ...rollup, minute: v.number() })
    .index("by_provider_minute", ["provider", "minute", "writer"])
    .index("by_minute", ["minute"]),

  // The same per provider per hour (`hour` = epoch ms at the hour's start): a 30-day range
  // reads ~720 of these per writer plus at most two partial hours of minute rollups.
  providerHourlyRollups: defineTable({ ...rollup, hour: v.number() })
    .index("by_provider_hour", ["provider", "hour", "writer"])
    .index("by_hour", ["hour"]),

  // Use of a key (of either table, by document id) not yet folded into the key's document,
  // one row per writer: a batch patches only its own writer's row, never the key document
  // that every instance and the key's own limit checks read. Records add these up when read;
  // retention folds the rows of writers idle for an hour into the key document.
  apiKeyUsage: defineTable({
    keyId: v.string(),
    writer: v.string(),
    requests: v.number(),
    lastUsed: v.number(),
    updatedAt: v.number(), // server time of the last write, for folding idle rows
  })
    .index("by_key_writer", ["keyId", "writer"])
    .index("by_updated", ["updatedAt"]),

  // Requests per key (of either table, by document id) per minute per writer, written with
  // the key usage of each batch (attributed to the minute of the usage's latest use: a flush
  // holds a few seconds of use), so the dashboard ranks keys within its window. Per writer,
  // like the provider rollups: no two instances patch the same row.
  keyRollups: defineTable({ ...keyRollup, minute: v.number() })
    .index("by_key_minute", ["keyId", "minute", "writer"])
    .index("by_minute", ["minute"]),

  // The same per hour, for windows read in whole hours.
  keyHourlyRollups: defineTable({ ...keyRollup, hour: v.number() })
    .index("by_key_hour", ["keyId", "hour", "writer"])
    .index("by_hour", ["hour"]),

  // Ids of log batches already written: a batch retried after a lost answer lands once.
  logBatches: defineTable({
    batchId: v.string(),
    processedAt: v.number(),
  })
    .index("by_batch_id", ["batchId"])
    .index("by_processed_at", ["processedAt"]),

  // ---- Alerts ---------------------------------------------------------------------------------
  // Anomalies the batch mutation found (lib/alerts.ts), one row per (kind, subject) per
  // cool-down; `owner`/`leaseUntil` hold the delivery claim of one instance.
  alerts: defineTable(alertFields)
    .index("by_kind_subject", ["kind", "subject", "firstSeen"])
    .index("by_last_seen", ["lastSeen"])
    .index("by_status", ["status", "firstSeen"])
    // For retention: the finished alerts (delivered, failed) by when they were last seen.
    .index("by_status_last_seen", ["status", "lastSeen"]),

  // ---- Audit trail ----------------------------------------------------------------------------
  // One append-only row per change of a key (lib/audit.ts), inserted by the mutation making
  // the change. `record` is the key's document id (never the key, its hash or prefix).
  // Kept for ever unless CONVEX_GUARD_AUDIT_RETENTION_DAYS is set (retention.ts).
  auditLog: defineTable(auditFields)
    .index("by_timestamp", ["timestamp"])
    .index("by_record", ["record", "timestamp"]),
});
