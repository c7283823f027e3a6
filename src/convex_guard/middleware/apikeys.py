"""API keys: `Authorization: Bearer …` or `X-API-Key`, verified by hash, scoped per route."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from functools import lru_cache

from starlette.types import ASGIApp, Receive, Scope

from convex_guard.core.clientip import UNKNOWN_CLIENT, peer_ip
from convex_guard.core.errors import ConfigurationError, StoreAnswerError
from convex_guard.core.headers import RequestHeaders, bounded
from convex_guard.core.keys import NO_KEY, ApiKeyKind, hash_key, is_well_formed
from convex_guard.core.limits import FixedWindow, LimitConfig, LimitResult
from convex_guard.core.logs import ThrottledLog, printable
from convex_guard.core.presets import seed_limits
from convex_guard.core.problem import QUOTA_TITLE, problem, quota_exceeded, retry_after, unavailable
from convex_guard.middleware.context import (
    GuardContext,
    Route,
    matched_methods,
    remember,
    request_headers,
)
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.middleware.order import API_KEYS
from convex_guard.middleware.rules import _path_matcher
from convex_guard.middleware.steps import Before, Refusal, StepMiddleware
from convex_guard.stores.base import (
    ApiKeyRecord,
    AuthFailure,
    BotEvent,
    KeyStore,
    LimitStore,
    LogStore,
    Store,
    require,
)
from convex_guard.stores.keys import key_status
from convex_guard.stores.resilient import answers_checked

DEFAULT_CACHE_TTL = 5.0
DEFAULT_CACHE_SIZE = 10_000
DEFAULT_TIMEOUT = 0.5
#: Header values longer than this are refused before any parsing.
MAX_HEADER_BYTES = 1024
FAILED_AUTH = "failedAuth"
REALM = 'Bearer realm="convex-guard"'

Clock = Callable[[], float]


def _wall_clock_ms() -> float:
    return time.time() * 1000.0


@dataclass(frozen=True)
class KeyRoute:
    """Which requests need (or may carry) an API key, of which kind, with which scopes.

    - `path`: a prefix on a segment boundary (`"/api/ai"` covers `/api/ai/…`, not `/api/aix`).
    - `methods`: HTTP methods, `None` for all; HEAD is matched as GET, a WebSocket
      handshake as GET. Paths are matched without `root_path`, as Starlette routes.
    - `scopes`: every one of them must be granted to the key (else 403).
    - `kind`: the kind of key accepted here, `"ai"` or `"embedding"`.
    - `required`: without a key the request is refused (401); when false, anonymous requests
      pass, but a key that is presented must still be valid.
    """

    path: str
    methods: Collection[str] | None = None
    scopes: Collection[str] = ()
    kind: ApiKeyKind = "ai"
    required: bool = True
    _matches_path: Callable[[str], bool] = field(init=False, repr=False, compare=False)
    _methods: frozenset[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("ai", "embedding"):
            raise ConfigurationError(f"KeyRoute {self.path!r}: kind must be 'ai' or 'embedding'")
        if isinstance(self.scopes, str):
            raise ConfigurationError(f"KeyRoute {self.path!r}: scopes must be a list of names")
        methods = None if self.methods is None else matched_methods(self.methods)
        object.__setattr__(self, "_methods", methods)
        object.__setattr__(self, "_matches_path", _path_matcher(self.path))

    def matches(self, path: str, method: str) -> bool:
        return (self._methods is None or method in self._methods) and self._matches_path(path)


class KeyRefusal(Enum):
    """Why a request was refused a key: its `ctx.rejected`, status, RFC 6750 error and text."""

    MISSING = (
        "api_key_missing",
        401,
        None,
        "Unauthorized",
        "This route requires an API key (Authorization: Bearer, or X-API-Key).",
    )
    INVALID = (
        "api_key_invalid",
        401,
        "invalid_token",
        "Unauthorized",
        "The API key is invalid, revoked or expired.",
    )
    SCOPE = (
        "api_key_scope",
        403,
        "insufficient_scope",
        "Forbidden",
        "The API key lacks a scope this route requires.",
    )

    def __init__(
        self, rejected: str, status: int, error: str | None, title: str, detail: str
    ) -> None:
        self.rejected = rejected
        self.status = status
        self.error = error
        self.title = title
        self.detail = detail


class _Malformed(Exception):
    """The credentials header cannot be a key; the request is refused without a lookup."""


def _presented_key(headers: RequestHeaders) -> str | None:
    """The key presented in `Authorization: Bearer` or `X-API-Key`, `None` if neither is.

    Raises `_Malformed` for anything ambiguous or unparsable: several credentials headers,
    two different keys, `Bearer` without a token, non-ASCII or oversized values.
    """
    authorization, presented = headers.authorization, headers.api_key
    if authorization is None and presented is None:
        return None  # the usual anonymous request: nothing more to build
    bearer: list[bytes] = []
    api_key: list[bytes] = []
    for value in authorization or ():
        if len(value) > MAX_HEADER_BYTES:
            raise _Malformed("oversized Authorization header")
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            bearer.append(token.strip())
    for value in presented or ():
        if len(value) > MAX_HEADER_BYTES:
            raise _Malformed("oversized X-API-Key header")
        api_key.append(value.strip())
    if not bearer and not api_key:
        return None  # the usual anonymous request: nothing more to build
    if len(bearer) > 1 or len(api_key) > 1:
        raise _Malformed("several credentials headers")
    found = set(bearer + api_key)
    if not found:
        return None
    if len(found) > 1:
        raise _Malformed("two different keys")
    raw = found.pop()
    if not raw:
        raise _Malformed("empty token")
    try:
        key = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Malformed("non-ASCII token") from None
    if not is_well_formed(key):
        raise _Malformed("malformed token")
    return key


@lru_cache(maxsize=256)
def _key_limit(requests: int, period: float) -> LimitConfig:
    # Built once per distinct limit: a config is a pydantic model, too slow to build per request.
    # A key's stored period is milliseconds by contract, so a sub-second one is meant as given.
    return FixedWindow(rate=requests, period=timedelta(milliseconds=period))


class ApiKeyMiddleware(StepMiddleware):
    """Verify API keys on the routes in `routes` (first match wins) and fill the guard context.

    The key's hash is looked up in the store; positive lookups are cached in-process for
    `cache_ttl` seconds (bounded LRU of `cache_size`), so a revoked key stops working within
    `cache_ttl` seconds on every instance. Expiry is checked on every request, cached or not.

    Failures get 401 (no key, or an invalid one: RFC 6750 `invalid_token`) or 403 (a valid key
    without the route's scopes: `insufficient_scope`), each recorded as an auth failure and
    charged to the client IP's `failed_auth` limit (the seed's `failedAuth`: 10 per hour).
    Once that is spent the client gets 429 and a `rate_limit` bot event is recorded; the
    client's further guesses are then refused locally, without a lookup, until the limit's
    retry time: guessing keys costs the guesser, not the store. What is throttled is failed
    attempts, not valid keys: a key this process has found valid (any of the last
    `cache_size`) is still looked up and accepted from a throttled client, so people sharing
    an address (a NAT, a proxy) with a guesser keep working. A valid key this process has
    never seen cannot be told from a guess without a lookup, and waits out the throttle.

    A key's own rate limit (`requests` per `period`) is applied through the store under
    `apiKey:<id>`. Auth failures, bot events and key usage go through `writer` (by default the
    store's shared `LogWriter`), in batches. A store that cannot answer within `timeout`
    seconds makes keyed requests fail closed with 503: a key that cannot be checked is not
    trusted.
    """

    marker = API_KEYS

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store,
        routes: Sequence[KeyRoute],
        writer: LogWriter | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        failed_auth: LimitConfig | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        if not routes:
            raise ConfigurationError("ApiKeyMiddleware needs at least one KeyRoute")
        if not 0 <= cache_ttl < math.inf:
            raise ConfigurationError("cache_ttl must be a non-negative number of seconds")
        if cache_size < 1:
            raise ConfigurationError("cache_size must be at least 1")
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        # Keys are looked up, their own limits and the failed-auth limit decided, and auth
        # failures written through the writer (a writer given brings a store it has checked).
        needs = (KeyStore, LimitStore) if writer is not None else (KeyStore, LimitStore, LogStore)
        require(store, needs, "ApiKeyMiddleware")
        super().__init__(app)
        self.store = store
        self.routes = tuple(routes)
        # Which route (or none) a (method, path) falls under: the same few come back.
        self._routes_for: dict[Route, KeyRoute | None] = {}
        self.writer = writer if writer is not None else LogWriter.for_store(store)
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.failed_auth = failed_auth if failed_auth is not None else seed_limits()[FAILED_AUTH]
        self.timeout = timeout
        # A ResilientStore owns the timeout (and a MemoryStore never waits): no second timer.
        self._bounded = not answers_checked(store)
        self.clock: Clock = clock or _wall_clock_ms
        self._cache: OrderedDict[str, tuple[ApiKeyRecord, float]] = OrderedDict()
        # IP -> epoch ms until which its failed-auth limit is known to be spent.
        self._throttled: OrderedDict[str, float] = OrderedDict()
        # Hashes the store last answered as usable keys (an LRU, refreshed at every store
        # lookup): what a throttled client may still present. A guess is never among them.
        self._known_valid: OrderedDict[str, None] = OrderedDict()
        self._bad_input = ThrottledLog()
        self._refused = ThrottledLog()
        self._throttle_log = ThrottledLog()
        self._store_trouble = ThrottledLog()

    def writers(self) -> tuple[LogWriter, ...]:
        return (self.writer,)

    def applies_to(self, route: Route) -> bool:
        """Only on the key routes: elsewhere no key is read, whatever the request sends."""
        return self._route_for(route) is not None

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        """The key check to await, when the route takes a key and one is presented or needed.

        A request off the keyed routes, or anonymous where a key is optional, awaits nothing.
        """
        try:  # `_route_for` without its call: its plan asked for this route already
            route = self._routes_for[ctx.route]
        except KeyError:  # the cache started over since
            route = self._first_route(ctx.route)
        if route is None:
            return None
        headers = ctx.headers or request_headers(scope, ctx)
        try:
            # The usual anonymous request sends no credentials header: nothing to parse.
            anonymous = headers.authorization is None and headers.api_key is None
            key = None if anonymous else _presented_key(headers)
        except _Malformed as exc:
            ip = ctx.client_ip or peer_ip(scope)
            self._bad_input.warning(
                "API key refused from %s on %s: %s", printable(ip), printable(scope["path"]), exc
            )
            return self._fail(scope, ctx, ip, self.clock(), NO_KEY, KeyRefusal.INVALID)
        if key is not None:
            return self._verify(scope, ctx, route, key)
        if route.required:
            ip = ctx.client_ip or peer_ip(scope)
            return self._fail(scope, ctx, ip, self.clock(), NO_KEY, KeyRefusal.MISSING)
        return None  # anonymous, where a key is optional

    def _route_for(self, request: Route) -> KeyRoute | None:
        """The key route a (method, path) falls under, if any: the same few come back.

        `request` is the request's route as matched (`context.route_of`: without
        `root_path`, HEAD as GET).
        """
        try:
            return self._routes_for[request]
        except KeyError:
            return self._first_route(request)

    def _first_route(self, request: Route) -> KeyRoute | None:
        # Apart from `_route_for`: its generator's closure is made on a route's first request
        # only, not on every one.
        method, path = request
        found = next((r for r in self.routes if r.matches(path, method)), None)
        return remember(self._routes_for, request, found)

    async def _verify(
        self, scope: Scope, ctx: GuardContext, route: KeyRoute, raw: str
    ) -> Refusal | None:
        """Verify a well-formed presented key: fill the context, or the refusal to send."""
        path: str = scope["path"]
        now = self.clock()
        ip = ctx.client_ip or peer_ip(scope)
        # Failed attempts are counted per client key (an IPv6 client's /64 when the fingerprint
        # middleware runs), so a guesser cannot reset the count by hopping addresses.
        client = ctx.client_key or ip
        key_hash = hash_key(raw)
        del raw  # from here on only the hash exists
        if self._throttled_until(client, now) and key_hash not in self._known_valid:
            return self._throttle(scope, ctx, ip, now, self._throttled[client])
        try:
            record = await self._lookup(key_hash, now)
        except Exception as exc:
            self._store_trouble.warning("API key lookup failed (%s): %r", printable(path), exc)
            ctx.rejected = "api_key_unavailable"
            return unavailable(
                "API key verification is unavailable",
                "The key store did not answer in time; try again shortly.",
            )
        status = key_status(record, now, route.kind)
        if status != "valid" or record is None:
            if status != "wrong_kind":
                self._known_valid.pop(key_hash, None)
            # The hash prefix ties the line to the auth-failure row without revealing the key.
            self._refused.warning(
                "API key refused from %s on %s: %s (sha256 %s…)",
                printable(ip),
                printable(path),
                status,
                key_hash[:12],
            )
            return await self._fail(scope, ctx, ip, now, key_hash, KeyRefusal.INVALID)
        missing = [s for s in route.scopes if s not in record.scopes]
        if missing:
            return await self._fail(scope, ctx, ip, now, key_hash, KeyRefusal.SCOPE, missing)

        ctx.api_key_id = record.id
        ctx.api_key_name = record.name
        ctx.api_key_hash = key_hash
        ctx.scopes = record.scopes
        if record.quotas:
            ctx.api_key_quotas = record.quotas
        if record.owner is not None:
            ctx.user_id = record.owner
        if record.rate_limit is not None:
            refusal = await self._within_key_limit(ctx, record)
            if refusal is not None:
                return refusal
        self.writer.record_key_usage(record.id, now)
        return None

    # -- lookups ---------------------------------------------------------------------------
    async def _lookup(self, key_hash: str, now: float) -> ApiKeyRecord | None:
        cache = self._cache
        hit = cache.get(key_hash)
        if hit is not None:
            record, cached_at = hit
            if now - cached_at < self.cache_ttl * 1000:
                cache.move_to_end(key_hash)
                return record
            del cache[key_hash]
        if self._bounded:
            async with asyncio.timeout(self.timeout):
                found = await self.store.find_api_key(key_hash)
        else:
            found = await self.store.find_api_key(key_hash)
        if found is not None and not isinstance(found, ApiKeyRecord):
            raise StoreAnswerError(f"find_api_key answered a {type(found).__name__}")
        # Only usable keys are cached: a revoked or unknown key is looked up again each time,
        # so a guesser gains nothing from the cache and a restored key works at once.
        if found is not None and key_status(found, now, None) == "valid":
            known = self._known_valid
            known[key_hash] = None
            known.move_to_end(key_hash)
            if len(known) > self.cache_size:
                known.popitem(last=False)
            if self.cache_ttl:
                cache[key_hash] = (found, now)
                if len(cache) > self.cache_size:
                    cache.popitem(last=False)
        return found

    async def _limit(self, name: str, config: LimitConfig, key: str) -> LimitResult:
        """One limit decided by the store, bounded here unless the store bounds itself."""
        if self._bounded:
            async with asyncio.timeout(self.timeout):
                result = await self.store.limit(name, config, key=key)
        else:
            result = await self.store.limit(name, config, key=key)
        if not isinstance(result, LimitResult):
            raise StoreAnswerError(f"limit answered a {type(result).__name__}")
        return result

    def _throttled_until(self, ip: str, now: float) -> bool:
        until = self._throttled.get(ip)
        if until is None:
            return False
        if now < until:
            return True
        del self._throttled[ip]
        return False

    async def _within_key_limit(self, ctx: GuardContext, record: ApiKeyRecord) -> Refusal | None:
        limit = record.rate_limit
        assert limit is not None
        try:
            result = await self._limit(
                f"apiKey:{record.id}", _key_limit(limit.requests, limit.period), record.id
            )
        except Exception as exc:
            # The key is valid; only its own quota is unknown: let it through, and say so.
            self._store_trouble.warning("API key rate limit unavailable: %r", exc)
            return None
        ctx.limits["apiKey"] = result
        if result.ok:
            return None
        retry = retry_after(result.retry_after or 0.0)
        ctx.rejected = "rate_limited:apiKey"
        return quota_exceeded(
            QUOTA_TITLE,
            ["apiKey"],
            retry=retry,
            detail=f"This API key's quota is spent; retry after {retry} s.",
        )

    # -- refusals ---------------------------------------------------------------------------
    async def _fail(
        self,
        scope: Scope,
        ctx: GuardContext,
        ip: str,
        now: float,
        key_hash: str,
        refusal: KeyRefusal,
        missing: Sequence[str] = (),
    ) -> Refusal:
        """Record the failure, charge the IP's failed-auth limit: the 401/403 or 429 to send."""
        user_agent = _user_agent(scope, ctx) or None
        client = ctx.client_key or ip
        self.writer.add(
            AuthFailure(
                key_hash=key_hash, timestamp=now, ip=ip, user_agent=user_agent, client_key=client
            )
        )
        try:
            result = await self._limit(FAILED_AUTH, self.failed_auth, client)
        except Exception as exc:
            self._store_trouble.warning("Failed-auth limit unavailable: %r", exc)
        else:
            if not result.ok:
                until = now + (result.retry_after or 0.0)
                self._throttled[client] = until
                self._throttled.move_to_end(client)
                if len(self._throttled) > self.cache_size:
                    self._throttled.popitem(last=False)
                return self._throttle(scope, ctx, ip, now, until)

        challenge = REALM
        if refusal.error is not None:
            challenge += f', error="{refusal.error}"'
        if missing:
            challenge += f', scope="{" ".join(missing)}"'
        ctx.rejected = refusal.rejected
        extra: dict[str, object] = {"required-scopes": list(missing)} if missing else {}
        return problem(
            refusal.status,
            refusal.title,
            detail=refusal.detail,
            headers=[("WWW-Authenticate", challenge)],
            extra=extra,
        )

    def _throttle(
        self, scope: Scope, ctx: GuardContext, ip: str, now: float, until: float
    ) -> Refusal:
        user_agent = _user_agent(scope, ctx)
        client = ctx.client_key or ip
        self.writer.add(
            BotEvent(
                timestamp=now,
                fingerprint=ctx.fingerprint or ip,
                ip=ip,
                user_agent=user_agent,
                detection_type="rate_limit",
                action="blocked",
                metadata={"limit": FAILED_AUTH, "path": bounded(scope["path"])},
                # Counted in the client's escalation, as the bot check counts per address.
                client_key=None if client == UNKNOWN_CLIENT else client,
            )
        )
        ctx.rejected = f"rate_limited:{FAILED_AUTH}"
        retry = retry_after(until - now)
        self._throttle_log.warning(
            "Too many failed API key attempts from %s: throttled for %s s", printable(ip), retry
        )
        return quota_exceeded(
            "Too many failed authentication attempts",
            [FAILED_AUTH],
            retry=retry,
            detail=f"Too many failed API key attempts; retry after {retry} s.",
        )


def _user_agent(scope: Scope, ctx: GuardContext) -> str:
    """The user-agent for a stored row: the one the fingerprint middleware read, else read now."""
    agent = ctx.user_agent
    if agent is None:
        agent = request_headers(scope, ctx).user_agent
    return bounded(agent)
