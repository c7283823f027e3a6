"""Rate-limit rules: which requests a limit applies to, keyed how, and what they cost."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request

from convex_guard.core.clientip import peer_ip
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.limits import LimitConfig, LimitResult, check_count
from convex_guard.core.presets import AI_PROVIDERS, seed_limits
from convex_guard.core.settings import GuardEnvironment
from convex_guard.middleware.context import GuardContext, matched_methods
from convex_guard.stores.base import LimitRequest

KeyKind = Literal["global", "ip", "user", "api_key", "fingerprint"]
#: A key function gets the request and returns the limit's key, or None to skip the rule.
KeyFunction = Callable[[Request], str | None]
CountFunction = Callable[[Request], float]
FailPolicy = Literal["open", "closed"]
#: Which policies an admitted request's `RateLimit` field reports: every one that applied, or
#: only the one with the least quota remaining (the field may carry a single item).
RateLimitItems = Literal["all", "closest"]

_KEY_KINDS = frozenset(("global", "ip", "user", "api_key", "fingerprint"))


def _path_matcher(path: str | re.Pattern[str] | None) -> Callable[[str], bool]:
    if path is None:
        return lambda _: True
    if isinstance(path, re.Pattern):
        return lambda candidate: path.match(candidate) is not None
    if not path.startswith("/"):
        raise ConfigurationError(f"Rule path {path!r} must start with '/'")
    prefix = path.rstrip("/")
    if not prefix:
        return lambda _: True
    boundary = prefix + "/"
    # A prefix on a segment boundary: "/api/ai" covers "/api/ai/x" but not "/api/aix".
    return lambda candidate: candidate == prefix or candidate.startswith(boundary)


@dataclass(frozen=True)
class Rule:
    """One limit applied to matching requests.

    - `path`: a prefix on a segment boundary (`"/api/ai"` matches `/api/ai` and `/api/ai/…`)
      or a compiled regex matched at the start; `None` matches every path.
    - `methods`: HTTP methods, `None` for all. HEAD is matched as GET (Starlette serves it
      with the GET handler), and a WebSocket handshake as the GET it is.
    - Paths are matched as Starlette routes them: without the `root_path` a server or a
      `Mount` puts in front.
    - `key`: `"global"` (one shared limit), `"ip"`, `"user"`, `"api_key"`, `"fingerprint"`, or
      a function of the request. A key that resolves to `None` (an anonymous caller for
      `"user"`) skips the rule for that request.
    - `count`: the request's cost, a number or a function of the request.
    - `fail`: what happens when the store errs or times out: `"open"` lets the request through,
      `"closed"` answers 503.
    """

    name: str
    config: LimitConfig
    key: KeyKind | KeyFunction = "global"
    path: str | re.Pattern[str] | None = None
    methods: Collection[str] | None = None
    count: float | CountFunction = 1.0
    fail: FailPolicy = "open"
    _matches_path: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    _methods: frozenset[str] | None = field(init=False, repr=False, compare=False)
    policy_header: str = field(init=False, repr=False, compare=False)
    fixed_request: LimitRequest | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigurationError("A rule needs a non-empty name")
        if '"' in self.name or "\\" in self.name:
            raise ConfigurationError(f"Rule name {self.name!r} cannot hold quotes or backslashes")
        if not callable(self.key) and self.key not in _KEY_KINDS:
            raise ConfigurationError(
                f"Rule {self.name!r}: key must be one of {sorted(_KEY_KINDS)} or a function"
            )
        if self.fail not in ("open", "closed"):
            raise ConfigurationError(f"Rule {self.name!r}: fail must be 'open' or 'closed'")
        if not callable(self.count):
            check_count(self.name, self.config, self.count, False)
            # Kept as a float: the deciders weigh it against float state on every request,
            # and an int costs a conversion each time.
            object.__setattr__(self, "count", float(self.count))
        methods = None if self.methods is None else matched_methods(self.methods)
        object.__setattr__(self, "_methods", methods)
        object.__setattr__(self, "_matches_path", _path_matcher(self.path))
        window = max(1, math.ceil(self.config.period / 1000))
        fixed = (
            LimitRequest(self.name, self.config, None, self.count)
            if self.key == "global" and not callable(self.count)
            else None
        )
        object.__setattr__(self, "fixed_request", fixed)
        object.__setattr__(
            self,
            "policy_header",
            f'"{self.name}";q={math.floor(self.config.max)};w={window}',
        )

    def matches(self, path: str, method: str) -> bool:
        return (self._methods is None or method in self._methods) and self._matches_path(path)

    def limit_request(
        self, scope: MutableMapping[str, Any], ctx: GuardContext, request: Callable[[], Request]
    ) -> LimitRequest | None:
        """What this rule asks of the store for this request, or None if it does not apply.

        A global rule with a constant cost asks the same thing every time: built once.
        """
        fixed = self.fixed_request
        if fixed is not None:
            return fixed
        applies, value = self.resolve_key(scope, ctx, request)
        if not applies:
            return None
        count = self.count
        return LimitRequest(
            self.name, self.config, value, count(request()) if callable(count) else count
        )

    def resolve_key(
        self, scope: MutableMapping[str, Any], ctx: GuardContext, request: Callable[[], Request]
    ) -> tuple[bool, str | None]:
        """(applies, key) for this request: a rule whose key is unknown does not apply."""
        key = self.key
        if key == "global":
            return True, None
        if key == "ip":
            return True, ctx.client_key or peer_ip(scope)
        if key == "user":
            user = ctx.user_id or authenticated_user(scope)
            return user is not None, user
        if key == "api_key":
            return ctx.api_key_id is not None, ctx.api_key_id
        if key == "fingerprint":
            return ctx.fingerprint is not None, ctx.fingerprint
        assert callable(key)
        value = key(request())
        return value is not None, value


def authenticated_user(scope: MutableMapping[str, Any]) -> str | None:
    """The user Starlette's AuthenticationMiddleware put in the scope, if authenticated."""
    user = scope.get("user")
    if user is not None and getattr(user, "is_authenticated", False):
        identity = getattr(user, "identity", None) or getattr(user, "display_name", None)
        return str(identity) if identity else None
    return None


def ratelimit_template(names: Iterable[str]) -> bytes:
    """The IETF `RateLimit` field of these policies, `%d` where each one's numbers go.

    Built once per route: filling it costs less than formatting each item on every request.
    """
    quoted = [name.replace("%", "%%") for name in names]  # a literal % in a name stays one
    return ", ".join([f'"{name}";r=%d;t=%d' for name in quoted]).encode("latin-1")


def ratelimit_field(template: bytes, results: Iterable[LimitResult]) -> bytes:
    """The `RateLimit` field (draft-ietf-httpapi-ratelimit-headers-11) for `results`.

    `r` is the remaining quota rounded down, `t` the seconds until the limit is full again
    rounded up. `%d` truncates a float, which is floor for these non-negative numbers, and
    `-(-x // 1000)` is a ceil without a call.
    """
    numbers: list[float] = []
    for result in results:
        remaining = result.remaining
        reset = result.reset_after
        numbers.append(remaining if remaining > 0 else 0.0)
        numbers.append(-(-reset // 1000) if reset > 0 else 0.0)
    return template % tuple(numbers)


def closest_to_exhaustion(results: Sequence[LimitResult]) -> int:
    """The index of the result with the least quota remaining: the first of them on a tie."""
    best = 0
    least = results[0].remaining
    for index in range(1, len(results)):
        remaining = results[index].remaining
        if remaining < least:
            best, least = index, remaining
    return best


def preset_rules(env: GuardEnvironment | None = None, *, prefix: str = "/api") -> list[Rule]:
    """The seed's limits as rules over the example gateway's routes.

    `/api/ai/…`: the global limit, per IP and per user; `/api/ai/<provider>/…`: the provider's
    own limit; `/api/embeddings`: the self-hosted embeddings limit; `/api/search/<provider>`:
    the search providers' limits.
    """
    limits = seed_limits(env)
    ai = f"{prefix}/ai"
    rules = [
        Rule("globalAIRequests", limits["globalAIRequests"], path=ai),
        Rule("ipAIRequests", limits["ipAIRequests"], key="ip", path=ai),
        Rule("userAIRequests", limits["userAIRequests"], key="user", path=ai),
    ]
    rules += [Rule(f"{p}Requests", limits[f"{p}Requests"], path=f"{ai}/{p}") for p in AI_PROVIDERS]
    rules.append(
        Rule("selfHostedEmbeddings", limits["selfHostedEmbeddings"], path=f"{prefix}/embeddings")
    )
    rules += [
        Rule(f"{p}Requests", limits[f"{p}Requests"], path=f"{prefix}/search/{s}")
        for p, s in (("braveSearch", "brave"), ("serper", "serper"), ("duckduckgo", "duckduckgo"))
    ]
    return rules
