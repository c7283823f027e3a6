"""Request validation: a body's size while it streams, its media type, and JSON well-formedness."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convex_guard.core.bodycheck import (
    BodyProblem,
    check_json,
    declared_length,
    media_type,
    type_allowed,
    type_matcher,
)
from convex_guard.core.clientip import UNKNOWN_CLIENT, peer_ip
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.headers import bounded, header_value
from convex_guard.core.logs import logger, printable
from convex_guard.core.problem import problem
from convex_guard.middleware.body import BodyTooLarge, read_body
from convex_guard.middleware.context import (
    GuardContext,
    Route,
    current_context,
    guard_context,
    matched_methods,
    remember,
    request_headers,
    route_of,
)
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.middleware.rules import _path_matcher
from convex_guard.middleware.steps import Before, Plan, Refusal, Step, StepMiddleware
from convex_guard.stores.base import BotEvent, LogStore, require

MIB = 1024 * 1024
#: A chat request: a long conversation with tools is tens of kilobytes; 1 MiB is generous.
DEFAULT_MAX_BYTES = MIB
#: An embedding batch: up to 2,048 inputs of a few kilobytes each.
DEFAULT_EMBEDDINGS_MAX_BYTES = 8 * MIB
#: JSON nesting: tool schemas nest a dozen levels; 32 leaves room and bounds the check.
DEFAULT_MAX_DEPTH = 32
JSON_TYPES = ("application/json",)
#: The methods whose body is checked; GET, HEAD, DELETE, OPTIONS pass untouched.
BODY_METHODS = ("POST", "PUT", "PATCH")
_MAX_DEPTH_LIMIT = 512
#: What `ctx.rejected` starts with for every refusal of this middleware (the request log's
#: `error`): `invalid_body:too_large`, `:content_type`, `:length`, `:json`.
REJECTED_PREFIX = "invalid_body:"
_MARKER = "RequestValidationMiddleware"


@dataclass(frozen=True)
class BodyRule:
    """What the body of a request on `path` must be.

    - `path`: a prefix on a segment boundary, a compiled regex matched at the start, or None
      for every path; matched as Starlette routes it (without `root_path`).
    - `max_bytes`: the most a body may hold. A declared `Content-Length` over it is refused
      (413) before anything is read; an undeclared (chunked) body is counted as it arrives
      and refused as soon as it passes the limit.
    - `content_types`: the media types accepted (`type/*` for a range; parameters such as
      `charset` are ignored); anything else is 415. None accepts any.
    - `json`: check the body is one well-formed JSON text, at most `max_depth` levels deep,
      before the app runs (400 otherwise). The body is read once, within `max_bytes`, and the
      app reads the same bytes. Without `json`, the body streams to the app as it arrives.
    - `methods`: the methods checked (default POST, PUT, PATCH).

    A request declaring an empty body (`Content-Length: 0`) passes the type and JSON checks:
    the app answers what an empty request means (its size is still counted). One without
    `Content-Type` on a JSON route is checked as JSON (RFC 9110 §8.3 lets a recipient examine
    the data); on another route with `content_types` it is 415 unless it declares no body.
    """

    path: str | re.Pattern[str] | None
    max_bytes: int = DEFAULT_MAX_BYTES
    content_types: Sequence[str] | None = JSON_TYPES
    json: bool = True
    max_depth: int = DEFAULT_MAX_DEPTH
    methods: Collection[str] = BODY_METHODS
    _matches_path: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    _methods: frozenset[str] = field(init=False, repr=False, compare=False)
    _types: tuple[frozenset[str], tuple[str, ...]] | None = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        size = self.max_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigurationError(f"BodyRule {self.path!r}: max_bytes must be a whole number")
        depth = self.max_depth
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise ConfigurationError(f"BodyRule {self.path!r}: max_depth must be a whole number")
        if not 1 <= depth <= _MAX_DEPTH_LIMIT:
            raise ConfigurationError(
                f"BodyRule {self.path!r}: max_depth must be between 1 and {_MAX_DEPTH_LIMIT}"
            )
        if isinstance(self.methods, str):
            raise ConfigurationError(f"BodyRule {self.path!r}: methods must be a list")
        types = self.content_types
        if types is not None:
            if isinstance(types, str):
                raise ConfigurationError(f"BodyRule {self.path!r}: content_types must be a list")
            cleaned = tuple(media_type(t) for t in types)
            for kind in cleaned:
                if kind.count("/") != 1 or kind.startswith("/") or kind.endswith("/"):
                    raise ConfigurationError(
                        f"BodyRule {self.path!r}: {kind!r} is not a media type (type/subtype)"
                    )
            if not cleaned:
                raise ConfigurationError(
                    f"BodyRule {self.path!r}: content_types is empty (None accepts any type)"
                )
            object.__setattr__(self, "content_types", cleaned)
            object.__setattr__(self, "_types", type_matcher(cleaned))
        else:
            object.__setattr__(self, "_types", None)
        object.__setattr__(self, "_matches_path", _path_matcher(self.path))
        object.__setattr__(self, "methods", tuple(self.methods))  # hashable, like the rule
        object.__setattr__(self, "_methods", matched_methods(self.methods))

    def matches(self, path: str, method: str) -> bool:
        return method in self._methods and self._matches_path(path)


def default_body_rules(prefix: str = "/api") -> tuple[BodyRule, ...]:
    """JSON bodies on the AI routes: 8 MiB for embeddings, 1 MiB for the rest.

    The example gateway's routes (`{prefix}/embeddings`, `{prefix}/ai/…`) and the
    OpenAI-style ones (`/v1/embeddings`, `/v1/chat/completions`, `/v1/completions`).
    """
    embeddings = DEFAULT_EMBEDDINGS_MAX_BYTES
    return (
        BodyRule(f"{prefix}/embeddings", max_bytes=embeddings),
        BodyRule("/v1/embeddings", max_bytes=embeddings),
        BodyRule(f"{prefix}/ai"),
        BodyRule("/v1/chat/completions"),
        BodyRule("/v1/completions"),
    )


class RequestValidationMiddleware(StepMiddleware):
    """Refuse request bodies that are too large (413), of a type the route does not take
    (415) or, on JSON routes, not well-formed JSON (400), before the app reads them.

    The first of `rules` matching a request's path and method applies; requests no rule
    matches, WebSocket handshakes and other scopes pass untouched. A refusal is one log line,
    the request log's `error` (`invalid_body:…`) and, with a `store` or `writer`, a
    `suspicious_pattern` bot event, `blocked`, counted in the client's escalation (per
    fingerprint and client address) as the key middleware counts a failed-auth throttle.
    A refusal sent before the body was read closes the connection (`Connection: close`), so
    the server does not read the rest of it either.

    How a streamed body is stopped, the *overflow latch*: the app's `receive` is a meter that
    counts what the app reads. The chunk that passes the limit is not handed on: the meter
    latches, sends the 413 at once if the app has not started its response, and answers the
    app `http.disconnect` from then on (Starlette raises `ClientDisconnect`, which is taken as
    the request's end); whatever the app then sends is dropped, since the client has its answer.
    A response the app had started already goes on as the app ends it.
    """

    marker = _MARKER

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Sequence[BodyRule] | None = None,
        store: LogStore | None = None,
        writer: LogWriter | None = None,
    ) -> None:
        rules = default_body_rules() if rules is None else tuple(rules)
        if not rules:
            raise ConfigurationError("RequestValidationMiddleware needs at least one rule")
        for rule in rules:
            if not isinstance(rule, BodyRule):
                raise ConfigurationError(f"rules must be BodyRule objects, not {rule!r}")
        if writer is None and store is not None:
            require(store, (LogStore,), "RequestValidationMiddleware")
            writer = LogWriter.for_store(store)
        self.app: _Answering
        super().__init__(_Answering(app))
        self.rules = rules
        self.writer = writer
        # The rule of each (method, path): the same few routes come back on every request.
        self._matches: dict[Route, BodyRule | None] = {}

    def writers(self) -> tuple[LogWriter, ...]:
        return () if self.writer is None else (self.writer,)

    def applies_to(self, route: Route) -> bool:
        """Only where a body rule matches: elsewhere nothing is checked or metered."""
        return self._matching(route) is not None

    def _make_plan(self, steps: list[Step]) -> Plan:
        # Off the checked routes the app itself, without the answering wrapper's layer.
        return Plan(steps, self.app if steps else self.app.app)

    def context(self, scope: Scope) -> GuardContext | None:
        """The guard context, none made (straight to the app) when no rule applies."""
        if scope["type"] != "http":
            return None
        ctx = current_context(scope)
        if ctx is None:
            route = route_of(scope)
            if self._matching(route) is None:
                return None
            ctx = guard_context(scope, route)
        return ctx

    def _matching(self, route: Route) -> BodyRule | None:
        try:
            return self._matches[route]
        except KeyError:
            pass
        method, path = route
        found = next((rule for rule in self.rules if rule.matches(path, method)), None)
        return remember(self._matches, route, found)

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        """Headers first (nothing read); then the JSON check to await, or the meter."""
        if scope["type"] != "http":
            return None
        rule = self._matching(ctx.route)
        if rule is None:
            return None
        headers = request_headers(scope, ctx)  # read with the others, in one pass
        content_type = headers.content_type
        chunked = headers.chunked
        try:
            length = declared_length(headers.content_length or [])
        except BodyProblem as exc:
            return self._refuse(scope, ctx, "length", 400, "Bad Request", str(exc), closing=True)
        limit = rule.max_bytes
        if length == 0:
            # Nothing to type or parse; the meter still holds a server that lets more through.
            ctx.receive = _Meter(ctx.receive or receive, limit, self, scope, ctx)
            return None
        if length is not None and length > limit:
            return self._too_large(scope, ctx, limit, closing=True)
        types = rule._types
        if types is not None:
            if content_type is None:
                refused = not rule.json and (length is not None or chunked)
            else:
                refused = not type_allowed(media_type(content_type.decode("latin-1")), *types)
            if refused:
                return self._unsupported(scope, ctx, rule)
        if rule.json:
            return self._check_json(scope, receive, ctx, rule)
        body = ctx.body
        if body is not None:  # an earlier step read it already
            return self._too_large(scope, ctx, limit) if len(body) > limit else None
        ctx.receive = _Meter(ctx.receive or receive, limit, self, scope, ctx)
        return None

    async def _check_json(
        self, scope: Scope, receive: Receive, ctx: GuardContext, rule: BodyRule
    ) -> Refusal | None:
        try:
            body = await read_body(ctx, receive, rule.max_bytes)
        except BodyTooLarge:
            return self._too_large(scope, ctx, rule.max_bytes, closing=True)
        if not body:
            return None
        try:
            check_json(body, rule.max_depth)
        except BodyProblem as exc:
            return self._refuse(scope, ctx, "json", 400, "Bad Request", str(exc))
        return None

    def _too_large(
        self, scope: Scope, ctx: GuardContext, limit: int, *, closing: bool = False
    ) -> Refusal:
        return self._refuse(
            scope,
            ctx,
            "too_large",
            413,
            "Content Too Large",
            f"The request body is over this route's limit of {limit} bytes.",
            closing=closing,
            extra={"max-bytes": limit},
        )

    def _unsupported(self, scope: Scope, ctx: GuardContext, rule: BodyRule) -> Refusal:
        accepted = list(rule.content_types or ())
        listed = ", ".join(accepted)
        hint = {"POST": "Accept-Post", "PATCH": "Accept-Patch"}.get(scope.get("method", ""))
        return self._refuse(
            scope,
            ctx,
            "content_type",
            415,
            "Unsupported Media Type",
            f"This route takes {listed}.",
            closing=True,
            extra={"accepted-types": accepted},
            headers=[(hint, listed)] if hint else [],
        )

    def _refuse(
        self,
        scope: Scope,
        ctx: GuardContext,
        reason: str,
        status: int,
        title: str,
        detail: str,
        *,
        closing: bool = False,
        extra: dict[str, object] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Refusal:
        """The refusal: recorded in the request log, logged once, and counted in escalation."""
        ctx.rejected = REJECTED_PREFIX + reason
        ip = ctx.client_ip or peer_ip(scope)
        logger.info(
            "Request body refused (%s, %d): %s %s from %s",
            reason,
            status,
            printable(scope.get("method", "")),
            printable(scope.get("path", "")),
            printable(ip),
        )
        if self.writer is not None:
            agent = ctx.user_agent
            if agent is None:
                agent = header_value(scope["headers"], b"user-agent")
            client = ctx.client_key or ip
            self.writer.add(
                BotEvent(
                    timestamp=time.time() * 1000.0,
                    fingerprint=ctx.fingerprint or ip,
                    ip=ip,
                    user_agent=bounded(agent),
                    detection_type="suspicious_pattern",
                    action="blocked",
                    metadata={"check": REJECTED_PREFIX + reason, "path": bounded(scope["path"])},
                    client_key=None if client == UNKNOWN_CLIENT else client,
                )
            )
        sent = list(headers or ())
        if closing:
            sent.append(("Connection", "close"))
        return problem(status, title, detail=detail, headers=sent, extra=extra)


class _Meter:
    """The app's `receive` on a streamed route: counts the body and latches past the limit."""

    __slots__ = (
        "answered",
        "ctx",
        "limit",
        "over",
        "owner",
        "receive",
        "received",
        "scope",
        "send",
        "started",
    )

    def __init__(
        self,
        receive: Receive,
        limit: int,
        owner: RequestValidationMiddleware,
        scope: Scope,
        ctx: GuardContext,
    ) -> None:
        self.receive = receive
        self.limit = limit
        self.owner = owner
        self.scope = scope
        self.ctx = ctx
        self.received = 0
        self.over = False
        #: Set by `_Answering`: the response's `send`, whether the app started a response,
        #: and whether the 413 went out instead.
        self.send: Send | None = None
        self.started = False
        self.answered = False

    async def __call__(self) -> Message:
        if self.over:
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.over = True
                await self._overflowed()
                return {"type": "http.disconnect"}
        return message

    async def _overflowed(self) -> None:
        refusal = self.owner._too_large(self.scope, self.ctx, self.limit, closing=True)
        send = self.send
        if send is None or self.started:
            return  # the response is the app's (started, or no `_Answering` around it)
        self.answered = True
        await refusal(self.scope, _nothing_to_receive, send)


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


class _Answering:
    """Around the app: hands a `_Meter` the response's `send`, so it can answer 413 itself,
    and drops what the app sends once it has."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if type(receive) is not _Meter:
            await self.app(scope, receive, send)
            return
        meter = receive
        meter.send = send

        async def app_send(message: Message) -> None:
            if meter.answered:
                return  # the client has its 413: the app's answer to the disconnect goes
            if message["type"] == "http.response.start":
                meter.started = True
            await send(message)

        try:
            await self.app(scope, receive, app_send)
        except ClientDisconnect:
            if not meter.answered:
                raise


__all__ = [
    "BODY_METHODS",
    "DEFAULT_EMBEDDINGS_MAX_BYTES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "JSON_TYPES",
    "BodyRule",
    "RequestValidationMiddleware",
    "default_body_rules",
]
