"""convex-guard: bot detection, rate limits, API keys and AI request logs for Python web apps."""

from ._errors import ConfigurationError, GuardError, StoreError, StoreTimeoutError
from ._limits import DAY, HOUR, MINUTE, SECOND, FixedWindow, LimitConfig, LimitResult, TokenBucket
from ._memory import MemoryStore
from ._store import CheckResult, LimitRequest, Store

__all__ = [
    "DAY",
    "HOUR",
    "MINUTE",
    "SECOND",
    "CheckResult",
    "ConfigurationError",
    "FixedWindow",
    "GuardError",
    "LimitConfig",
    "LimitRequest",
    "LimitResult",
    "MemoryStore",
    "Store",
    "StoreError",
    "StoreTimeoutError",
    "TokenBucket",
]
