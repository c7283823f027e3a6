"""Request logging: every AI and embedding request timed and recorded, rejected ones too."""

from __future__ import annotations

import asyncio
import numbers
import operator
import time
import uuid
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Protocol

from starlette.types import ASGIApp, Receive, Scope

from convex_guard.core.clientip import peer_ip
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.headers import MAX_STORED
from convex_guard.core.keys import NO_KEY
from convex_guard.core.logs import printable
from convex_guard.core.presets import AI_PROVIDERS
from convex_guard.middleware.context import (
    GuardContext,
    LogEntry,
    Route,
    Usage,
    guard_context,
    remember,
    request_route,
)
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.middleware.order import LOGGER
from convex_guard.middleware.rules import _path_matcher
from convex_guard.middleware.steps import StepMiddleware
from convex_guard.stores.base import AIRequestLog, EmbeddingRequestLog, LogStore, require

DEFAULT_AI_PATH = "/api/ai"
DEFAULT_EMBEDDINGS_PATH = "/api/embeddings"
UNKNOWN_MODEL = "unknown"
#: What a row says for a provider outside the configured set; the raw name goes in `error`.
OTHER_PROVIDER = "other"
MAX_PROVIDER_LENGTH = 64
# What `report_usage` accepts: far above any real call, yet small enough that sums of many
# rows stay exact in a float64 (2**53), which is how Convex stores every number.
MAX_TOKENS = 10**12
MAX_ITEMS = 10**9
MAX_COST = 1e9
MAX_MODEL_LENGTH = 256
_NOTHING_REPORTED = Usage()  # read only: what the row of a request that reported nothing says
#: A route's requests' `LogEntry` (which provider, None for embedding requests, and the note
#: their rows' `error` carries), or None when they are not logged
#: (`RequestLoggerMiddleware._as_logged`).
_Logged = LogEntry | None
#: The embedding routes' entry.
_EMBEDDING = LogEntry(None)
#: What the per-route cache answers for a route it does not hold (None there: not logged).
_UNSEEN = LogEntry(None, "unseen")

#: Gets the request's scope, returns its provider, or `None` to leave the request unlogged.
ProviderResolver = Callable[[Scope], str | None]
Clock = Callable[[], float]


class _HasScope(Protocol):
    @property
    def scope(self) -> MutableMapping[str, Any]: ...


def report_usage(
    request_or_scope: _HasScope | MutableMapping[str, Any],
    *,
    model: str | None = None,
    tokens: int | None = None,
    cost: float | None = None,
    items: int | None = None,
) -> None:
    """Tell the request logger what the AI call used: the model, tokens, cost, batch items.

    Takes a Starlette/FastAPI `Request` (or `WebSocket`) or a raw ASGI scope; only the values
    given are set, so the app may report them as it learns them. Bad values raise
    `ValueError` naming the argument, in the app, where the bug is, rather than poison the
    log: `tokens` and `items` are ints (not bools) from 0 to `MAX_TOKENS` (10**12) and
    `MAX_ITEMS` (10**9), `cost` a finite number from 0 to `MAX_COST` (1e9), `model` a string
    of at most `MAX_MODEL_LENGTH` (256) printable characters. A number from an upstream's
    answer is the app's to check before it reports it. For a streamed answer the logger reads
    what is not reported off the stream itself (its usage event): what is reported wins.
    """
    scope = (
        request_or_scope if isinstance(request_or_scope, MutableMapping) else request_or_scope.scope
    )
    if model is not None and not (
        isinstance(model, str) and len(model) <= MAX_MODEL_LENGTH and model.isprintable()
    ):
        raise ValueError(f"model must be at most {MAX_MODEL_LENGTH} printable characters")
    if tokens is not None:
        tokens = _count("tokens", tokens, MAX_TOKENS)
    if items is not None:
        items = _count("items", items, MAX_ITEMS)
    if cost is not None:
        cost = _amount("cost", cost, MAX_COST)
    ctx = guard_context(scope)
    usage = ctx.usage
    if usage is None:
        usage = ctx.usage = Usage()
    if model is not None:
        usage.model = model
    if tokens is not None:
        usage.tokens = tokens
    if cost is not None:
        usage.cost = cost
    if items is not None:
        usage.items = items


def _count(name: str, value: object, cap: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not a bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an int, not {type(value).__name__}") from None
    if not 0 <= number <= cap:
        raise ValueError(f"{name} must be between 0 and {cap:,}")
    return number


def _amount(name: str, value: object, cap: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not 0 <= number <= cap:  # NaN compares false
        raise ValueError(f"{name} must be a finite number between 0 and {cap:,.0f}")
    return number


def provider_from_path(prefix: str = DEFAULT_AI_PATH) -> ProviderResolver:
    """The default resolver: the segment after `prefix` (`/api/ai/{provider}/…`)."""
    return _PathProvider(prefix)


class _PathProvider:
    """`provider_from_path`'s resolver: a function of the path alone, so the logger can
    tell from a route whether its requests are logged (`applies_to`)."""

    __slots__ = ("base",)

    def __init__(self, prefix: str) -> None:
        self.base = prefix.rstrip("/") + "/"

    def __call__(self, scope: Scope) -> str | None:
        # As Starlette routes it: without root_path.
        return self.of_path(request_route(scope)[1])

    def of_path(self, path: str) -> str | None:
        """The raw segment (the logger bounds it), None off the prefix."""
        base = self.base
        if not path.startswith(base):
            return None
        provider = path[len(base) :].split("/", 1)[0]
        return provider or None


def _wall_clock_ms() -> float:
    return time.time() * 1000.0


class RequestLoggerMiddleware(StepMiddleware):
    """Time each request and record it as an AI or embedding request log; run it outermost.

    AI requests are those `provider` resolves a provider for (by default the `{provider}`
    segment of `/api/ai/{provider}/…`); embedding requests are those under `embeddings_path`
    (`None` to log none). The app reports model, tokens, cost and batch items with
    `report_usage`. A request fails when the guard rejected it (`error` is the reason), when
    it ended with a status of 400 or more (`http_<status>`), or when the app raised (the
    exception's class name; a client that went away mid-body is one debug line, not a
    traceback). Paths are matched as Starlette routes them (without `root_path`); a WebSocket
    handshake is logged like a request, once, with status 101 when accepted.

    Providers are a closed set, so rows and rollups stay bounded whatever path a client
    sends: `providers` (default: the preset's `AI_PROVIDERS` with the default resolver; with
    a custom `provider` resolver, whatever it returns, up to 64 printable characters). Any
    other provider is logged as `other`, its raw name cut to 64 characters and escaped in the
    row's `error` (`provider:<name>`, after the request's own error if it has one); it does
    not make the request count as failed.

    A `text/event-stream` response is read as it is sent, chunk by chunk and unbuffered:
    what the app did not report comes from the stream's final usage event (OpenAI's
    `stream_options.include_usage` shape), and the row gets `ttft_ms`, the time to the first
    output (see `middleware.steps.stream_usage`). Rows carry `shadow` when a shadow rule or
    a guard in shadow mode would have refused the request.

    Rows go through `writer` (by default the store's shared `LogWriter`), which this
    middleware starts at lifespan startup and flushes completely at shutdown; see `LogWriter`
    for apps run without lifespan.
    """

    marker = LOGGER

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: LogStore,
        writer: LogWriter | None = None,
        provider: ProviderResolver | None = None,
        providers: Iterable[str] | None = None,
        embeddings_path: str | None = DEFAULT_EMBEDDINGS_PATH,
        clock: Clock | None = None,
    ) -> None:
        if provider is not None and not callable(provider):
            raise ConfigurationError("provider must be a function of the ASGI scope")
        if providers is None and provider is None:
            providers = AI_PROVIDERS
        #: The providers logged by name; None: any name the custom resolver returns (bounded).
        self.providers = None if providers is None else _provider_set(providers)
        # The rows go through the writer: a writer given brings a store it has checked.
        require(store, (LogStore,) if writer is None else (), "RequestLoggerMiddleware")
        super().__init__(app)
        self.store = store
        self.writer = writer if writer is not None else LogWriter.for_store(store)
        self.provider: ProviderResolver = provider or provider_from_path()
        self._is_embedding: Callable[[str], bool] = (
            _path_matcher(embeddings_path) if embeddings_path is not None else lambda _: False
        )
        # Whether each route is logged, as which provider, with which note: the same few
        # come back, each with one shared `LogEntry`.
        self._by_route: dict[Route, _Logged] = {}
        self.clock: Clock = clock or _wall_clock_ms
        # The wall clock is read inline on every request: a call through `clock` costs more.
        self._wall = clock is None

    def writers(self) -> tuple[LogWriter, ...]:
        return (self.writer,)

    def applies_to(self, route: Route) -> bool:
        """Where requests are logged: embeddings, and the AI routes the default resolver
        names a provider for; everywhere with a resolver of your own (it sees the scope)."""
        path = route[1]
        if self._is_embedding(path):
            return True
        provider = self.provider
        return not isinstance(provider, _PathProvider) or provider.of_path(path) is not None

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> None:
        """Start timing a request that is logged (`ctx.log_entry`); others are not logged."""
        entry = self._by_route.get(ctx.route, _UNSEEN)
        if entry is _UNSEEN:  # a new route, or one a resolver of your own decides per request
            entry = self._logged_as(scope, ctx.route)
        if entry is not None:
            ctx.log_entry = entry
            ctx.timestamp = time.time() * 1000.0 if self._wall else self.clock()
            ctx.started = time.perf_counter()

    def _logged_as(self, scope: Scope, route: Route) -> _Logged:
        """The request's `LogEntry` (None: not logged): its provider as its row names it (None:
        an embedding request) and the note of a provider outside the set; kept per route when
        that is all it depends on (the default resolver)."""
        if self._is_embedding(route[1]):
            found: _Logged = _EMBEDDING
        else:
            provider = self.provider
            if not isinstance(provider, _PathProvider):
                # A resolver of your own: asked on every request.
                return self._as_logged(provider(scope))
            found = self._as_logged(provider.of_path(route[1]))
        return remember(self._by_route, route, found)

    def _as_logged(self, provider: str | None) -> _Logged:
        """A resolved provider as its rows name it: a name outside the set is `other`, with
        the raw name (bounded, escaped) as the note its rows' `error` carries."""
        if provider is None:
            return None
        known = self.providers
        if known is not None:
            unknown = provider not in known
        else:  # a custom resolver's own names, if they are names at all
            unknown = len(provider) > MAX_PROVIDER_LENGTH or not provider.isprintable()
        if unknown:
            return LogEntry(OTHER_PROVIDER, "provider:" + printable(provider, MAX_PROVIDER_LENGTH))
        return LogEntry(provider)

    def after(self, scope: Scope, ctx: GuardContext, raised: BaseException | None) -> None:
        """Buffer the request's row: failed if the guard refused it, it erred or raised."""
        entry = ctx.log_entry
        if entry is None:
            return
        latency = (time.perf_counter() - ctx.started) * 1000.0
        status = ctx.status
        error = ctx.rejected
        if error is None:
            if raised is not None:
                error = _raised_error(raised)
            if error is None and status >= 400:
                error = f"http_{status}"
        provider = entry.provider
        if provider is None:
            self.writer.add(self._embedding_row(ctx, latency, error))
        else:
            self.writer.add(self._ai_row(scope, ctx, provider, entry, latency, error))

    def _ai_row(
        self,
        scope: Scope,
        ctx: GuardContext,
        provider: str,
        entry: LogEntry,
        latency: float,
        error: str | None,
    ) -> AIRequestLog:
        usage = ctx.usage or _NOTHING_REPORTED
        success = error is None
        note = entry.note  # a provider outside the set: not a failure of the request
        if note is not None:
            error = note if error is None else f"{error[:MAX_STORED]} {note}"
        user_id = ctx.user_id
        if user_id is not None and len(user_id) > MAX_STORED:
            user_id = user_id[:MAX_STORED]
        first = ctx.first_output  # a stream's first output
        shadow = ctx.shadow
        # Every field in order, as one tuple made the row (what `_make` does, without its
        # call and length check): the named tuple's own constructor builds that tuple and
        # then copies it, twice the cost (one row per request).
        return tuple.__new__(
            AIRequestLog,
            (
                ctx.timestamp,
                provider,
                usage.model or UNKNOWN_MODEL,
                ctx.fingerprint or "",
                ctx.client_ip or peer_ip(scope),
                success,
                latency,
                user_id,
                error,
                usage.tokens,
                usage.cost,
                None if first is None else (first - ctx.started) * 1000.0,
                shadow if shadow is None else shadow[:MAX_STORED],
            ),
        )

    def _embedding_row(
        self, ctx: GuardContext, latency: float, error: str | None
    ) -> EmbeddingRequestLog:
        usage = ctx.usage or _NOTHING_REPORTED
        return tuple.__new__(  # every field in order, as the AI row
            EmbeddingRequestLog,
            (
                uuid.uuid4().hex,
                ctx.api_key_hash or NO_KEY,
                ctx.timestamp,
                usage.items or 0,
                latency,
                usage.tokens or 0,
                error is None,
                usage.model or UNKNOWN_MODEL,
                error,
            ),
        )


def _provider_set(providers: Iterable[str]) -> frozenset[str]:
    if isinstance(providers, str):
        raise ConfigurationError("providers must be a list of names, not one string")
    names = frozenset(providers)
    for name in names:
        if not (
            isinstance(name, str) and 0 < len(name) <= MAX_PROVIDER_LENGTH and name.isprintable()
        ):
            raise ConfigurationError(
                f"provider {name!r} must be a name of 1 to {MAX_PROVIDER_LENGTH} printable "
                "characters"
            )
    return names


def _raised_error(raised: BaseException) -> str | None:
    """What a request that raised is logged with: its exception's class, or "cancelled"."""
    if isinstance(raised, asyncio.CancelledError):
        return "cancelled"  # the client went away, or the server is stopping
    if isinstance(raised, Exception):
        return type(raised).__name__
    return None
