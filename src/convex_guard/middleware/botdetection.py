"""Bot detection: classify the user-agent, escalate per client, record every decision."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope

from convex_guard.core.clientip import UNKNOWN_CLIENT, peer_ip
from convex_guard.core.crawlers import CrawlerVerdict
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.headers import bounded, header_value
from convex_guard.core.limits import LimitConfig
from convex_guard.core.logs import ThrottledLog, logger, printable
from convex_guard.core.presets import seed_limits
from convex_guard.core.problem import ABNORMAL_USAGE, problem, unavailable
from convex_guard.core.settings import GuardEnvironment
from convex_guard.core.useragent import (
    BOT_CATEGORIES,
    BotCategory,
    UserAgentClassifier,
    UserAgentVerdict,
    classify_user_agent,
)
from convex_guard.middleware.botverify import CrawlerVerifier
from convex_guard.middleware.context import GuardContext, PendingBot, Route, request_headers
from convex_guard.middleware.order import BOT, FINGERPRINT, HINT, RATE_LIMIT, missing_outside
from convex_guard.middleware.rules import _path_matcher
from convex_guard.middleware.steps import Before, Refusal, StepMiddleware
from convex_guard.stores.base import (
    BotAction,
    BotCheck,
    BotDetectionType,
    BotStore,
    BotVerdict,
    LimitRequest,
    require,
)
from convex_guard.stores.resilient import answers_checked, checked_answer

#: What to do with a flagged user-agent: refuse it, challenge it, let it through but record
#: the event (so escalation counts it), or let it through unrecorded.
PolicyAction = Literal["block", "challenge", "record", "allow"]

DEFAULT_POLICY: Mapping[BotCategory, PolicyAction] = {
    "ai_crawler": "block",
    "headless": "block",
    "scanner": "block",
    "scraper": "block",
    # API clients are libraries: a curl or python-requests user-agent is normal here.
    "http_library": "allow",
    "search_engine": "record",
    "monitor": "record",
    "preview": "record",
    "other_bot": "record",
    "suspicious": "record",
}
_STORED_ACTION: Mapping[PolicyAction, BotAction] = {
    "block": "blocked",
    "challenge": "challenged",
    "record": "allowed",
    "allow": "allowed",
}
DEFAULT_ALLOW_PATHS = ("/health",)
#: Where load balancers, orchestrators and metrics scrapers poll: a `monitor` user-agent
#: (kube-probe, ELB-HealthChecker, Prometheus, …) is never recorded or escalated there.
DEFAULT_PROBE_PATHS = ("/health", "/healthz", "/readyz", "/livez", "/metrics", "/ping")


def detection_type(category: BotCategory) -> BotDetectionType:
    if category == "ai_crawler":
        return "ai_scraper"
    if category == "suspicious":
        return "suspicious_pattern"
    return "bot_useragent"


class BotDetectionMiddleware(StepMiddleware):
    """Classify each request's user-agent and decide per category and per client.

    A flagged request is checked against the last hour of its fingerprint and of its client
    address (its limit key: an IPv6 client's /64), whichever has more events (more than 5 →
    challenged, more than 10 → blocked): the fingerprint is made of headers the client picks,
    the address is not. Then the `suspiciousBehavior` limit, and the decision is
    stored as a bot detection event, in one store call. Blocked → 403 problem+json; challenged
    → `challenge` (an ASGI app, e.g. a CAPTCHA page) or 429 problem+json of type
    `abnormal-usage-detected`.

    Paths (`allow_paths`: never checked; `probe_paths`: a `monitor` user-agent is let
    through there unrecorded, so a health check is never challenged or blocked, while any
    other bot on them is decided as anywhere) are matched as Starlette routes them. WebSocket
    handshakes are checked like requests and refused before accept.

    `verifier`: checks what a bot claims to be (`CrawlerVerifier`: published crawler
    ranges, forward-confirmed reverse DNS, Web Bot Auth signatures; None: no checks). A
    `spoofed` claim gets `spoofed_action` (default block) whatever its category; a
    `verified` one named in `allow_verified` (a crawler's name or user-agent token such as
    `googlebot` or `GPTBot`, a signed agent's host such as `chatgpt.com`, or `*`) is let
    through unrecorded, and any other verified one follows its category's policy. A valid
    Web Bot Auth signature makes the request a verified bot whatever its user-agent says
    (category `other_bot` when the user-agent is a browser's). The verdict and its evidence
    are in the bot event's metadata (`verification`, `verifiedName`, `method`, `evidence`).

    `classifier`: any callable from a user-agent to a `UserAgentVerdict` (default:
    `classify_user_agent`, cached); it is called on every checked request as it is, so one that
    wants a cache brings its own (`functools.lru_cache(maxsize=4096)`, as the default does).
    One that raises, or answers with a category the policy does not know, is a bug in the app:
    the request follows `fail` (open: let through unchecked; closed: 503) and the failure is
    logged once per interval, never a 500.

    Needs a fingerprint: run `FingerprintMiddleware` outside it (GuardMiddleware does). With
    `defer=True` the check is left in the guard context for the `RateLimitMiddleware` inside to
    decide together with the request's limits: one store round trip per request.

    `shadow=True` decides and records as ever (the bot event says blocked or challenged, and
    escalation counts it) but lets the request through, its log row's `shadow` saying what
    it would have got (`bot_blocked`, `bot_challenged`). The fail policy (`fail="closed"`'s
    503) is not a decision about the client and stays as configured.
    """

    marker = BOT

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: BotStore,
        policy: Mapping[BotCategory, PolicyAction] | None = None,
        classifier: UserAgentClassifier = classify_user_agent,
        allow_user_agents: Iterable[str | re.Pattern[str]] = (),
        allow_ips: Iterable[str] = (),
        allow_paths: Iterable[str] = DEFAULT_ALLOW_PATHS,
        probe_paths: Iterable[str] = DEFAULT_PROBE_PATHS,
        challenge: ASGIApp | None = None,
        suspicious_limit: LimitConfig | None = None,
        timeout: float = 0.5,
        fail: Literal["open", "closed"] = "open",
        defer: bool = False,
        verifier: CrawlerVerifier | None = None,
        allow_verified: Iterable[str] = (),
        spoofed_action: PolicyAction = "block",
        shadow: bool = False,
    ) -> None:
        merged = dict(DEFAULT_POLICY)
        for category, action in (policy or {}).items():
            if category not in BOT_CATEGORIES:
                raise ConfigurationError(f"Unknown bot category {category!r} in policy")
            if action not in _STORED_ACTION:
                raise ConfigurationError(
                    f"Policy for {category!r} must be one of {sorted(_STORED_ACTION)}"
                )
            merged[category] = action
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if fail not in ("open", "closed"):
            raise ConfigurationError("fail must be 'open' or 'closed'")
        if not callable(classifier):
            raise ConfigurationError("classifier must be a callable from user-agent to verdict")
        if spoofed_action not in _STORED_ACTION:
            raise ConfigurationError(f"spoofed_action must be one of {sorted(_STORED_ACTION)}")
        if isinstance(allow_verified, str):
            raise ConfigurationError("allow_verified must be a list, not one string")
        require(store, (BotStore,), "BotDetectionMiddleware")
        super().__init__(app)
        self.verifier = verifier
        self._allow_verified = frozenset(name.lower() for name in allow_verified)
        self._allow_agents_verified = self._allow_verified_agents(verifier)
        self.spoofed_action: PolicyAction = spoofed_action
        self.store = store
        self.policy = merged
        self.classifier = classifier
        # The default classifier's answer on an agent never changes, so a repeated client's
        # headers may carry it (`RequestHeaders.verdict`); a classifier of your own is asked
        # on every request (its answers may change: a blocklist it reloads).
        self._memoize = classifier is classify_user_agent
        self._allow_agents = [
            p if isinstance(p, re.Pattern) else re.compile(p, re.IGNORECASE)
            for p in allow_user_agents
        ]
        try:
            self._allow_networks = [ipaddress.ip_network(n, strict=False) for n in allow_ips]
        except ValueError as exc:
            raise ConfigurationError(f"allow_ips: {exc}") from None
        self._allow_paths = [_path_matcher(p) for p in allow_paths]
        if isinstance(probe_paths, str):
            raise ConfigurationError("probe_paths must be a list, not one string")
        probes = [_path_matcher(p) for p in probe_paths]
        self._is_probe: Callable[[str], bool] = lambda path: any(m(path) for m in probes)
        self.challenge = challenge
        self.suspicious_limit = (
            suspicious_limit or seed_limits(GuardEnvironment())["suspiciousBehavior"]
        )
        self.timeout = timeout
        # No timer around a store that bounds its own calls (a ResilientStore owns the
        # timeout, so a hanging store gets its fallback decisions, not this fail policy).
        self._bounded = not answers_checked(store)
        self.fail = fail
        self.defer = defer
        self.shadow = shadow
        self._trouble = ThrottledLog()
        self._classifier_trouble = ThrottledLog()
        self._warned_no_fingerprint = False

    def applies_to(self, route: Route) -> bool:
        """Everywhere but the allow paths, which are never checked."""
        path = route[1]
        return not any(match(path) for match in self._allow_paths)

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        """The store's decision on a flagged request, to await; None for a person's request
        (the common case, which awaits nothing) and for a check deferred to the rate limiter
        (`ctx.pending_bot`). Runs only off the allow paths (`applies_to`)."""
        headers = ctx.headers or request_headers(scope, ctx)
        ua = ctx.user_agent
        if ua is None:
            ua = ctx.user_agent = headers.user_agent
        signed = None
        verifier = self.verifier
        # The URL is built only for a signed request: most carry no signature at all.
        if verifier is not None and verifier.web_bot_auth and headers.signed:
            method = scope.get("method", "GET")
            signed = verifier.signature(method, _url(scope), scope["headers"])
        try:
            # A repeated client's headers carry the verdict on its agent (see `_memoize`).
            memo = headers.verdict
            if memo is not None and memo[1] is ua and memo[0] is self.classifier:
                verdict: UserAgentVerdict = memo[2]
            else:
                verdict = self.classifier(ua)
                if self._memoize:
                    headers.verdict = (self.classifier, ua, verdict)
            if verdict.is_bot and verdict.category is not None:
                category, agent = verdict.category, verdict.name
            elif signed is not None and signed.status != "pending":
                category, agent = "other_bot", signed.name  # a signed agent in a browser
            else:
                return None
            action = self.policy[category]  # KeyError: a category no policy names
        except Exception as exc:  # a bug in the app's classifier: its fail policy decides
            return self._unclassified(ctx, ua, exc)
        if self._allowlisted(scope, ctx, ua):
            return None
        claim = signed
        if self.verifier is not None and (claim is None or claim.status == "pending"):
            claim = self.verifier.crawler(ua, ctx.client_ip or peer_ip(scope)) or claim
        if claim is not None:
            if claim.status == "verified" and self._allowed_verified(claim):
                ctx.bot_category = category
                return None
            if claim.status == "spoofed":
                action = self.spoofed_action
        ctx.bot_category = category
        if action == "allow":
            return None
        if category == "monitor" and self._is_probe(ctx.route[1]) and claim is None:
            return None  # a health check is what a probe path is for: never escalated

        fingerprint = ctx.fingerprint
        if fingerprint is None:
            if not self._warned_no_fingerprint:
                logger.error(
                    "BotDetectionMiddleware runs without a fingerprint: add FingerprintMiddleware "
                    "outside it (or use GuardMiddleware); escalating per client IP instead"
                )
                self._warned_no_fingerprint = True
            fingerprint = "ip:" + (ctx.client_key or ctx.client_ip or peer_ip(scope))
        client_key = ctx.client_key or peer_ip(scope)
        check = BotCheck(
            fingerprint=fingerprint,
            ip=ctx.client_ip or peer_ip(scope),
            user_agent=bounded(ua),
            detection_type=detection_type(category),
            action=_STORED_ACTION[action],
            metadata=_metadata(category, agent, bounded(scope["path"]), claim),
            limit=LimitRequest("suspiciousBehavior", self.suspicious_limit, key=fingerprint),
            # Escalation counts per address too; not for "unknown", which clients without an
            # address share (one bot's history must not escalate all of them).
            client_key=None if client_key == UNKNOWN_CLIENT else client_key,
        )
        if self.defer:
            ctx.pending_bot = self._pending(ctx, check)
            return None
        return self._decide(ctx, check)

    def _pending(self, ctx: GuardContext, check: BotCheck) -> PendingBot:
        """`check` left for the rate limiter, with how to answer its verdict.

        Its own method: a person's request (the common case) makes no closure over them.
        """

        def respond(outcome: BotVerdict | None) -> Refusal | None:
            if outcome is None:
                return self.unavailable(ctx, check)
            return self._respond(ctx, outcome)

        return PendingBot(check, respond)

    async def _decide(self, ctx: GuardContext, check: BotCheck) -> Refusal | None:
        """Decide `check` in the store now: the refusal to send, or None."""
        try:
            if self._bounded:
                async with asyncio.timeout(self.timeout):
                    answer = await self.store.check((), bot=check)
                outcome = checked_answer(answer, 0, True)
            else:
                outcome = await self.store.check((), bot=check)
        except Exception as exc:
            self._trouble.warning("Bot-detection store unavailable: %r", exc)
            return self.unavailable(ctx, check)
        assert outcome.bot is not None  # `checked_answer`, or a store that checks its own
        return self._respond(ctx, outcome.bot)

    def _unclassified(self, ctx: GuardContext, ua: str, exc: Exception) -> Refusal | None:
        """The fail policy, when the classifier failed: closed refuses with 503."""
        self._classifier_trouble.warning(
            "Bot detection: the user-agent classifier failed on %r (%r); fail=%s applies",
            printable(ua),
            exc,
            self.fail,
        )
        if self.fail != "closed":
            return None
        ctx.rejected = "bot_check_unavailable"
        return unavailable(
            "Bot detection is unavailable",
            "This request could not be checked; try again shortly.",
        )

    def unavailable(self, ctx: GuardContext, check: BotCheck) -> Refusal | None:
        """The fail policy, when the store cannot decide `check`: the refusal, or None.

        The one implementation of it, whether the check was decided here or deferred to the
        rate limiter: closed applies the category's own action (no escalation is known), open
        lets the request through. A category blocked by policy needs no store to be refused.
        """
        if self.fail == "closed" or check.action == "blocked":
            return self._respond(ctx, BotVerdict(check.action, 0))
        return None

    def order_problem(self, outside: list[str]) -> str | None:
        """Escalation is per fingerprint: `FingerprintMiddleware` must run outside."""
        return missing_outside(
            outside, BOT, FINGERPRINT, "escalates per fingerprint and none is computed"
        )

    def inside_problem(self, inside: list[str]) -> str | None:
        """A deferred check needs the rate limiter inside to decide it."""
        if not self.defer or RATE_LIMIT in inside:
            return None
        return (
            f"{BOT}(defer=True) leaves its check to {RATE_LIMIT}, which does not run "
            f"inside it: add {RATE_LIMIT} inside (after) it, or set defer=False. {HINT}"
        )

    def _allowed_verified(self, claim: CrawlerVerdict) -> bool:
        allowed = self._allow_verified
        if not allowed:
            return False
        name = claim.name.lower()
        return "*" in allowed or name in allowed or name in self._allow_agents_verified

    def _allow_verified_agents(self, verifier: CrawlerVerifier | None) -> frozenset[str]:
        """The crawler names whose user-agent tokens `allow_verified` names (`GPTBot` →
        `gptbot`, `Googlebot` → `googlebot`), computed once."""
        if verifier is None:
            return frozenset()
        return frozenset(
            crawler.name
            for crawler in verifier.ranges.crawlers
            if any(agent.lower() in self._allow_verified for agent in crawler.agents)
        )

    def _allowlisted(self, scope: Scope, ctx: GuardContext, ua: str) -> bool:
        if any(pattern.search(ua) for pattern in self._allow_agents):
            return True
        if self._allow_networks:
            try:
                client = ipaddress.ip_network(ctx.client_ip or peer_ip(scope), strict=False)
            except ValueError:
                return False
            return any(
                client.version == network.version and client.subnet_of(network)  # type: ignore[arg-type]
                for network in self._allow_networks
            )
        return False

    def _respond(self, ctx: GuardContext, outcome: BotVerdict) -> Refusal | None:
        action = ctx.bot_action = outcome.action
        if self.shadow:
            if action != "allowed":
                ctx.shadow = "bot_blocked" if action == "blocked" else "bot_challenged"
            return None
        if action == "blocked":
            ctx.rejected = "bot_blocked"
            return problem(
                403,
                "Automated access is not allowed",
                detail="This client was identified as an automated agent.",
            )
        if action == "challenged":
            ctx.rejected = "bot_challenged"
            if self.challenge is not None:
                return self.challenge
            return problem(
                429,
                "Abnormal usage detected",
                type=ABNORMAL_USAGE,
                detail="Too many automated requests from this client; slow down.",
                headers=[("Retry-After", "60")],
            )
        return None


def _metadata(
    category: str, agent: str | None, path: str, claim: CrawlerVerdict | None
) -> dict[str, str | int | float | bool | None]:
    """The bot event's metadata: what was decided about the request, and why."""
    metadata: dict[str, str | int | float | bool | None] = {
        "category": category,
        "agent": agent,
        "path": path,
    }
    if claim is not None:
        metadata["verification"] = claim.status
        metadata["verifiedName"] = bounded(claim.name)
        metadata["method"] = claim.method
        metadata["evidence"] = bounded(claim.evidence)
    return metadata


def _url(scope: Scope) -> str:
    """The request's absolute URL as the client sent it: scheme, Host header, raw path and
    query (what a signature's `@authority` and `@target-uri` are read from)."""
    host = header_value(scope["headers"], b"host")
    if not host:
        server = scope.get("server") or ("localhost", None)
        host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope.get("path", "/")
    query = scope.get("query_string", b"")
    url = f"{scope.get('scheme', 'http')}://{host}{path or '/'}"
    return url + "?" + query.decode("latin-1") if query else url


__all__ = ["DEFAULT_POLICY", "BotDetectionMiddleware", "PolicyAction"]
