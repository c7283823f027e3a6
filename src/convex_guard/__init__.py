"""convex-guard: bot detection, rate limits, API keys and AI request logs for Python web apps."""

from ._context import GuardContext, guard_context
from ._errors import ConfigurationError, GuardError, StoreError, StoreTimeoutError
from ._limits import DAY, HOUR, MINUTE, SECOND, FixedWindow, LimitConfig, LimitResult, TokenBucket
from ._memory import MemoryStore
from ._presets import seed_limits
from ._rules import Rule, preset_rules
from ._settings import GuardEnvironment, load_environment
from ._store import CheckResult, LimitRequest, Store
from .middleware.ratelimit import RateLimitMiddleware

__all__ = [
    "DAY",
    "HOUR",
    "MINUTE",
    "SECOND",
    "CheckResult",
    "ConfigurationError",
    "FixedWindow",
    "GuardContext",
    "GuardEnvironment",
    "GuardError",
    "LimitConfig",
    "LimitRequest",
    "LimitResult",
    "MemoryStore",
    "RateLimitMiddleware",
    "Rule",
    "Store",
    "StoreError",
    "StoreTimeoutError",
    "TokenBucket",
    "guard_context",
    "load_environment",
    "preset_rules",
    "seed_limits",
]
