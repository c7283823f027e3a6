"""The seed's named limits (docs/architecture.md, "The seed's limits"), defined once here."""

from __future__ import annotations

from convex_guard.core.limits import HOUR, MINUTE, FixedWindow, LimitConfig, TokenBucket
from convex_guard.core.settings import GuardEnvironment, load_environment

#: The seed's providers, each with its own limit named `<provider>Requests`.
AI_PROVIDERS = ("openai", "openrouter", "groq", "perplexity", "ollama", "lmstudio")


def seed_limits(env: GuardEnvironment | None = None) -> dict[str, LimitConfig]:
    """The seed's table; `globalAIRequests` follows `RATE_LIMIT_*` from the environment.

    `convex/ai/rateLimiting.ts` defines the same table for TypeScript callers, and a test keeps
    the two equal.
    """
    env = env if env is not None else load_environment()
    return {
        "globalAIRequests": FixedWindow(
            rate=env.rate_limit_global_requests,
            period=env.rate_limit_window_hours * HOUR,
            shards=env.rate_limit_shards,
        ),
        "openaiRequests": TokenBucket(rate=500, period=MINUTE, capacity=500),
        "openrouterRequests": TokenBucket(rate=600, period=MINUTE, capacity=600),
        "groqRequests": TokenBucket(rate=300, period=MINUTE, capacity=300),
        "perplexityRequests": TokenBucket(rate=100, period=MINUTE, capacity=100),
        "ollamaRequests": FixedWindow(rate=1000, period=MINUTE),
        "lmstudioRequests": FixedWindow(rate=1000, period=MINUTE),
        "selfHostedEmbeddings": FixedWindow(rate=2000, period=MINUTE),
        "userAIRequests": TokenBucket(rate=100, period=HOUR, capacity=100),
        "ipAIRequests": FixedWindow(rate=1000, period=HOUR),
        "suspiciousBehavior": FixedWindow(rate=5, period=MINUTE),
        "failedAuth": TokenBucket(rate=10, period=HOUR, capacity=10),
        "braveSearchRequests": FixedWindow(rate=100, period=MINUTE),
        "serperRequests": FixedWindow(rate=100, period=MINUTE),
        "duckduckgoRequests": FixedWindow(rate=100, period=MINUTE),
    }
