"""convex-guard: bot detection, rate limits, API keys and AI request logs for Python web apps."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from convex_guard.core.clientip import TrustedProxies, client_ip, ip_key
from convex_guard.core.errors import (
    ConfigurationError,
    ConvexAuthError,
    ConvexFunctionNotFoundError,
    ConvexValidationError,
    GuardError,
    StoreAnswerError,
    StoreConflictError,
    StoreError,
    StoreOverloadedError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from convex_guard.core.estimates import TokenEstimate
from convex_guard.core.fingerprint import DEFAULT_FIELDS as FINGERPRINT_FIELDS
from convex_guard.core.fingerprint import fingerprint
from convex_guard.core.keys import NO_KEY, generate_key, hash_key
from convex_guard.core.limits import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    FixedWindow,
    LimitConfig,
    LimitResult,
    TokenBucket,
)
from convex_guard.core.presets import seed_limits
from convex_guard.core.settings import GuardEnvironment, load_environment
from convex_guard.core.useragent import (
    BOT_CATEGORIES,
    BotCategory,
    UserAgentClassifier,
    UserAgentVerdict,
    classify_user_agent,
    classify_user_agent_uncached,
)
from convex_guard.middleware.apikeys import ApiKeyMiddleware, KeyRoute
from convex_guard.middleware.botdetection import DEFAULT_POLICY as DEFAULT_BOT_POLICY
from convex_guard.middleware.botdetection import BotDetectionMiddleware
from convex_guard.middleware.context import GuardContext, guard_context
from convex_guard.middleware.fingerprint import FingerprintMiddleware
from convex_guard.middleware.guard import GuardMiddleware, GuardSettings, default_key_routes
from convex_guard.middleware.logger import RequestLoggerMiddleware, provider_from_path, report_usage
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.middleware.ratelimit import RateLimitMiddleware
from convex_guard.middleware.rules import Rule, preset_rules
from convex_guard.middleware.validation import (
    BodyRule,
    RequestValidationMiddleware,
    default_body_rules,
)
from convex_guard.stores.base import (
    AIRequestLog,
    AnalyticsStore,
    ApiKeyList,
    ApiKeyRecord,
    AuthFailure,
    BotCheck,
    BotEvent,
    BotStore,
    BotVerdict,
    CheckResult,
    EmbeddingRequestLog,
    EmbeddingUsage,
    KeyQuota,
    KeyRateLimit,
    KeyStore,
    LimitRequest,
    LimitStore,
    LogBatch,
    LogStore,
    ProviderStats,
    Store,
)
from convex_guard.stores.convex import ConvexStore
from convex_guard.stores.keys import (
    ApiKeys,
    CreatedKey,
    KeyNotFoundError,
    KeyRevokedError,
    Verification,
)
from convex_guard.stores.memory import MemoryStore
from convex_guard.stores.resilient import CircuitBreaker, CircuitOpenError, ResilientStore

try:
    __version__ = _version("convex-guard")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BOT_CATEGORIES",
    "DAY",
    "DEFAULT_BOT_POLICY",
    "FINGERPRINT_FIELDS",
    "HOUR",
    "MINUTE",
    "NO_KEY",
    "SECOND",
    "AIRequestLog",
    "AnalyticsStore",
    "ApiKeyList",
    "ApiKeyMiddleware",
    "ApiKeyRecord",
    "ApiKeys",
    "AuthFailure",
    "BodyRule",
    "BotCategory",
    "BotCheck",
    "BotDetectionMiddleware",
    "BotEvent",
    "BotStore",
    "BotVerdict",
    "CheckResult",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConfigurationError",
    "ConvexAuthError",
    "ConvexFunctionNotFoundError",
    "ConvexStore",
    "ConvexValidationError",
    "CreatedKey",
    "EmbeddingRequestLog",
    "EmbeddingUsage",
    "FingerprintMiddleware",
    "FixedWindow",
    "GuardContext",
    "GuardEnvironment",
    "GuardError",
    "GuardMiddleware",
    "GuardSettings",
    "KeyNotFoundError",
    "KeyQuota",
    "KeyRateLimit",
    "KeyRevokedError",
    "KeyRoute",
    "KeyStore",
    "LimitConfig",
    "LimitRequest",
    "LimitResult",
    "LimitStore",
    "LogBatch",
    "LogStore",
    "LogWriter",
    "MemoryStore",
    "ProviderStats",
    "RateLimitMiddleware",
    "RequestLoggerMiddleware",
    "RequestValidationMiddleware",
    "ResilientStore",
    "Rule",
    "Store",
    "StoreAnswerError",
    "StoreConflictError",
    "StoreError",
    "StoreOverloadedError",
    "StoreTimeoutError",
    "StoreUnavailableError",
    "TokenBucket",
    "TokenEstimate",
    "TrustedProxies",
    "UserAgentClassifier",
    "UserAgentVerdict",
    "Verification",
    "__version__",
    "classify_user_agent",
    "classify_user_agent_uncached",
    "client_ip",
    "default_body_rules",
    "default_key_routes",
    "fingerprint",
    "generate_key",
    "guard_context",
    "hash_key",
    "ip_key",
    "load_environment",
    "preset_rules",
    "provider_from_path",
    "report_usage",
    "seed_limits",
]
