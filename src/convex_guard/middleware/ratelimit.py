"""Rate limiting: every rule matching a request is decided in one atomic store call."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import cast

from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope

from convex_guard.core.errors import ConfigurationError
from convex_guard.core.logs import ThrottledLog, logger, printable
from convex_guard.core.problem import QUOTA_TITLE, quota_exceeded, retry_after, unavailable
from convex_guard.middleware.context import (
    GuardContext,
    PendingBot,
    Route,
    current_context,
    guard_context,
    route_of,
)
from convex_guard.middleware.order import API_KEYS, FINGERPRINT, RATE_LIMIT, missing_outside
from convex_guard.middleware.rules import (
    RateLimitItems,
    Rule,
    closest_to_exhaustion,
    ratelimit_field,
    ratelimit_template,
)
from convex_guard.middleware.steps import Before, Refusal, StepMiddleware
from convex_guard.stores.base import LimitRequest, LimitStore, require
from convex_guard.stores.resilient import answers_checked, checked_answer

DEFAULT_TIMEOUT = 0.5
_MATCH_CACHE_SIZE = 1024


class RateLimitMiddleware(StepMiddleware):
    """Decide all matching `rules` together: all pass and are consumed, or none is consumed.

    A denied request gets 429 with `Retry-After`, the IETF `RateLimit-Policy`/`RateLimit`
    fields and a problem+json body naming the violated policies; an admitted one on a limited
    route carries the two fields. A store error, an answer of the wrong shape or a call slower
    than `timeout` seconds follows each matching rule's fail policy: closed answers 503, open
    lets the request through. A `ResilientStore` bounds its calls itself (and falls back to
    this process), so no second timer is put around it.

    A bot check that `BotDetectionMiddleware(defer=True)` left in the guard context is decided
    in the same store call, so a request costs one round trip whatever it triggers.

    `ratelimit_items="closest"` puts only the policy with the least quota remaining in an
    admitted request's two fields (the draft allows a single item, as express-rate-limit
    sends): fewer bytes on every response, which a server validates byte by byte. The
    default, `"all"`, lists every policy that applied.
    """

    marker = RATE_LIMIT

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: LimitStore,
        rules: Sequence[Rule],
        timeout: float = DEFAULT_TIMEOUT,
        ratelimit_items: RateLimitItems = "all",
    ) -> None:
        if not rules:
            raise ConfigurationError("RateLimitMiddleware needs at least one rule")
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"Rule names must be unique: {names}")
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if ratelimit_items not in ("all", "closest"):
            raise ConfigurationError("ratelimit_items must be 'all' or 'closest'")
        require(store, (LimitStore,), "RateLimitMiddleware")
        super().__init__(app)
        self.store = store
        self.rules = tuple(rules)
        self.timeout = timeout
        # A MemoryStore never waits and a ResilientStore owns the timeout; both answer in the
        # right shape. Any other store gets a timer and its answers checked.
        self._bounded = not answers_checked(store)
        self._store_trouble = ThrottledLog()
        # Which rules match a (method, path): the same few routes come back on every request.
        self._matches: dict[tuple[str, str], _Matched] = {}
        # Each rule's two fields alone, for `ratelimit_items="closest"`.
        self._single: dict[str, tuple[bytes, bytes]] | None = (
            {rule.name: _fields((rule,))[1:] for rule in rules}
            if ratelimit_items == "closest"
            else None
        )

    def context(self, scope: Scope) -> GuardContext | None:
        """The guard context, none made (the request goes to the app) when no rule matches."""
        ctx = current_context(scope)
        if ctx is None:
            route = route_of(scope)
            if not self._matching(route).rules:
                return None
            ctx = guard_context(scope, route)
        return ctx

    def _matching(self, route: Route) -> _Matched:
        """The rules matching the request's (method, path), cached: the same routes come back."""
        matched = self._matches.get(route)
        if matched is None:
            method, path = route
            matched = _Matched(tuple(rule for rule in self.rules if rule.matches(path, method)))
            if len(self._matches) >= _MATCH_CACHE_SIZE:
                self._matches.clear()  # many distinct paths: start over, memory stays bounded
            self._matches[route] = matched
        return matched

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        """What the request asks of the store: None when nothing, else the decision to await.

        A deferred bot check (`ctx.pending_bot`) is decided in the same store call.
        """
        matched = self._matching(ctx.route)
        pending = ctx.pending_bot
        if not matched.rules and pending is None:
            return None

        rules: Sequence[Rule]
        limits: Sequence[LimitRequest]
        fixed = matched.fixed
        if fixed is not None:
            rules, limits = matched.rules, fixed
        else:
            rules, limits, refusal = self._wanted(scope, receive, ctx, matched)
            if refusal is not None:
                return refusal
        if not rules and pending is None:
            return None
        return self._decide(scope, ctx, matched, rules, limits, pending)

    async def _decide(
        self,
        scope: Scope,
        ctx: GuardContext,
        matched: _Matched,
        rules: Sequence[Rule],
        limits: Sequence[LimitRequest],
        pending: PendingBot | None,
    ) -> Refusal | None:
        """Decide the limits (and the deferred bot check) in one store call: the refusal, or
        None with the `RateLimit-Policy`/`RateLimit` fields in `ctx.response_headers`."""
        try:
            bot = pending.check if pending is not None else None
            if self._bounded:
                async with asyncio.timeout(self.timeout):
                    answered = await self.store.check(limits, bot=bot)
                outcome = checked_answer(answered, len(limits), bot is not None)
            else:
                outcome = await self.store.check(limits, bot=bot)
        except ConfigurationError as exc:
            # Only a cost function can get here (constant costs are checked at start-up):
            # a request costing more than a limit can ever hold is never admitted.
            logger.warning("Rate limit: request cost refused: %s", exc)
            ctx.rejected = "rate_limited:cost"
            return quota_exceeded(
                "Request cost exceeds what the quota can ever admit",
                [rule.name for rule in rules],
            )
        except Exception as exc:
            self._store_trouble.warning(
                "Rate-limit store unavailable (%s): %r", printable(scope["path"]), exc
            )
            if pending is not None:
                # The bot middleware's own fail policy, as when it asks the store itself.
                refusal = pending.respond(None)
                if refusal is not None:
                    return refusal
            if any(rule.fail == "closed" for rule in rules):
                return self._unavailable(ctx)
            return None

        if pending is not None and outcome.bot is not None:
            answer = pending.respond(outcome.bot)
            if answer is not None:
                return answer
        if not rules:
            return None
        results = outcome.results
        limits_seen = ctx.limits
        for rule, result in zip(rules, results):  # noqa: B905 (`checked_answer` checks lengths)
            limits_seen[rule.name] = result
        # The route's fields, computed once for all its rules and once per subset of them
        # (an anonymous caller skips the per-user rule on every request).
        policy, policy_bytes, template = (
            matched.fields if rules is matched.rules else matched.subset(rules)
        )
        if not outcome.ok:
            violated = [
                (rule, result) for rule, result in zip(rules, results, strict=True) if not result.ok
            ]
            retry_ms = max(result.retry_after or 0.0 for _, result in violated)
            retry = retry_after(retry_ms)
            names = [rule.name for rule, _ in violated]
            ctx.rejected = "rate_limited:" + ",".join(names)
            return quota_exceeded(
                QUOTA_TITLE,
                names,
                retry=retry,
                detail=f"Quota exceeded for {', '.join(names)}; retry after {retry} s.",
                headers=[
                    ("RateLimit-Policy", policy),
                    (
                        "RateLimit",
                        ratelimit_field(
                            ratelimit_template(names), [result for _, result in violated]
                        ).decode("latin-1"),
                    ),
                ],
            )
        single = self._single
        if single is not None:
            closest = closest_to_exhaustion(results)
            policy_bytes, template = single[rules[closest].name]
            results = (results[closest],)
        fields = [
            (b"ratelimit-policy", policy_bytes),
            (b"ratelimit", ratelimit_field(template, results)),
        ]
        added = ctx.response_headers
        if added is None:
            ctx.response_headers = fields
        else:
            added += fields
        return None

    def _wanted(
        self, scope: Scope, receive: Receive, ctx: GuardContext, matched: _Matched
    ) -> tuple[Sequence[Rule], list[LimitRequest], ASGIApp | None]:
        """The rules that apply to this request and what each asks of the store."""
        get_request = _lazy_request(scope, receive) if matched.needs_request else _no_request

        rules: list[Rule] = []
        limits: list[LimitRequest] = []
        for rule in matched.rules:
            try:
                wanted = rule.limit_request(scope, ctx, get_request)
            except Exception:
                # A bug in the app's key or cost function: its fail policy decides.
                logger.exception("Rate-limit rule %r: key or cost function failed", rule.name)
                if rule.fail == "closed":
                    return rules, limits, self._unavailable(ctx)
                continue
            if wanted is not None:
                rules.append(rule)
                limits.append(wanted)
        # All applied (the common case): the matched tuple itself, whose policy is cached.
        applied = matched.rules
        return (applied if len(rules) == len(applied) else rules), limits, None

    def order_problem(self, outside: list[str]) -> str | None:
        """Rules keyed by what an outer middleware fills need that middleware outside."""
        for kind, needs in (("api_key", API_KEYS), ("fingerprint", FINGERPRINT)):
            names = [rule.name for rule in self.rules if rule.key == kind]
            if names:
                problem = missing_outside(
                    outside, RATE_LIMIT, needs, f"has {kind!r} rules ({', '.join(names)})"
                )
                if problem is not None:
                    return problem
        return None

    def _unavailable(self, ctx: GuardContext) -> ASGIApp:
        ctx.rejected = "rate_limit_unavailable"
        return unavailable(
            "Rate limiting is unavailable",
            "The rate-limit store did not answer in time; try again shortly.",
        )


#: A set of rules' `RateLimit-Policy` field, as text and bytes, and its `RateLimit` template.
_Fields = tuple[str, bytes, bytes]


class _Matched:
    """The rules matching one route, with what can be computed once for them."""

    __slots__ = ("_subsets", "fields", "fixed", "needs_request", "rules")

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        # Only a key or cost function reads the request: the others need no `Request` made.
        self.needs_request = any(callable(rule.key) or callable(rule.count) for rule in rules)
        self.fields = _fields(rules)
        # At most one entry per subset of the route's few rules.
        self._subsets: dict[tuple[str, ...], _Fields] = {}
        requests = [rule.fixed_request for rule in rules]
        # Global rules with constant costs ask the same of the store on every request.
        self.fixed: tuple[LimitRequest, ...] | None = (
            tuple(r for r in requests if r is not None)
            if all(r is not None for r in requests)
            else None
        )

    def subset(self, rules: Sequence[Rule]) -> _Fields:
        """The fields of the rules that applied to one request, when not all of them did."""
        names = tuple([rule.name for rule in rules])
        fields = self._subsets.get(names)
        if fields is None:
            fields = self._subsets[names] = _fields(rules)
        return fields


def _fields(rules: Sequence[Rule]) -> _Fields:
    policy = ", ".join([rule.policy_header for rule in rules])
    return policy, policy.encode("latin-1"), ratelimit_template([rule.name for rule in rules])


def _lazy_request(scope: Scope, receive: Receive) -> Callable[[], Request]:
    """The request's `Request`, made on first use and shared by every rule that asks.

    A WebSocket handshake has no body to read: its key and cost functions get the
    handshake's `HTTPConnection` (headers, path, client, state), which is what they read.
    """
    request: Request | None = None

    def get_request() -> Request:
        nonlocal request
        if request is None:
            request = (
                Request(scope, receive)
                if scope["type"] == "http"
                else cast(Request, HTTPConnection(scope, receive))
            )
        return request

    return get_request


def _no_request() -> Request:
    raise AssertionError("no rule of this route reads the request")
