import { afterEach, describe, expect, test, vi } from "vitest";
import { AI_LIMITS, aiLimits } from "../convex/ai/rateLimiting";
import limitsJson from "../limits.json";

describe("the seed's named limits", () => {
  afterEach(() => {
    vi.unstubAllEnvs();
  });

  test("limits.json equals AI_LIMITS (regenerate with `npm run limits:json`)", () => {
    expect(limitsJson).toEqual(AI_LIMITS);
  });

  test("the seed's table, as in docs/architecture.md", () => {
    expect(Object.keys(AI_LIMITS)).toHaveLength(15);
    expect(AI_LIMITS.globalAIRequests).toEqual({ kind: "fixed window", rate: 10000, period: 3_600_000 });
    expect(AI_LIMITS.failedAuth).toEqual({ kind: "token bucket", rate: 10, period: 3_600_000, capacity: 10 });
  });

  test("the seed's environment variables shape globalAIRequests", () => {
    vi.stubEnv("RATE_LIMIT_GLOBAL_REQUESTS", "500");
    vi.stubEnv("RATE_LIMIT_WINDOW_HOURS", "2");
    vi.stubEnv("RATE_LIMIT_SHARDS", "4");
    expect(aiLimits().globalAIRequests).toEqual({
      kind: "fixed window",
      rate: 500,
      period: 7_200_000,
      shards: 4,
    });
    vi.stubEnv("RATE_LIMIT_SHARDS", "zero");
    expect(() => aiLimits()).toThrow(/RATE_LIMIT_SHARDS/);
  });
});
