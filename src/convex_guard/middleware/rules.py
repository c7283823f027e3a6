"""Rate-limit rules: which requests a limit applies to, keyed how, and what they cost."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request

from convex_guard.core.clientip import peer_ip
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.estimates import DEFAULT_ESTIMATE, TokenEstimate, check_prices, token_cost
from convex_guard.core.limits import (
    Decision,
    FixedWindow,
    LimitConfig,
    check_count,
    shard_factor,
)
from convex_guard.core.presets import AI_PROVIDERS, seed_limits
from convex_guard.core.settings import GuardEnvironment
from convex_guard.middleware.context import GuardContext, matched_methods
from convex_guard.stores.base import KeyQuota, LimitRequest

KeyKind = Literal["global", "ip", "user", "api_key", "fingerprint"]
#: A key function gets the request and returns the limit's key, or None to skip the rule.
KeyFunction = Callable[[Request], str | None]
CountFunction = Callable[[Request], float]
FailPolicy = Literal["open", "closed"]
#: What a rule counts: requests, tokens (a TPM/TPD limit), or money (a budget).
Unit = Literal["requests", "tokens", "cost"]
#: `estimate(request, payload)`: what a request will use, in the rule's unit, from the request
#: and its body parsed as JSON (`payload`, None when the body is empty or not JSON).
Estimator = Callable[[Request, Any], float]
#: Which policies an admitted request's `RateLimit` field reports: every one that applied, or
#: only the one with the least quota remaining (the field may carry a single item).
RateLimitItems = Literal["all", "closest"]

_KEY_KINDS = frozenset(("global", "ip", "user", "api_key", "fingerprint"))
_UNITS = frozenset(("requests", "tokens", "cost"))
#: The most body a token or cost rule reads to estimate a request (bytes): larger is a 413.
DEFAULT_MAX_BODY = 1024 * 1024
#: The least a budget reserves, so that one spent to exactly zero still refuses a request
#: whose cost is unknown on arrival (a model missing from the price table).
MIN_RESERVATION = 1e-6


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
    - `shadow`: decide and record, never refuse: a request this rule would refuse goes on,
      with the rule's `RateLimit` fields and the log row's `shadow` naming it (how to try a
      new limit on live traffic). The other rules are consumed as if it were not there.
    - `unit`: `"requests"` (the default: `count` per request), `"tokens"` (a token limit, TPM
      or TPD by its period) or `"cost"` (a budget, in the currency of `prices`). A token or
      cost rule reserves an estimate when the request arrives and settles on the usage the
      app reports (`report_usage`) when it ends: see `RateLimitMiddleware`.
    - `estimate`: a token or cost rule's estimate of a request, in its unit: a
      `TokenEstimate` (the default one when None: characters / 4 of the prompt plus the
      `max_tokens` asked for) or a function `estimate(request, payload)` of the request and
      its JSON body. A cost rule's default is the token estimate times the price of the
      body's `model`, or nothing for a model the table does not price.
    - `prices`: a cost rule's price per million tokens by model name, for the estimate and
      for settling a request that reports tokens but no cost.
    - `max_body`: the most body bytes a token or cost rule reads to estimate (413 beyond).
    - `tier`: for a token or cost rule keyed by `"api_key"`: a key whose record holds a
      `KeyQuota` of the rule's unit (its tier) is limited by that quota instead of `config`
      (a fixed window from the epoch), in a state of its own per quota, so a key moved to
      another tier starts that tier's window afresh.
    """

    name: str
    config: LimitConfig
    key: KeyKind | KeyFunction = "global"
    path: str | re.Pattern[str] | None = None
    methods: Collection[str] | None = None
    count: float | CountFunction = 1.0
    fail: FailPolicy = "open"
    shadow: bool = False
    unit: Unit = "requests"
    estimate: TokenEstimate | Estimator | None = field(default=None, compare=False)
    prices: Mapping[str, float] | None = field(default=None, compare=False)
    max_body: int = DEFAULT_MAX_BODY
    tier: bool = False
    _matches_path: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    _methods: frozenset[str] | None = field(init=False, repr=False, compare=False)
    policy_header: str = field(init=False, repr=False, compare=False)
    fixed_request: LimitRequest | None = field(init=False, repr=False, compare=False)
    #: Whether requests reserve an estimate and settle on usage (a token or cost rule): an
    #: attribute, not a property, since every rule of a route is asked on every request.
    settled: bool = field(init=False, repr=False, compare=False)

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
        if self.unit not in _UNITS:
            raise ConfigurationError(f"Rule {self.name!r}: unit must be one of {sorted(_UNITS)}")
        object.__setattr__(self, "settled", self.unit != "requests")
        if self.tier and not (self.unit != "requests" and self.key == "api_key"):
            raise ConfigurationError(
                f"Rule {self.name!r}: tier=True is for token or cost rules keyed by 'api_key'"
            )
        if self.unit == "requests":
            if self.estimate is not None or self.prices is not None:
                raise ConfigurationError(
                    f"Rule {self.name!r}: estimate and prices are for unit='tokens' or 'cost'"
                )
        else:
            self._check_settled()
        if not callable(self.count):
            # A token or cost rule never counts `count` (its estimate is checked per request),
            # so a budget below one unit (0.0005 USD) is a budget, not a misconfiguration.
            if self.unit == "requests":
                check_count(self.name, self.config, self.count, False)
            # Kept as a float: the deciders weigh it against float state on every request,
            # and an int costs a conversion each time.
            object.__setattr__(self, "count", float(self.count))
        methods = None if self.methods is None else matched_methods(self.methods)
        object.__setattr__(self, "_methods", methods)
        object.__setattr__(self, "_matches_path", _path_matcher(self.path))
        fixed = (
            LimitRequest(self.name, self.config, None, self.count)
            if self.key == "global" and not callable(self.count) and self.unit == "requests"
            else None
        )
        object.__setattr__(self, "fixed_request", fixed)
        object.__setattr__(self, "policy_header", policy_item(self.name, self.config, self.unit))

    def _check_settled(self) -> None:
        """A token or cost rule's options, checked once."""
        name = self.name
        if callable(self.count) or self.count != 1.0:
            raise ConfigurationError(
                f"Rule {name!r}: a {self.unit} rule counts its estimate; give estimate=, not count="
            )
        if self.config.max_reserved is not None:
            # A settlement is charged as a count with `reserve`: a cap on what may be
            # reserved would drop a charge past it, and usage would go uncounted.
            raise ConfigurationError(f"Rule {name!r}: a {self.unit} rule cannot have max_reserved")
        estimate = self.estimate
        if (
            estimate is not None
            and not isinstance(estimate, TokenEstimate)
            and not callable(estimate)
        ):
            raise ConfigurationError(
                f"Rule {name!r}: estimate must be a TokenEstimate or a function"
            )
        if self.prices is not None:
            if self.unit != "cost":
                raise ConfigurationError(f"Rule {name!r}: prices are for unit='cost' rules")
            object.__setattr__(self, "prices", check_prices(self.prices))
        if isinstance(self.max_body, bool) or not (
            isinstance(self.max_body, int) and self.max_body >= 1
        ):
            raise ConfigurationError(f"Rule {name!r}: max_body must be a whole number >= 1")

    def estimated(self, request: Callable[[], Request], payload: Any, body: bytes) -> float:
        """What this token or cost rule reserves for a request, in its unit.

        ValueError for an estimate that is not a finite number >= 0 (the app's function).
        """
        estimate = self.estimate
        if estimate is None or isinstance(estimate, TokenEstimate):
            tokens = (estimate or DEFAULT_ESTIMATE).tokens(payload, body)
            if self.unit == "tokens":
                return max(tokens, 1.0)
            model = payload.get("model") if isinstance(payload, dict) else None
            cost = token_cost(self.prices or {}, model if isinstance(model, str) else None, tokens)
            return max(cost or 0.0, MIN_RESERVATION)
        amount = estimate(request(), payload)
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise ValueError(f"estimate returned {type(amount).__name__}, not a number")
        amount = float(amount)
        if not 0 <= amount < math.inf:
            raise ValueError(f"estimate returned {amount!r}, not a finite number >= 0")
        return max(amount, MIN_RESERVATION if self.unit == "cost" else 0.0)

    def fits(self, amount: float, config: LimitConfig | None = None) -> bool:
        """Whether a reservation of `amount` could ever be admitted by `config` (the rule's
        own by default; else the request is a 413 at once: no waiting would make it fit)."""
        config = config or self.config
        return amount <= config.max / shard_factor(config)

    def tier_limit(self, quotas: tuple[KeyQuota, ...]) -> tuple[str, LimitConfig] | None:
        """The state name and config of the key's own quota of this rule's unit, if it has
        one and this rule takes the key's tier."""
        if self.tier:
            for quota in quotas:
                if quota.unit == self.unit:
                    return _tier_limit(self.name, float(quota.amount), float(quota.period))
        return None

    def used(self, usage: Any, model: str | None, prompt: float = 0.0) -> float | None:
        """What a request used in this rule's unit, from its reported `Usage`; None if unknown.

        A budget takes the reported cost, else the reported tokens at the price of the
        reported model (or of the request's `model`). Tokens counted from a stream cut off
        before its usage event are the completion alone: `prompt` (the request's estimate of
        its prompt) is added, as the upstream was sent it and bills it.
        """
        if usage is None:
            return None
        tokens = usage.tokens
        if tokens is not None and usage.completion_only:
            tokens += prompt
        if self.unit == "tokens":
            return None if tokens is None else float(tokens)
        if usage.cost is not None:
            return float(usage.cost)
        if tokens is None or not self.prices:
            return None
        return token_cost(self.prices, usage.model or model, float(tokens))

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
            return True, ip_key(scope, ctx)
        if key == "user":
            user = user_key(scope, ctx)
            return user is not None, user
        if key == "api_key":
            return ctx.api_key_id is not None, ctx.api_key_id
        if key == "fingerprint":
            return ctx.fingerprint is not None, ctx.fingerprint
        assert callable(key)
        value = key(request())
        return value is not None, value


def ip_key(scope: MutableMapping[str, Any], ctx: GuardContext) -> str:
    """An "ip" rule's key: the client key the fingerprint step resolved, else the peer."""
    return ctx.client_key or peer_ip(scope)


def user_key(scope: MutableMapping[str, Any], ctx: GuardContext) -> str | None:
    """A "user" rule's key: the user the API key named, else the authenticated user."""
    return ctx.user_id or authenticated_user(scope)


@functools.lru_cache(maxsize=1024)
def _tier_limit(name: str, amount: float, period: float) -> tuple[str, LimitConfig]:
    # One config (and one state name) per tier, built once: keys of a tier share them.
    return f"{name}|{amount!r}|{period!r}", FixedWindow(rate=amount, period=period, start=0)


def policy_item(name: str, config: LimitConfig, unit: Unit) -> str:
    """One policy of the `RateLimit-Policy` field: quota, window (s) and, unless requests,
    the quota unit."""
    window = max(1, math.ceil(config.period / 1000))
    qu = "" if unit == "requests" else f';qu="{unit}"'
    return f'"{name}";q={math.floor(config.max)};w={window}{qu}'


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


def ratelimit_field(template: bytes, decisions: Iterable[Decision]) -> bytes:
    """The `RateLimit` field (draft-ietf-httpapi-ratelimit-headers-11) for `decisions`.

    Read off the flat numbers the store decided (`LimitResult.decision` for a result), so an
    admitted request makes no result object. `r` is the remaining quota rounded down, `t`
    the seconds until the limit is full again rounded up (`-(-x // 1000)`: exact, where
    `ceil(x / 1000)` would round the quotient first). Both go to `%d` as ints: it formats an
    int directly and a float through a conversion and a string of its own, which costs more
    than the `floor`.
    """
    numbers: list[int] = []
    for _, _, remaining, reset in decisions:
        numbers.append(math.floor(remaining) if remaining > 0 else 0)
        numbers.append(math.floor(-(-reset // 1000)) if reset > 0 else 0)
    return template % tuple(numbers)


def closest_to_exhaustion(decisions: Sequence[Decision]) -> int:
    """The index of the decision with the least quota remaining: the first of them on a tie."""
    best = 0
    least = decisions[0][2]
    for index in range(1, len(decisions)):
        remaining = decisions[index][2]
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
