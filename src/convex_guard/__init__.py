"""convex-guard: bot detection, rate limits, API keys and AI request logs for Python web apps."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from ._apikeys import (
    NO_KEY,
    ApiKeys,
    CreatedKey,
    KeyNotFoundError,
    KeyRevokedError,
    Verification,
    generate_key,
    hash_key,
)
from ._clientip import TrustedProxies, client_ip, ip_key
from ._context import GuardContext, guard_context
from ._convex import ConvexStore
from ._errors import (
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
from ._fingerprint import DEFAULT_FIELDS as FINGERPRINT_FIELDS
from ._fingerprint import fingerprint
from ._limits import DAY, HOUR, MINUTE, SECOND, FixedWindow, LimitConfig, LimitResult, TokenBucket
from ._logwriter import LogWriter
from ._memory import MemoryStore
from ._presets import seed_limits
from ._resilience import CircuitBreaker, CircuitOpenError, ResilientStore
from ._rules import Rule, preset_rules
from ._settings import GuardEnvironment, load_environment
from ._store import (
    AIRequestLog,
    ApiKeyList,
    ApiKeyRecord,
    AuthFailure,
    BotCheck,
    BotEvent,
    BotVerdict,
    CheckResult,
    EmbeddingRequestLog,
    EmbeddingUsage,
    KeyRateLimit,
    LimitRequest,
    LogBatch,
    ProviderStats,
    Store,
)
from ._useragent import (
    BOT_CATEGORIES,
    BotCategory,
    UserAgentClassifier,
    UserAgentVerdict,
    classify_user_agent,
    classify_user_agent_uncached,
)
from .middleware.apikeys import ApiKeyMiddleware, KeyRoute
from .middleware.botdetection import DEFAULT_POLICY as DEFAULT_BOT_POLICY
from .middleware.botdetection import BotDetectionMiddleware
from .middleware.fingerprint import FingerprintMiddleware
from .middleware.guard import GuardMiddleware, GuardSettings, default_key_routes
from .middleware.logger import RequestLoggerMiddleware, provider_from_path, report_usage
from .middleware.ratelimit import RateLimitMiddleware

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
    "ApiKeyList",
    "ApiKeyMiddleware",
    "ApiKeyRecord",
    "ApiKeys",
    "AuthFailure",
    "BotCategory",
    "BotCheck",
    "BotDetectionMiddleware",
    "BotEvent",
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
    "KeyRateLimit",
    "KeyRevokedError",
    "KeyRoute",
    "LimitConfig",
    "LimitRequest",
    "LimitResult",
    "LogBatch",
    "LogWriter",
    "MemoryStore",
    "ProviderStats",
    "RateLimitMiddleware",
    "RequestLoggerMiddleware",
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
    "TrustedProxies",
    "UserAgentClassifier",
    "UserAgentVerdict",
    "Verification",
    "__version__",
    "classify_user_agent",
    "classify_user_agent_uncached",
    "client_ip",
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
