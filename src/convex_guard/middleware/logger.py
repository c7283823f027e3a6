"""Request logging: every AI and embedding request timed and recorded, rejected ones too."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._apikeys import NO_KEY
from .._context import GuardContext, Usage, guard_context, request_route
from .._errors import ConfigurationError
from .._logwriter import LogWriter, run_lifespan
from .._order import LOGGER, mark
from .._rules import _path_matcher, peer_ip
from .._store import AIRequestLog, EmbeddingRequestLog, Store

DEFAULT_AI_PATH = "/api/ai"
DEFAULT_EMBEDDINGS_PATH = "/api/embeddings"
UNKNOWN_MODEL = "unknown"
_NOTHING_REPORTED = Usage()  # read only: what the row of a request that reported nothing says

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
    `ValueError` in the app, where the bug is, rather than corrupt the log.
    """
    scope = (
        request_or_scope if isinstance(request_or_scope, MutableMapping) else request_or_scope.scope
    )
    if tokens is not None and (isinstance(tokens, bool) or tokens < 0):
        raise ValueError("tokens must be a non-negative int")
    if items is not None and (isinstance(items, bool) or items < 0):
        raise ValueError("items must be a non-negative int")
    if cost is not None and not (0 <= cost < math.inf):
        raise ValueError("cost must be a non-negative, finite number")
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


def provider_from_path(prefix: str = DEFAULT_AI_PATH) -> ProviderResolver:
    """The default resolver: the segment after `prefix` (`/api/ai/{provider}/…`)."""
    base = prefix.rstrip("/") + "/"

    def resolve(scope: Scope) -> str | None:
        path = request_route(scope)[1]  # as Starlette routes it: without root_path
        if not path.startswith(base):
            return None
        provider = path[len(base) :].split("/", 1)[0]
        return provider or None

    return resolve


def _wall_clock_ms() -> float:
    return time.time() * 1000.0


class RequestLoggerMiddleware:
    """Time each request and record it as an AI or embedding request log; run it outermost.

    AI requests are those `provider` resolves a provider for (by default the `{provider}`
    segment of `/api/ai/{provider}/…`); embedding requests are those under `embeddings_path`
    (`None` to log none). The app reports model, tokens, cost and batch items with
    `report_usage`. A request fails when the guard rejected it (`error` is the reason), when
    it ended with a status of 400 or more (`http_<status>`), or when the app raised (the
    exception's class name). Paths are matched as Starlette routes them (without
    `root_path`); a WebSocket handshake is logged like a request, once, with status 101 when
    accepted.

    Rows go through `writer` (by default the store's shared `LogWriter`), which this
    middleware starts at lifespan startup and flushes completely at shutdown; see `LogWriter`
    for apps run without lifespan.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        writer: LogWriter | None = None,
        provider: ProviderResolver | None = None,
        embeddings_path: str | None = DEFAULT_EMBEDDINGS_PATH,
        clock: Clock | None = None,
    ) -> None:
        if provider is not None and not callable(provider):
            raise ConfigurationError("provider must be a function of the ASGI scope")
        self.app = app
        self.store = store
        self.writer = writer if writer is not None else LogWriter.for_store(store)
        self.provider: ProviderResolver = provider or provider_from_path()
        self._is_embedding: Callable[[str], bool] = (
            _path_matcher(embeddings_path) if embeddings_path is not None else lambda _: False
        )
        self.clock: Clock = clock or _wall_clock_ms
        # The wall clock is read inline on every request: a call through `clock` costs more.
        self._wall = clock is None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            mark(scope, LOGGER)
            await run_lifespan(self.app, (self.writer,), scope, receive, send)
            return
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        ctx = guard_context(scope)  # made here, so its route is computed once for all
        entry = self.begin(scope)
        if entry is None:
            await self.app(scope, receive, send)
            return

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        async def send_handshake_status(message: Message) -> None:
            if not entry.status:
                entry.status = handshake_status(message)
            await send(message)

        raised: BaseException | None = None
        try:
            await self.app(scope, receive, send_status if kind == "http" else send_handshake_status)
        except BaseException as exc:
            raised = exc
            raise
        finally:
            self.finish(scope, ctx, entry, raised)

    def begin(self, scope: Scope) -> LogEntry | None:
        """Start timing a request that is logged; None for one that is not.

        The caller sets the entry's `status` from the response start and calls `finish`
        (`GuardMiddleware` does both in its own single pass).
        """
        if self._is_embedding(request_route(scope)[1]):
            provider = None
        else:
            provider = self.provider(scope)
            if provider is None:
                return None
        return LogEntry(provider, time.time() * 1000.0 if self._wall else self.clock())

    def finish(
        self, scope: Scope, ctx: GuardContext, entry: LogEntry, raised: BaseException | None
    ) -> None:
        """Buffer the request's row: failed if the guard refused it, it erred or raised."""
        latency = (time.perf_counter() - entry.started) * 1000.0
        status = entry.status
        error = ctx.rejected
        if error is None:
            if raised is not None:
                error = _raised_error(raised)
            if error is None and status >= 400:
                error = f"http_{status}"
        provider = entry.provider
        if provider is None:
            self.writer.add(self._embedding_row(ctx, entry.timestamp, latency, error))
        else:
            self.writer.add(self._ai_row(scope, ctx, provider, entry.timestamp, latency, error))

    def _ai_row(
        self,
        scope: Scope,
        ctx: GuardContext,
        provider: str,
        timestamp: float,
        latency: float,
        error: str | None,
    ) -> AIRequestLog:
        usage = ctx.usage or _NOTHING_REPORTED
        # Positional, in the fields' order: keywords cost more than the rest of the row
        # (one row per request).
        return AIRequestLog(
            timestamp,
            provider,
            usage.model or UNKNOWN_MODEL,
            ctx.fingerprint or "",
            ctx.client_ip or peer_ip(scope),
            error is None,
            latency,
            ctx.user_id,
            error,
            usage.tokens,
            usage.cost,
        )

    def _embedding_row(
        self, ctx: GuardContext, timestamp: float, latency: float, error: str | None
    ) -> EmbeddingRequestLog:
        usage = ctx.usage or _NOTHING_REPORTED
        return EmbeddingRequestLog(  # positional, as the AI row
            uuid.uuid4().hex,
            ctx.api_key_hash or NO_KEY,
            timestamp,
            usage.items or 0,
            latency,
            usage.tokens or 0,
            error is None,
            usage.model or UNKNOWN_MODEL,
            error,
        )


def handshake_status(message: Message) -> int:
    """The status a WebSocket handshake's row records from the first message the app sends.

    101 when accepted (a connection accepted and later closed stays one row, of 101), the
    HTTP answer's status when refused through the `websocket.http.response` extension, 403
    for a close before accept (the server answers 403 to it). 0 for anything else.
    """
    kind = message["type"]
    if kind == "websocket.accept":
        return 101
    if kind == "websocket.http.response.start":
        status: int = message["status"]
        return status
    if kind == "websocket.close":
        return 403
    return 0


def _raised_error(raised: BaseException) -> str | None:
    """What a request that raised is logged with: its exception's class, or "cancelled"."""
    if isinstance(raised, asyncio.CancelledError):
        return "cancelled"  # the client went away, or the server is stopping
    if isinstance(raised, Exception):
        return type(raised).__name__
    return None


class LogEntry:
    """One logged request in flight: what it is (`provider`, None for an embedding), when."""

    __slots__ = ("provider", "started", "status", "timestamp")

    def __init__(self, provider: str | None, timestamp: float) -> None:
        self.provider = provider
        self.timestamp = timestamp
        self.started = time.perf_counter()
        self.status = 0
