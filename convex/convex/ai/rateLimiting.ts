// The seed's named limits (docs/architecture.md, "The seed's limits"), defined once here
// and kept equal to the Python preset through ../../limits.json (a test on each side compares
// against that file).
import { HOUR, MINUTE, RateLimiter, type RateLimitConfig } from "@convex-dev/rate-limiter";
import { components } from "../_generated/api";

/** The seed's table with its defaults (no environment applied). */
export const AI_LIMITS = {
  // Global API limit: RATE_LIMIT_GLOBAL_REQUESTS per RATE_LIMIT_WINDOW_HOURS, RATE_LIMIT_SHARDS.
  globalAIRequests: { kind: "fixed window", rate: 10000, period: HOUR },

  // Per-provider limits: capacity equals rate for predictable bursts.
  openaiRequests: { kind: "token bucket", rate: 500, period: MINUTE, capacity: 500 },
  openrouterRequests: { kind: "token bucket", rate: 600, period: MINUTE, capacity: 600 },
  groqRequests: { kind: "token bucket", rate: 300, period: MINUTE, capacity: 300 },
  perplexityRequests: { kind: "token bucket", rate: 100, period: MINUTE, capacity: 100 },

  // Self-hosted services.
  ollamaRequests: { kind: "fixed window", rate: 1000, period: MINUTE },
  lmstudioRequests: { kind: "fixed window", rate: 1000, period: MINUTE },
  selfHostedEmbeddings: { kind: "fixed window", rate: 2000, period: MINUTE },

  // Per-user / per-IP limits.
  userAIRequests: { kind: "token bucket", rate: 100, period: HOUR, capacity: 100 },
  ipAIRequests: { kind: "fixed window", rate: 1000, period: HOUR },

  // Bot detection.
  suspiciousBehavior: { kind: "fixed window", rate: 5, period: MINUTE },
  failedAuth: { kind: "token bucket", rate: 10, period: HOUR, capacity: 10 },

  // Search providers.
  braveSearchRequests: { kind: "fixed window", rate: 100, period: MINUTE },
  serperRequests: { kind: "fixed window", rate: 100, period: MINUTE },
  duckduckgoRequests: { kind: "fixed window", rate: 100, period: MINUTE },
} as const satisfies Record<string, RateLimitConfig>;

export type AILimitName = keyof typeof AI_LIMITS;

function positiveNumber(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw.trim() === "") return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) {
    throw new Error(`${name} must be a positive number, got ${JSON.stringify(raw)}`);
  }
  return value;
}

/** The table with the seed's environment variables applied to `globalAIRequests`. */
export function aiLimits(): Record<AILimitName, RateLimitConfig> {
  const shards = process.env.RATE_LIMIT_SHARDS;
  const global: RateLimitConfig = {
    kind: "fixed window",
    rate: positiveNumber("RATE_LIMIT_GLOBAL_REQUESTS", AI_LIMITS.globalAIRequests.rate),
    period: positiveNumber("RATE_LIMIT_WINDOW_HOURS", 1) * HOUR,
    ...(shards === undefined || shards.trim() === ""
      ? {}
      : { shards: Math.round(positiveNumber("RATE_LIMIT_SHARDS", 1)) }),
  };
  return { ...AI_LIMITS, globalAIRequests: global };
}

/** For Convex functions that limit by name (`aiRateLimiter.limit(ctx, "openaiRequests")`). */
export const aiRateLimiter = new RateLimiter(components.rateLimiter, aiLimits());
