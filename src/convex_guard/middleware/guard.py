"""GuardMiddleware: the five middlewares in the order of docs/architecture.md, one setting."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convex_guard.core.clientip import ForwardedHeader
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.limits import LimitConfig
from convex_guard.core.logs import logger
from convex_guard.core.presets import AI_PROVIDERS
from convex_guard.core.problem import problem, refuse
from convex_guard.core.settings import load_environment, redact_url
from convex_guard.core.useragent import BotCategory, UserAgentClassifier, classify_user_agent
from convex_guard.middleware.apikeys import DEFAULT_CACHE_TTL, ApiKeyMiddleware, KeyRoute
from convex_guard.middleware.botdetection import (
    DEFAULT_ALLOW_PATHS,
    DEFAULT_PROBE_PATHS,
    BotDetectionMiddleware,
    PolicyAction,
)
from convex_guard.middleware.botverify import CrawlerVerifier
from convex_guard.middleware.context import GuardContext, Route, guard_context, remember, route_of
from convex_guard.middleware.fingerprint import FingerprintMiddleware
from convex_guard.middleware.logger import (
    DEFAULT_AI_PATH,
    DEFAULT_EMBEDDINGS_PATH,
    ProviderResolver,
    RequestLoggerMiddleware,
    provider_from_path,
)
from convex_guard.middleware.logwriter import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MAX_BUFFER,
    CompanionFactory,
    LogWriter,
)
from convex_guard.middleware.ratelimit import RateLimitMiddleware
from convex_guard.middleware.rules import RateLimitItems, Rule, _path_matcher, preset_rules
from convex_guard.middleware.steps import Plan, Step, StepRunner
from convex_guard.middleware.validation import (
    BodyRule,
    RequestValidationMiddleware,
    default_body_rules,
)
from convex_guard.stores.base import (
    BotStore,
    KeyStore,
    LimitStore,
    LogStore,
    Store,
    require,
)
from convex_guard.stores.resilient import ResilientStore
from convex_guard.stores.resolve import StoreChoice, resolve_store

FailPolicy = Literal["open", "closed"]

DEFAULT_EXEMPT_PATHS = ("/health",)


def default_key_routes() -> tuple[KeyRoute, ...]:
    """Embeddings need an embedding key; AI routes accept an optional AI key (else anonymous)."""
    return (
        KeyRoute(DEFAULT_EMBEDDINGS_PATH, kind="embedding", required=True),
        KeyRoute(DEFAULT_AI_PATH, kind="ai", required=False),
    )


@dataclass(frozen=True)
class GuardSettings:
    """Everything `GuardMiddleware` (and the WSGI and Django adapters) need, in one object.

    - `store`: a `Store`, or `"env"` (default: `ConvexStore.from_env()` when
      `CONVEX_SELF_HOSTED_URL`/`CONVEX_URL` is set, else a `MemoryStore` with a warning that
      limits are per process), `"memory"` or `"convex"`. A store of your own needs only the
      capabilities the other settings use: `LogStore` always (the request log),
      `LimitStore` for `rules`, `BotStore` for `bot_detection`, `KeyStore` and `LimitStore`
      for `key_routes`; a missing one is named at construction.
    - `rules`: rate-limit rules; `None` = `preset_rules()` (the seed's limits on `/api/ai/…`
      and `/api/embeddings`); `()` = no rate limiting.
    - `key_routes`: where API keys are required or accepted; `()` = no API keys.
    - `trusted_proxies`: IPs/CIDRs whose `X-Forwarded-For` is believed, and `"unix:"` for a
      proxy on the unix socket the server listens on (without it, every request on a unix
      socket has the client key `"unknown"`; the first one logs a warning).
    - `forwarded_header`: the header those proxies append to, `"x-forwarded-for"` (default)
      or `"forwarded"` (RFC 7239); only that one is read.
    - `ipv6_prefix`: IPv6 clients are keyed by this network (default 64: one subscriber's
      allocation). Each /64 of a /48 is a bucket of its own, 65,536 of them; a shorter
      prefix shares a bucket among more subscribers.
    - `bot_policy`, `bot_allow_user_agents`, `bot_allow_ips`, `bot_allow_paths`: bot detection
      (`bot_detection=False` turns it off). `bot_probe_paths`: where a `monitor` user-agent
      (kube-probe, ELB-HealthChecker, Prometheus, …) is let through unrecorded, never
      escalated (`/health`, `/healthz`, `/readyz`, `/livez`, `/metrics`, `/ping`; `()` for
      nowhere); any other bot there is decided as anywhere. `bot_classifier`: any callable
      from user-agent to `UserAgentVerdict` (default `classify_user_agent`, cached; a custom
      one is called as it is, see `BotDetectionMiddleware`).
    - `bot_verify`: check what bots claim to be (published crawler ranges, forward-confirmed
      reverse DNS, Web Bot Auth signatures; see `CrawlerVerifier`), with `bot_verifier` if
      given, else one with the defaults (the system's nameservers). A spoofed claim gets
      `bot_spoofed_action` (default `"block"`); verified crawlers and signed agents named
      in `bot_allow_verified` (`["googlebot", "bingbot", "chatgpt.com"]`, or `["*"]`) are let
      through unrecorded, other verified ones follow their category's policy.
    - `exempt_paths`: skip every check and every log (health checks).
    - Every path is matched as Starlette routes it (without `root_path`), HEAD as GET;
      WebSocket handshakes on guarded paths get the same checks as requests.
    - `ai_path`, `embeddings_path`: what the request log records; `providers`: the provider
      names it records (the `{provider}` segment of `ai_path`); any other is logged as
      `other`, so a client cannot grow the log's rollups with made-up names.
    - `timeout`: seconds any store call on the request path may take; `fail`: the bot check's
      policy when the store cannot answer, and the preset rules' (a rule you pass keeps its own).
    - `store_fallback`: with the env-configured Convex store, decide limits in this process
      while the deployment is down (on by default; off leaves it to each rule's fail policy).
    - `writer_*`: the shared log writer's batching, and the cap on its retry backoff while
      the store is down (`writer_max_backoff` seconds: how soon rows flow after recovery).
      A `ResilientStore` without `on_outage_events` gets the writer's `add`, so bot events
      decided during an outage reach the shared store once it is back.
    - `body_rules`: request validation (`BodyRule`s: body size while it streams, media types,
      JSON well-formedness), the first matching rule per request; `None` =
      `default_body_rules()` (JSON of at most 1 MiB on `/api/ai/…`, `/v1/chat/completions`
      and `/v1/completions`, 8 MiB on `/api/embeddings` and `/v1/embeddings`); `()` = none.
      Refusals (413, 415, 400) are logged, in the request log and counted in escalation.
    - `ratelimit_items`: `"all"` (default) lists every policy that applied in an admitted
      request's `RateLimit-Policy` and `RateLimit` fields; `"closest"` only the one with the
      least quota remaining (see `RateLimitMiddleware`).
    - `alerts`: anomaly alerts (`convex_guard.alerts.AlertSettings`: rules, webhook); the
      store evaluates the rules with each log batch and the deliverer runs beside the log
      writer. The store must be an `AlertStore`. None (default): no alerts.
    - `shadow`: shadow mode for the whole guard: every rate-limit rule is a shadow rule
      (`Rule(shadow=True)`) and bot detection decides and records without refusing, so
      nothing is refused for its rate or its user-agent; the log rows' `shadow` say what
      would have been. API keys stay enforced (a protected route must not turn public; a
      key's own limit and the failed-auth limit are part of them), and so do fail-closed
      policies (a store that cannot answer is not a decision about the client).
    - `provider`: a function of the ASGI scope naming an AI request's provider (None: not
      an AI request), instead of the `{provider}` segment of `ai_path`: for routes such as an
      OpenAI-compatible `/v1/chat/completions`.
    """

    store: LogStore | StoreChoice = "env"
    rules: Sequence[Rule] | None = None
    key_routes: Sequence[KeyRoute] = field(default_factory=default_key_routes)
    trusted_proxies: Sequence[str] = ()
    forwarded_header: ForwardedHeader = "x-forwarded-for"
    ipv6_prefix: int = 64
    bot_detection: bool = True
    bot_policy: Mapping[BotCategory, PolicyAction] | None = None
    bot_classifier: UserAgentClassifier = classify_user_agent
    bot_allow_user_agents: Sequence[str | re.Pattern[str]] = ()
    bot_allow_ips: Sequence[str] = ()
    bot_allow_paths: Sequence[str] = DEFAULT_ALLOW_PATHS
    bot_probe_paths: Sequence[str] = DEFAULT_PROBE_PATHS
    bot_challenge: ASGIApp | None = None
    bot_verify: bool = True
    bot_verifier: CrawlerVerifier | None = None
    bot_allow_verified: Sequence[str] = ()
    bot_spoofed_action: PolicyAction = "block"
    suspicious_limit: LimitConfig | None = None
    exempt_paths: Sequence[str] = DEFAULT_EXEMPT_PATHS
    ai_path: str = DEFAULT_AI_PATH
    embeddings_path: str | None = DEFAULT_EMBEDDINGS_PATH
    providers: Sequence[str] = AI_PROVIDERS
    timeout: float = 0.5
    fail: FailPolicy = "open"
    key_cache_ttl: float = DEFAULT_CACHE_TTL
    writer_batch_size: int = DEFAULT_BATCH_SIZE
    writer_interval: float = DEFAULT_INTERVAL
    writer_max_buffer: int = DEFAULT_MAX_BUFFER
    writer_max_backoff: float = DEFAULT_MAX_BACKOFF
    store_fallback: bool = True
    alerts: CompanionFactory | None = None
    body_rules: Sequence[BodyRule] | None = None
    shadow: bool = False
    provider: ProviderResolver | None = None
    ratelimit_items: RateLimitItems = "all"

    def __post_init__(self) -> None:
        if isinstance(self.store, str) and self.store not in ("env", "memory", "convex"):
            raise ConfigurationError("store must be a Store, 'env', 'memory' or 'convex'")
        if not isinstance(self.store, str):
            # What the configured middlewares call; a word names a store that has it all.
            rates, keys = "rate limits (off with rules=())", "API keys (off with key_routes=())"
            needs: dict[type, str] = {LogStore: "the request log (always on)"}
            if self.rules is None or self.rules:
                needs[LimitStore] = rates
            if self.key_routes:
                needs[LimitStore] = f"{rates} and {keys}" if LimitStore in needs else keys
                needs[KeyStore] = keys
            if self.bot_detection:
                needs[BotStore] = "bot detection (off with bot_detection=False)"
            require(self.store, needs, "GuardMiddleware")
        if not 0 < self.timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if self.fail not in ("open", "closed"):
            raise ConfigurationError("fail must be 'open' or 'closed'")
        if self.ratelimit_items not in ("all", "closest"):
            raise ConfigurationError("ratelimit_items must be 'all' or 'closest'")
        if self.forwarded_header not in ("x-forwarded-for", "forwarded"):
            raise ConfigurationError("forwarded_header must be 'x-forwarded-for' or 'forwarded'")
        prefix = self.ipv6_prefix
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= 128:
            raise ConfigurationError("ipv6_prefix must be a whole number between 0 and 128")
        for name in (
            "trusted_proxies",
            "exempt_paths",
            "bot_allow_ips",
            "bot_allow_paths",
            "bot_probe_paths",
            "bot_allow_verified",
        ):
            if isinstance(getattr(self, name), str):
                raise ConfigurationError(f"{name} must be a list, not one string")
        if isinstance(self.providers, str):
            raise ConfigurationError("providers must be a list, not one string")
        if not isinstance(self.shadow, bool):
            raise ConfigurationError("shadow must be True or False")
        if self.provider is not None and not callable(self.provider):
            raise ConfigurationError("provider must be a function of the ASGI scope")
        for path in self.exempt_paths:
            _path_matcher(path)
        if self.body_rules is not None:
            if isinstance(self.body_rules, BodyRule | str):
                raise ConfigurationError("body_rules must be a list of BodyRule")
            for rule in self.body_rules:
                if not isinstance(rule, BodyRule):
                    raise ConfigurationError(f"body_rules must be BodyRule objects, not {rule!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GuardSettings:
        """Settings from a dict (e.g. Django's `settings.CONVEX_GUARD`), naming unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(
                f"Unknown convex-guard setting(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**values)

    def with_options(self, options: Mapping[str, Any]) -> GuardSettings:
        if not options:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigurationError(f"Unknown GuardMiddleware option(s) {unknown}")
        return dataclasses.replace(self, **options)


@dataclass
class GuardStack:
    """The five middlewares around `inner`, with the store and the writer they share.

    `stacked` is the outermost of them, the whole stack as middlewares; `app` runs the same
    middlewares' steps in one loop (what `GuardMiddleware` and the WSGI/Django bridge serve
    requests with).
    """

    inner: ASGIApp
    settings: GuardSettings
    store: Store
    owns_store: bool
    writer: LogWriter
    is_exempt: Callable[[str], bool]
    stacked: RequestLoggerMiddleware
    fingerprint: FingerprintMiddleware
    keys: ApiKeyMiddleware | None
    bots: BotDetectionMiddleware | None
    limiter: RateLimitMiddleware | None
    validation: RequestValidationMiddleware | None = None

    @functools.cached_property
    def app(self) -> GuardRunner:
        return GuardRunner(self)

    @classmethod
    def build(cls, app: ASGIApp, settings: GuardSettings) -> GuardStack:
        env = load_environment()
        store, owns = resolve_store(
            settings.store, env, timeout=settings.timeout, fallback=settings.store_fallback
        )
        writer = LogWriter(
            store,
            batch_size=settings.writer_batch_size,
            interval=settings.writer_interval,
            max_buffer=max(settings.writer_max_buffer, settings.writer_batch_size),
            max_backoff=settings.writer_max_backoff,
        )
        if isinstance(store, ResilientStore) and store.on_outage_events is None:
            store.on_outage_events = writer.add
        if settings.alerts is not None:
            writer.companions.append(settings.alerts.attach(store))
        rules = settings.rules
        if rules is None:
            rules = [dataclasses.replace(r, fail=settings.fail) for r in preset_rules(env)]
        if settings.shadow:
            rules = [r if r.shadow else dataclasses.replace(r, shadow=True) for r in rules]
        inner = app
        limiter = bots = keys = validation = None
        # Innermost: only a request every other check admitted has its body read.
        body_rules = settings.body_rules
        if body_rules is None:
            body_rules = default_body_rules()
        if body_rules:
            inner = validation = RequestValidationMiddleware(inner, rules=body_rules, writer=writer)
        if rules:
            inner = limiter = RateLimitMiddleware(
                inner,
                store=store,
                rules=rules,
                timeout=settings.timeout,
                writer=writer,
                ratelimit_items=settings.ratelimit_items,
            )
        if settings.bot_detection:
            inner = bots = BotDetectionMiddleware(
                inner,
                store=store,
                policy=settings.bot_policy,
                classifier=settings.bot_classifier,
                allow_user_agents=settings.bot_allow_user_agents,
                allow_ips=settings.bot_allow_ips,
                allow_paths=settings.bot_allow_paths,
                probe_paths=settings.bot_probe_paths,
                challenge=settings.bot_challenge,
                suspicious_limit=settings.suspicious_limit,
                timeout=settings.timeout,
                fail=settings.fail,
                # One store round trip per request: the limiter decides the bot check too.
                defer=bool(rules),
                verifier=(settings.bot_verifier or CrawlerVerifier())
                if settings.bot_verify
                else None,
                allow_verified=settings.bot_allow_verified,
                spoofed_action=settings.bot_spoofed_action,
                shadow=settings.shadow,
            )
        if settings.key_routes:
            inner = keys = ApiKeyMiddleware(
                inner,
                store=store,
                routes=settings.key_routes,
                writer=writer,
                cache_ttl=settings.key_cache_ttl,
                timeout=settings.timeout,
            )
        inner = fingerprint = FingerprintMiddleware(
            inner,
            trusted_proxies=settings.trusted_proxies,
            forwarded_header=settings.forwarded_header,
            ipv6_prefix=settings.ipv6_prefix,
        )
        stacked = RequestLoggerMiddleware(
            inner,
            store=store,
            writer=writer,
            provider=settings.provider or provider_from_path(settings.ai_path),
            providers=settings.providers,
            embeddings_path=settings.embeddings_path,
        )
        return cls(
            inner=app,
            settings=settings,
            store=store,
            owns_store=owns,
            writer=writer,
            is_exempt=exempt_matcher(settings.exempt_paths),
            stacked=stacked,
            fingerprint=fingerprint,
            keys=keys,
            bots=bots,
            limiter=limiter,
            validation=validation,
        )


class GuardRunner(StepRunner):
    """The steps of `GuardStack`'s middlewares, run in one loop on HTTP requests and WebSocket
    handshakes: what the stacked middlewares do, in their order, without a layer of calls and
    a wrapped `send` per middleware.

    Each route runs only the steps with something to do there (`StepRunner.plan`). Lifespan
    (the order checks, the writers' start and flush) goes through the stack as built, then
    `on_shutdown`; exempt paths go straight to the app.
    """

    def __init__(
        self, stack: GuardStack, *, on_shutdown: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        parts = (
            stack.stacked,
            stack.fingerprint,
            stack.keys,
            stack.bots,
            stack.limiter,
            stack.validation,
        )
        super().__init__(stack.inner, [step for step in parts if step is not None])
        self.validation = stack.validation
        self.stacked = stack.stacked
        self.is_exempt = stack.is_exempt
        # Whether each route is exempt: the same few come back, and a lookup costs less
        # than a matcher's call.
        self._exempt: dict[Route, bool] = {}
        self.on_shutdown = on_shutdown

    def _make_plan(self, steps: list[Step]) -> Plan:
        # Where validation runs, the app behind its answering wrapper (a streamed body's
        # 413); elsewhere the app itself, without the wrapper's layer.
        validation = self.validation
        if validation is not None and validation in steps:
            return Plan(steps, validation.app)
        return Plan(steps, self.app)

    def context(self, scope: Scope) -> GuardContext | None:
        # The one place a request's route (path without root_path, HEAD as GET) is computed.
        route = route_of(scope)
        exempt = self._exempt.get(route)
        if exempt is None:
            exempt = remember(self._exempt, route, self.is_exempt(route[1]))
        if exempt:
            return None
        return guard_context(scope, route)

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.on_shutdown is not None:
            send = self._closing_send(send)
        await self.stacked(scope, receive, send)

    def _closing_send(self, send: Send) -> Send:
        """Run `on_shutdown` (close the store the guard created) once the writer has flushed."""

        async def closing_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    assert self.on_shutdown is not None
                    await self.on_shutdown()
                except Exception as exc:
                    logger.warning("convex-guard: closing the store failed: %r", exc)
            await send(message)

        return closing_send


class GuardMiddleware(GuardRunner):
    """Logger → fingerprint → API keys → bot detection → rate limits, configured at once.

    `app.add_middleware(GuardMiddleware)` guards the seed's routes with the seed's limits on the
    store the environment names; pass `settings=GuardSettings(…)` and/or any of its fields as
    keyword options to change that. Paths in `exempt_paths` (default `/health`) skip the whole
    stack. A normal request costs one store round trip (the bot check is decided with the
    limits); log rows go through one shared writer, started at lifespan startup and flushed at
    shutdown, when a store the guard created is closed too.

    A bad setting (an option, a field, or a variable of the environment such as
    `RATE_LIMIT_GLOBAL_REQUESTS`) is not raised from here: Starlette builds its middleware
    stack on its first call, the lifespan's, and uvicorn would take the exception for a
    server without lifespan support, then answer every request with a 500. The guard keeps
    the error in `error` and refuses the start-up instead (`lifespan.startup.failed`, one
    line naming the setting: uvicorn logs it and exits with status 3); without a lifespan it
    answers every request with a 500 problem naming the setting, logged once.
    """

    #: The configuration problem this guard could not start with; None when it is serving.
    error: ConfigurationError | None = None

    # `app` is positional-only: with `**options` beside it, Starlette's `add_middleware` typing
    # (a ParamSpec protocol whose app is positional-only) accepts the class only so.
    def __init__(
        self, app: ASGIApp, /, settings: GuardSettings | None = None, **options: Any
    ) -> None:
        try:
            if settings is not None and not isinstance(settings, GuardSettings):
                raise ConfigurationError("settings must be a GuardSettings")
            self.settings = (settings or GuardSettings()).with_options(options)
            self.guard = GuardStack.build(app, self.settings)
        except ConfigurationError as exc:
            # The same object, with the misconfigured guard's `__call__`: the serving
            # guard's own `__call__` stays as it is, without a check per request.
            self.__class__ = MisconfiguredGuard
            self.error = exc
            return
        self.store = self.guard.store
        self.writer = self.guard.writer
        # The runner is this middleware itself: no extra layer per request.
        super().__init__(
            self.guard, on_shutdown=self.store.close if self.guard.owns_store else None
        )


class MisconfiguredGuard(GuardMiddleware):
    """A `GuardMiddleware` whose configuration is bad: it refuses to start and serves nothing.

    The lifespan's start-up is answered `lifespan.startup.failed` with the one-line problem,
    so the server exits. A server without lifespan gets, for every request, a 500
    `application/problem+json` naming the problem, and the log gets the line once; a
    WebSocket handshake gets the same answer where the server offers
    `websocket.http.response`, else a close with 1011 (internal error).
    """

    error: ConfigurationError
    _logged = False

    @functools.cached_property
    def message(self) -> str:
        """The problem in one line, as the lifespan, the log and the 500 problem give it."""
        return "convex-guard: " + redact_url(" ".join(str(self.error).split()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": self.message})
            return
        if kind not in ("http", "websocket"):
            return
        if not self._logged:
            self._logged = True
            logger.error("%s", self.message)
        await refuse(
            problem(500, "Internal Server Error", detail=self.message), scope, receive, send
        )


def exempt_matcher(paths: Iterable[str]) -> Callable[[str], bool]:
    """Whether a path is exempt; asked on every request, so one path is its matcher itself."""
    matchers = [_path_matcher(p) for p in paths]
    if not matchers:
        return lambda _: False
    if len(matchers) == 1:
        return matchers[0]
    return lambda path: any(match(path) for match in matchers)


__all__ = [
    "GuardMiddleware",
    "GuardRunner",
    "GuardSettings",
    "GuardStack",
    "MisconfiguredGuard",
    "default_key_routes",
]
