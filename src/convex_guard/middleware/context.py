"""The per-request guard context, kept in `scope["state"]` so `request.state` sees it too."""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive

from convex_guard.core.fingerprint import DEFAULT_FIELDS
from convex_guard.core.headers import RequestHeaders, header_reader
from convex_guard.core.limits import Decision, LimitConfig, LimitResult
from convex_guard.core.streamusage import UsageReader
from convex_guard.stores.base import BotAction, BotCheck, BotVerdict, KeyQuota

STATE_KEY = "convex_guard"

#: What rules, key routes, exempt, allow and probe paths and the log match a request on:
#: (method, path), see `route_of`.
Route = tuple[str, str]
#: Distinct routes a per-route cache keeps (`remember`).
ROUTE_CACHE_SIZE = 1024

_V = TypeVar("_V")


def remember(cache: dict[Route, _V], route: Route, value: _V) -> _V:
    """Keep `value` for `route` in a per-route cache (what a step decided once for a route):
    past `ROUTE_CACHE_SIZE` distinct (method, path)s it starts over, so a client inventing
    paths cannot grow it."""
    if len(cache) >= ROUTE_CACHE_SIZE:
        cache.clear()
    cache[route] = value
    return value


@dataclass(slots=True)
class Usage:
    """What the app reports about an AI call, for the request log."""

    model: str | None = None
    tokens: int | None = None
    cost: float | None = None
    #: Inputs in an embedding batch, for the embedding request log.
    items: int | None = None
    #: `tokens` is only the completion, estimated from a stream cut off before its usage
    #: event: a settlement adds the estimate of the prompt the body sent.
    completion_only: bool = False


@dataclass(slots=True)
class Reservation:
    """What a token or cost rule reserved for a request, settled when the request ends."""

    #: The `Rule` (middleware/rules.py) that reserved it.
    rule: Any
    #: The limit state it was taken from: the rule's, or the key's tier's.
    name: str
    config: LimitConfig
    key: str | None
    amount: float
    #: The store's clock when it was decided (epoch ms), for a refund's window.
    reserved_at: float
    #: The body's `model`, for pricing reported tokens when the app names no model.
    model: str | None


@dataclass(slots=True)
class GuardContext:
    """Everything the middlewares learned about one request, for the next ones and the app.

    Each middleware fills its own fields; one that needs a field another fills checks at
    construction that the other runs first, so a missing field here is a bug, not a client error.
    """

    #: The request's (method, path) as matched, see `route_of`; set when the context is made.
    route: Route = ("GET", "/")
    #: The client's address as resolved (trusted proxies only), e.g. "2001:db8::7".
    client_ip: str | None = None
    #: The key limits use for the client: the address, or its network for IPv6 (a /64).
    client_key: str | None = None
    fingerprint: str | None = None
    user_agent: str | None = None
    #: What the checks read from the request's headers, read once (`request_headers`).
    headers: RequestHeaders | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    api_key_name: str | None = None
    api_key_hash: str | None = None
    scopes: tuple[str, ...] = ()
    bot_category: str | None = None
    bot_action: BotAction | None = None
    #: A flagged request's bot check, left for the rate-limit middleware to decide in the same
    #: store call as the limits (set only when bot detection defers to it).
    pending_bot: PendingBot | None = None
    #: The fast path's decisions not yet made `limits` entries: (rule names, decisions), set by
    #: the rate limiter (`decide`), made into `LimitResult`s only when something reads
    #: `limits`, which most requests never do.
    decided: tuple[tuple[str, ...], list[Decision]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    #: Why the guard itself answered (e.g. "rate_limited:ipAIRequests"), for the request log.
    rejected: str | None = None
    #: What a shadow rule or a guard in shadow mode would have refused the request for, in
    #: the words of `rejected` (the request went on): the log row's `shadow`.
    shadow: str | None = None
    #: What `report_usage` recorded; None until the app reports something (most requests
    #: never do, so none pays for an empty one).
    usage: Usage | None = None
    #: What the request logger's row says of the request's route (None: not logged), the same
    #: object for every request of the route; the request's own part of the row is below
    #: (`timestamp`, `started`, `status`, `stream`, `first_output`).
    log_entry: LogEntry | None = None
    #: The request body, when a step read it before the app (`middleware/body.py`); the app
    #: gets the same bytes through `receive` below.
    body: bytes | None = None
    #: The `receive` the app gets instead of the server's, when a step reads or watches the
    #: body (a replay of what it read, a byte count that refuses an oversized stream): each
    #: such step wraps the one before it (`ctx.receive or receive`).
    receive: Receive | None = None
    #: Headers a step wants on the response (the rate limiter's `RateLimit` fields), added by
    #: the runner that ran that step, on the response start or the WebSocket accept.
    response_headers: list[tuple[bytes, bytes]] | None = None
    #: The response's status as sent (0 until it starts), recorded by the runner that logs the
    #: request or adds the response headers: for the log row, and for a settlement to tell a
    #: failed response by. A WebSocket handshake's is `steps.handshake_status`'s.
    status: int = field(default=0, init=False, repr=False, compare=False)
    #: When a logged request was started: the store's clock (epoch ms) for its row, and
    #: `time.perf_counter()` for its latency.
    timestamp: float = field(default=0.0, init=False, repr=False, compare=False)
    started: float = field(default=0.0, init=False, repr=False, compare=False)
    #: A logged event-stream response's `UsageReader` (the runner feeds it each chunk, and
    #: reads it once when the request ends), and the `perf_counter` time its first output was
    #: sent.
    stream: UsageReader | None = field(default=None, init=False, repr=False, compare=False)
    first_output: float | None = field(default=None, init=False, repr=False, compare=False)
    # The fields below are set only by the steps that need them, which most requests never
    # reach: they stay unset until then (read them with `getattr(ctx, name, default)`), so the
    # context of every other request is built without them.
    #: The verified key's tier (`KeyQuota`s of its record, when it has any): what the rate
    #: limiter's rules with `tier=True` limit the key by instead of their own config.
    api_key_quotas: tuple[KeyQuota, ...] = field(init=False, repr=False, compare=False)
    #: Token and budget reservations to settle when the request ends (the rate limiter's).
    reservations: list[Reservation] = field(init=False, repr=False, compare=False)
    #: What `limits` answers: made on its first read.
    _limits: MutableMapping[str, LimitResult] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def limits(self) -> MutableMapping[str, LimitResult]:
        """Each rate limit's result for this request by its name (the key's own limit as
        `apiKey`): what the rate limiter decided, for the app to read (`RateLimit` in its own
        words, a warning near exhaustion)."""
        return self._results()

    @limits.setter
    def limits(self, value: MutableMapping[str, LimitResult]) -> None:
        self.decided = None
        self._limits = value

    def decide(self, names: tuple[str, ...], decisions: list[Decision]) -> None:
        """Record a fast decision's results (`names[i]` decided `decisions[i]`), made into
        `limits` entries when it is read; a decision recorded before is made into them now."""
        if self.decided is not None:
            self._results()
        self.decided = (names, decisions)

    def _results(self) -> MutableMapping[str, LimitResult]:
        """`limits`, with the recorded decision's results made into its entries first."""
        found = self._limits
        if found is None:
            found = self._limits = {}
        decided = self.decided
        if decided is not None:
            self.decided = None
            for name, decision in zip(*decided, strict=True):
                found[name] = LimitResult(*decision)
        return found


class LogEntry:
    """What a logged route's rows say of it: its `provider` (None for an embedding request)
    and the `note` its rows' `error` carries whatever the request's outcome (a provider
    outside the logged set, logged as `other`).

    Made once per route and shared by its requests (an object per request cost as much as
    the rest of the log row): what differs per request is in the `GuardContext`.
    """

    __slots__ = ("note", "provider")

    def __init__(self, provider: str | None, note: str | None = None) -> None:
        self.provider = provider
        self.note = note

    def __repr__(self) -> str:
        return f"LogEntry(provider={self.provider!r}, note={self.note!r})"


@dataclass(slots=True)
class PendingBot:
    """A bot check deferred to the rate-limit middleware, and how to answer its verdict.

    `respond(None)`: the store could not decide it; the bot middleware's fail policy answers.
    """

    check: BotCheck
    respond: Callable[[BotVerdict | None], ASGIApp | None]


def route_of(scope: MutableMapping[str, Any]) -> Route:
    """The (method, path) every guard check matches a request on, as Starlette routes it.

    The path is Starlette's route path: without `root_path`, which a server (`--root-path`)
    or a `Mount` puts in front of it, so a rule for `/api/ai` holds however the app is
    mounted. HEAD is matched as GET (Starlette serves it with the GET handler), and a
    WebSocket handshake is the GET request it is on the wire.
    """
    method: str = scope.get("method", "GET")
    if method == "HEAD":
        method = "GET"
    if scope.get("root_path"):
        return method, get_route_path(scope)
    # A scope without a path (an app's own scope handed to `report_usage`) routes nowhere.
    return method, scope.get("path", "")


def matched_methods(methods: Iterable[str]) -> frozenset[str]:
    """A rule's or key route's methods as `route_of` names them: upper case, HEAD as GET."""
    return frozenset("GET" if m.upper() == "HEAD" else m.upper() for m in methods)


def guard_context(scope: MutableMapping[str, Any], route: Route | None = None) -> GuardContext:
    """The request's guard context, created on first use (every middleware asks for it).

    Its `route` is computed once, when it is created (or given, by a caller that has it
    already): every middleware after the first reads it.
    """
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    ctx: GuardContext | None = state.get(STATE_KEY)
    if ctx is None:
        ctx = state[STATE_KEY] = GuardContext(route_of(scope) if route is None else route)
    return ctx


def request_headers(scope: MutableMapping[str, Any], ctx: GuardContext) -> RequestHeaders:
    """The request's headers as the checks read them: read once per request, by the first
    step that asks (the fingerprint's, with its own field list), then shared."""
    found = ctx.headers
    if found is None:
        found = ctx.headers = header_reader(DEFAULT_FIELDS).read(scope["headers"])
    return found


def current_context(scope: MutableMapping[str, Any]) -> GuardContext | None:
    """The request's guard context if a middleware outside made one, else None (none is made)."""
    state = scope.get("state")
    if not state:
        return None
    ctx: GuardContext | None = state.get(STATE_KEY)
    return ctx


def request_route(scope: MutableMapping[str, Any]) -> Route:
    """The request's route: its guard context's when it has one, else computed now."""
    state = scope.get("state")
    ctx: GuardContext | None = state.get(STATE_KEY) if state else None
    return ctx.route if ctx is not None else route_of(scope)
