"""What a middleware needs of its store, one capability protocol each, and the rows it keeps.

`LimitStore`, `BotStore`, `KeyStore`, `LogStore`, `AnalyticsStore`; `Store` is all of them.
Each middleware names the capabilities it needs and `require` checks them at construction.

Types built on every request (limit requests, results) are plain slotted dataclasses, not
frozen ones: a frozen dataclass costs several times as much to build. Treat them as read-only
all the same. Log rows (`AIRequestLog`, `EmbeddingRequestLog`, `AuthFailure`) are named
tuples: built once per request as the tuple a store keeps, so a flush reads no field by name.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, cast, runtime_checkable

from convex_guard.core.alerts import AlertRule
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.keys import ApiKeyKind
from convex_guard.core.limits import LimitConfig, LimitResult

BotDetectionType = Literal["bot_useragent", "ai_scraper", "suspicious_pattern", "rate_limit"]
BotAction = Literal["blocked", "challenged", "allowed"]

#: JSON-like metadata, kept small: it is stored with every bot event.
Metadata = Mapping[str, str | int | float | bool | None]

#: Escalation thresholds over the last hour of events for one fingerprint, or one client key.
ESCALATION_WINDOW_MS = 3_600_000
CHALLENGE_AFTER = 5
BLOCK_AFTER = 10


@dataclass(slots=True)
class LimitRequest:
    """One limit to decide: `name` and `key` select the state, `config` says how it refills."""

    name: str
    config: LimitConfig
    key: str | None = None
    count: float = 1.0
    reserve: bool = False
    #: The count is a reservation that a `Settlement` corrects later (a token or cost rule's
    #: estimate): decided exactly, per request, even unkeyed (never from a local lease).
    settled: bool = False


# Shared field lists. The bases declare `__slots__ = ()` and the public classes are slotted
# (no instance dict), and dataclasses takes fields from the bases last to first, so a base
# listed last (`_Stamped`, `_Identified`) puts its field first, where positional callers
# have always passed it: `BotEvent(timestamp, fingerprint, …)`, `ApiKeyRecord(id, kind, …)`.


@dataclass
class _BotFields:
    """What a bot check and the event that records its decision both say."""

    __slots__ = ()
    fingerprint: str
    ip: str
    user_agent: str
    detection_type: BotDetectionType
    action: BotAction
    metadata: Metadata | None = None


@dataclass
class _Stamped:
    __slots__ = ()
    timestamp: float


@dataclass(slots=True)
class BotCheck(_BotFields):
    """A flagged request whose fate also depends on its client's recent history.

    `action` is what the category policy alone asks for; the store escalates it (more than
    `CHALLENGE_AFTER` events in the last hour, this one included → challenged, more than
    `BLOCK_AFTER` → blocked: the 6th and 11th flagged requests), counting the events of its
    fingerprint and those of its `client_key` (the client address's limit key: an IPv6
    client's /64) and taking the larger: the fingerprint is made of headers a client chooses,
    so rotating them must not reset its history. Without a `client_key`, per fingerprint only;
    then, if still allowed, consumes `limit` (the `suspiciousBehavior` limit per fingerprint):
    denied → challenged. The final decision is recorded as a `BotEvent` with
    `metadata.previousAttempts`, in the same atomic call as the request's limits; `limit` is
    consumed whenever the bot is allowed, even if the request's own limits then deny.
    """

    limit: LimitRequest | None = None
    client_key: str | None = None


@dataclass(slots=True)
class BotVerdict:
    action: BotAction
    previous_events: int


@dataclass(slots=True)
class CheckResult:
    """The hot-path answer: the bot verdict (if asked) and every limit, decided together.

    `ok` is true only when the bot was not blocked or challenged and every limit admitted the
    request; when it is false nothing was consumed.
    """

    ok: bool
    results: tuple[LimitResult, ...]
    bot: BotVerdict | None = None
    #: The store's clock when it decided (epoch ms), if it tells: what a settlement's
    #: `reserved_at` is, so that a refund goes back only to the window it was taken from.
    now: float | None = None


@dataclass(slots=True)
class BotEvent(_BotFields, _Stamped):
    """A recorded bot decision; `ip` is the client's address, `client_key` its limit key
    (what escalation counts per client), absent on events recorded without one."""

    client_key: str | None = None


@dataclass(frozen=True, slots=True)
class KeyRateLimit:
    """A key's own limit: `requests` per `period` milliseconds (a fixed window)."""

    requests: int
    period: float


@dataclass(frozen=True, slots=True)
class KeyQuota:
    """A key's own token limit or budget (its tier): `amount` tokens or money per `period`
    milliseconds, a fixed window counted from the epoch (a `DAY` is a UTC day). It replaces
    the config of the rate limiter's rules of its unit that take the key's tier
    (`Rule(key="api_key", unit=…, tier=True)`)."""

    unit: Literal["tokens", "cost"]
    amount: float
    period: float


@dataclass(frozen=True)
class _KeyFields:
    """What a key to store and the stored record both say: only the key's SHA-256 hash."""

    __slots__ = ()
    kind: ApiKeyKind
    key_hash: str
    prefix: str
    name: str
    owner: str | None
    scopes: tuple[str, ...]
    rate_limit: KeyRateLimit | None
    created_at: float
    expires_at: float | None


@dataclass(frozen=True)
class _Identified:
    __slots__ = ()
    id: str


@dataclass(frozen=True, slots=True)
class ApiKeyRecord(_KeyFields, _Identified):
    """A stored API key: only its SHA-256 hash, never the key itself."""

    last_used: float | None
    request_count: int
    active: bool
    #: The key's tier: its own token limits and budgets.
    quotas: tuple[KeyQuota, ...] = ()


@dataclass(frozen=True, slots=True)
class NewApiKey(_KeyFields):
    """A key for `KeyStore.create_api_key`: the record's fields but those the store assigns."""

    quotas: tuple[KeyQuota, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """Usage of one key since the last flush, written in batches (never a write per request)."""

    key_id: str
    last_used: float
    requests: int


class AIRequestLog(NamedTuple):
    """One AI request. `latency_ms` runs to the response's end (a stream's last chunk);
    `ttft_ms`, for a streamed response, to its first output (None otherwise, and on rows from
    before it). `shadow`: what a shadow rule or a guard in shadow mode would have refused the
    request for, in `error`'s words (`refusal_reason` classifies both); the request went on."""

    timestamp: float
    provider: str
    model: str
    fingerprint: str
    ip: str
    success: bool
    latency_ms: float
    user_id: str | None = None
    error: str | None = None
    tokens_used: int | None = None
    cost: float | None = None
    ttft_ms: float | None = None
    shadow: str | None = None


class EmbeddingRequestLog(NamedTuple):
    """One embedding request; `request_id` makes its row unique in the store."""

    request_id: str
    api_key_hash: str
    timestamp: float
    batch_size: int
    latency_ms: float
    tokens_used: int
    success: bool
    model: str
    error: str | None = None


class AuthFailure(NamedTuple):
    """A failed authentication; `key_hash` is the hash of the presented key, or `NO_KEY`.

    `client_key`: the client's limit key (`GuardContext.client_key`: an IPv6 client's network),
    which the auth-failure alert counts per; None on rows from before it (then `ip` is used).
    """

    key_hash: str
    timestamp: float
    ip: str | None = None
    user_agent: str | None = None
    client_key: str | None = None


@dataclass(frozen=True, slots=True)
class ProviderStats:
    """A provider's figures over a range.

    `truncated` is true when the store stopped reading at its cap (or no longer holds every
    row of the range): the figures then cover only part of it. Ask for a shorter range.
    `shadow_refusals`: the requests a shadow rule (or a guard in shadow mode) would have
    refused, which went on (rows with a `shadow` reason).
    """

    total_requests: int
    success_rate: float
    average_latency: float
    total_tokens: int
    total_cost: float
    truncated: bool = False
    shadow_refusals: int = 0


@dataclass(frozen=True, slots=True)
class EmbeddingUsage:
    """A key's embeddings usage over a range; `truncated` as in `ProviderStats`."""

    total_requests: int
    successful_requests: int
    total_tokens: int
    total_items: int
    truncated: bool = False


class ApiKeyList(list[ApiKeyRecord]):
    """The keys a listing found, a plain list; `truncated` says the store stopped at its cap.

    When it is true more keys match than were returned: narrow the listing (by kind or owner).
    """

    __slots__ = ("truncated",)

    def __init__(self, records: Iterable[ApiKeyRecord] = (), *, truncated: bool = False) -> None:
        super().__init__(records)
        self.truncated = truncated

    def __repr__(self) -> str:
        return f"ApiKeyList({list(self)!r}, truncated={self.truncated})"


@dataclass(slots=True)
class Settlement:
    """The correction of one reservation, applied with the log batch it comes in.

    `amount` is charged to (name, key) of `config` like a count with `reserve` (always
    applied, the limit may go below zero: a debt the next requests wait out), or, when
    negative, handed back (the rate limiter's refund) if `refund_applies`: the state still
    exists and, for a fixed window, is still in the window of `reserved_at` (the store's
    clock when the reservation was decided, `CheckResult.now`). A charge and a refund never
    touch a local lease: settled limits are decided exactly (`LimitRequest.settled`).
    """

    name: str
    config: LimitConfig
    key: str | None
    amount: float
    reserved_at: float


@dataclass(frozen=True, slots=True)
class LogBatch:
    """Rows buffered by the logger, written in one store call.

    `id` makes the write idempotent: a batch retried after a lost answer lands once.
    """

    id: str
    ai_requests: Sequence[AIRequestLog] = ()
    embedding_requests: Sequence[EmbeddingRequestLog] = ()
    auth_failures: Sequence[AuthFailure] = ()
    bot_events: Sequence[BotEvent] = ()
    key_usage: Sequence[KeyUsage] = field(default_factory=tuple)
    #: Token and budget reservations corrected by what the requests used (see `Settlement`),
    #: applied in the same transaction as the rows, once per batch id.
    settlements: Sequence[Settlement] = ()


class LimitThroughCheck:
    """`LimitStore.limit` as a `check` of that one limit, for a store that decides every limit
    there (`ConvexStore`, `ResilientStore`, a store of your own). `MemoryStore` keeps a `limit`
    of its own: it is the in-process hot path, and the request and result lists a `check`
    builds would cost it more than the decision itself."""

    __slots__ = ()

    async def limit(
        self: LimitStore,
        name: str,
        config: LimitConfig,
        *,
        key: str | None = None,
        count: float = 1.0,
        reserve: bool = False,
    ) -> LimitResult:
        """Decide and consume one limit."""
        outcome = await self.check([LimitRequest(name, config, key, count, reserve)])
        return outcome.results[0]


# -- capabilities ------------------------------------------------------------------------------
# What a middleware needs of its store, one protocol each; a store implements those it
# supports (a Redis limiter: `LimitStore` alone) and `require` names what one lacks at
# start-up. Every method may raise `StoreError` (the middlewares then follow their fail
# policy); none may block the event loop. None needs a `close`: a store you pass is yours to
# close, and the guard closes only the stores it creates (every `Store` has one).


@runtime_checkable
class LimitStore(Protocol):
    """Rate limits: state per (name, key), decided as `core.limits` decides it.

    Each call is atomic for the keys it touches, across every process that shares the store:
    two concurrent calls never both spend the last token. A count no waiting could admit
    (more than the capacity without `reserve`) raises `ConfigurationError`, never a silent
    deny. A store may answer a burst of concurrent calls on one key with `StoreConflictError`
    for some of them, but never admit one twice.
    """

    async def limit(
        self,
        name: str,
        config: LimitConfig,
        *,
        key: str | None = None,
        count: float = 1.0,
        reserve: bool = False,
    ) -> LimitResult:
        """Decide and consume one limit (`LimitThroughCheck` implements it over `check`)."""
        ...

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        """The hot path: decide all `limits` in one atomic call, all consumed or none.

        `bot` comes only to a store that is also a `BotStore` (its history decides it, in the
        same call): the middlewares that send one require that capability at start-up. A store
        without it may raise on a `bot` it is given.
        """
        ...

    async def peek(self, name: str, config: LimitConfig, *, key: str | None = None) -> LimitResult:
        """What a request of count 0 would see now, consuming nothing."""
        ...

    async def reset(self, name: str, *, key: str | None = None) -> None:
        """Forget the state of (name, key): the next request sees the limit full."""
        ...


@runtime_checkable
class BotStore(LimitStore, Protocol):
    """Bot history: a `LimitStore` whose `check` also takes the request's `BotCheck`.

    `check(limits, bot=…)` escalates the check by the events recorded in the last hour for its
    fingerprint and its `client_key` (see `BotCheck`), consumes its `suspiciousBehavior` limit,
    records the final decision as a `BotEvent` and decides `limits`, all in one atomic call:
    a blocked or challenged bot consumes none of them. Bot events written through `write_logs`
    (when the store is also a `LogStore`) join the same history.
    """

    async def count_bot_events(self, fingerprint: str, since: float) -> int:
        """How many events were recorded for `fingerprint` at or after `since` (epoch ms)."""
        ...

    async def bot_events(self, *, since: float, limit: int = 100) -> list[BotEvent]:
        """Events recorded at or after `since`, most recent first, at most `limit`."""
        ...


@runtime_checkable
class KeyStore(Protocol):
    """API keys, kept as records that hold only the key's SHA-256 hash.

    The store assigns `id`, starts `request_count` at 0 and `active` true. Usage
    (`LogBatch.key_usage`) reaches a record through `write_logs` when the store is also a
    `LogStore`.
    """

    async def create_api_key(self, key: NewApiKey) -> ApiKeyRecord: ...

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The record of `key_hash`, revoked and expired ones too (the caller decides)."""
        ...

    async def list_api_keys(
        self, *, kind: ApiKeyKind | None = None, owner: str | None = None
    ) -> ApiKeyList:
        """Matching keys; `.truncated` on the answer when the store stopped at its cap."""
        ...

    async def update_api_key(
        self,
        key_id: str,
        *,
        active: bool | None = None,
        expires_at: float | None = None,
    ) -> ApiKeyRecord | None:
        """Change the fields given; None when there is no such key."""
        ...


@runtime_checkable
class LogStore(Protocol):
    """Where the log writer's batches go: request logs, auth failures, bot events, key usage."""

    async def write_logs(self, batch: LogBatch) -> None:
        """Write a batch of rows in one call; all rows land or none do.

        Idempotent by `batch.id`: the writer retries a batch whose answer was lost with the
        same id, and it must land once. A batch with a row the store will never accept is
        refused whole with `ConvexValidationError`, `ValueError`, `TypeError` or
        `OverflowError`: the writer then splits it until that row is dropped alone.
        `batch.settlements` are applied to the limits in the same call (a store that is also
        a `LimitStore`), once per batch id like the rows.
        """
        ...


@runtime_checkable
class AnalyticsStore(LogStore, Protocol):
    """Figures over the rows `write_logs` was given (epoch ms, both ends of a range included)."""

    async def provider_stats(self, provider: str, start: float, end: float) -> ProviderStats: ...

    async def embedding_usage(self, key_hash: str, start: float, end: float) -> EmbeddingUsage: ...

    async def count_auth_failures(self, key_hash: str, since: float) -> int: ...


@runtime_checkable
class Store(BotStore, KeyStore, AnalyticsStore, Protocol):
    """Every capability, and `close`: what `MemoryStore`, `ConvexStore` and `ResilientStore`
    are, and what the guard needs with its default settings."""

    async def close(self) -> None: ...


@functools.cache
def capability_methods(capability: type) -> tuple[str, ...]:
    """The methods a capability protocol declares, its bases' first, in declaration order."""
    names: dict[str, None] = {}
    for cls in reversed(capability.__mro__):  # `Protocol`, `Generic`, `object`: dunders only
        names.update((n, None) for n, v in vars(cls).items() if callable(v) and n[0] != "_")
    return tuple(names)


def require(store: object, needs: Iterable[type] | Mapping[type, str], who: str) -> None:
    """Raise `ConfigurationError` unless `store` has every capability in `needs`.

    The error names each capability missing, the methods it lacks (each once, under the
    first capability that needs it) and, when `needs` maps capabilities to them, what needs
    it, so a misconfigured app fails at start-up with one line saying what to implement or
    turn off. Called once, at construction; nothing is checked per request.
    """
    reasons = needs if isinstance(needs, Mapping) else dict.fromkeys(needs, "")
    named: set[str] = set()
    gaps: list[str] = []
    for capability, reason in reasons.items():
        lacking = [
            m for m in capability_methods(capability) if not callable(getattr(store, m, None))
        ]
        if not lacking:
            continue
        fresh = [m for m in lacking if m not in named]
        named.update(fresh)
        gap = capability.__name__ + (f" ({', '.join(fresh)})" if fresh else "")
        gaps.append(f"{gap}, needed by {reason}" if reason else gap)
    if gaps:
        raise ConfigurationError(f"{who}: the store {type(store).__name__} lacks {'; '.join(gaps)}")


# -- alerts --------------------------------------------------------------------------------------
# Anomaly alerts: the store evaluates the configured rules where it writes the rows they count
# (`write_logs`; on Convex the batch mutation, once for every instance) and keeps the alerts;
# the deliverer (`convex_guard.alerts.deliver`) claims each one so that one instance sends it.

AlertStatus = Literal["pending", "delivered", "failed"]
AlertOutcome = Literal["delivered", "failed", "retry"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One anomaly, deduplicated over its rule's cool-down.

    `subject` says what it is about: `key:<SHA-256 of the key>`, `client:<address>`,
    `provider:<name>` or `all`; never a raw key. `value` is what was measured last (a count
    read up to `threshold` + 1, or an error share), over `window_ms`; `count` how many
    evaluations found it between `first_seen` and `last_seen`. `attempts` counts the claims
    made to deliver it; `status` is `pending` until one succeeds or the attempts run out.
    """

    id: str
    kind: str
    subject: str
    value: float
    threshold: float
    window_ms: float
    first_seen: float
    last_seen: float
    count: int
    status: AlertStatus
    attempts: int


@runtime_checkable
class AlertStore(Protocol):
    """Alerts the store raises from the rows it is given, and their delivery claims."""

    def configure_alerts(self, rules: Sequence[AlertRule]) -> None:
        """Evaluate `rules` from now on, with every `write_logs` (`()`: none)."""
        ...

    async def alerts(self, *, since: float, limit: int = 100) -> list[Alert]:
        """Alerts seen (`last_seen`) at or after `since`, most recent first, at most `limit`."""
        ...

    async def pending_alerts(self, *, limit: int = 100) -> list[Alert]:
        """Pending alerts no live claim holds, oldest first: what a deliverer may claim."""
        ...

    async def claim_alert(self, alert_id: str, owner: str, lease_ms: float) -> bool:
        """Take `alert_id` for delivery for `lease_ms`; true for exactly one of concurrent
        claimers. A pending alert whose lease ran out (its claimer died) can be claimed again.
        Each successful claim counts one of the alert's `attempts`."""
        ...

    async def mark_alert(self, alert_id: str, owner: str, outcome: AlertOutcome) -> bool:
        """End `owner`'s claim: `delivered`, `failed` (given up: final), or `retry` (back to
        pending, for any instance to claim). False when `owner` no longer holds the claim."""


# -- the dashboard -----------------------------------------------------------------------------
# One read per refresh of `convex-guard dashboard`: every figure of a window, bucketed.

#: Upper bounds (ms, inclusive) of the latency histogram's buckets; one more bucket holds the
#: slower requests. The Convex rollups keep the same buckets (`LATENCY_BOUNDS_MS` in
#: convex/convex/lib/logs.ts), so both stores answer the same percentiles.
LATENCY_BOUNDS_MS: tuple[float, ...] = (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)

RefusalReason = Literal["limit", "bot", "key", "budget", "body"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = ("limit", "bot", "key", "budget", "body")
#: How a logged request's `error` starts when the guard refused it, by reason (the
#: middlewares' `GuardContext.rejected`; the convex rollups classify alike).
_REFUSAL_PREFIXES: tuple[tuple[str, RefusalReason], ...] = (
    ("rate_limited:", "limit"),
    ("bot_blocked", "bot"),
    ("bot_challenged", "bot"),
    ("api_key_invalid", "key"),
    ("api_key_missing", "key"),
    ("api_key_scope", "key"),
    ("budget_exceeded", "budget"),
    ("invalid_body:", "body"),  # request validation: 413, 415, 400
)

#: The most buckets one snapshot holds: a chart wider than this says nothing more.
MAX_DASHBOARD_BUCKETS = 500
#: How many keys a snapshot's `top_keys` lists.
TOP_KEYS = 10

_MINUTE_MS = 60_000


def refusal_reason(error: str | None) -> RefusalReason | None:
    """Why the guard refused a logged request, from its `error`; None if it did not."""
    if error and isinstance(error, str):  # rows written straight to a store skip the checks
        for prefix, reason in _REFUSAL_PREFIXES:
            if error.startswith(prefix):
                return reason
    return None


def latency_bucket(latency_ms: float) -> int:
    """The histogram bucket of a latency: the first bound at or above it."""
    for i, bound in enumerate(LATENCY_BOUNDS_MS):
        if latency_ms <= bound:
            return i
    return len(LATENCY_BOUNDS_MS)


def histogram_percentile(counts: Sequence[int], q: float) -> float:
    """The `q` quantile (0 < q <= 1) of a latency histogram: the upper bound of the bucket
    holding it (the last bound for the open bucket), 0 for no requests. Coarse by design:
    what a fixed-bucket rollup can answer, the same on every store."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(q * total - 1e-9))  # 0.95 * 60 must not round up to 58
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return float(LATENCY_BOUNDS_MS[min(i, len(LATENCY_BOUNDS_MS) - 1)])
    return float(LATENCY_BOUNDS_MS[-1])


def check_dashboard_range(start: float, end: float, bucket_ms: float) -> int:
    """The number of buckets of a snapshot's range, or `ValueError` for a range a store cannot
    bucket: `bucket_ms` whole minutes, `start` and `end` multiples of it, at most
    `MAX_DASHBOARD_BUCKETS` buckets."""
    if not (bucket_ms >= _MINUTE_MS and bucket_ms % _MINUTE_MS == 0):
        raise ValueError("bucket_ms must be a whole number of minutes")
    if start % bucket_ms or end % bucket_ms or end <= start:
        raise ValueError("start and end must be multiples of bucket_ms, with start < end")
    buckets = int((end - start) // bucket_ms)
    if buckets > MAX_DASHBOARD_BUCKETS:
        raise ValueError(f"at most {MAX_DASHBOARD_BUCKETS} buckets per snapshot")
    return buckets


@dataclass(frozen=True, slots=True)
class ProviderSeries:
    """One provider over a snapshot's window: `requests` and `successes` per bucket, totals,
    and the latency histogram (`LATENCY_BOUNDS_MS`) of every request in the window."""

    provider: str
    requests: tuple[int, ...]
    successes: tuple[int, ...]
    tokens: int
    cost: float
    latency_histogram: tuple[int, ...]

    @property
    def total_requests(self) -> int:
        return sum(self.requests)

    @property
    def success_rate(self) -> float:
        total = self.total_requests
        return sum(self.successes) / total if total else 0.0

    @property
    def p50(self) -> float:
        return histogram_percentile(self.latency_histogram, 0.5)

    @property
    def p95(self) -> float:
        return histogram_percentile(self.latency_histogram, 0.95)


@dataclass(frozen=True, slots=True)
class KeyUsageSummary:
    """A key as the dashboard shows it: never its hash, only what identifies it to a person
    (the prefix is what the key's owner sees at the start of it)."""

    id: str
    name: str
    prefix: str
    kind: ApiKeyKind
    requests: int
    last_used: float | None
    active: bool


@dataclass(frozen=True, slots=True)
class DashboardSnapshot:
    """Every figure of the dashboard over `[start, end)` (epoch ms), in buckets of `bucket_ms`.

    `refusals` counts the logged requests the guard refused, by reason; `bot_events` counts
    events by `(detection_type, action)`; `bot_series` and `auth_failures` are per bucket.
    `top_keys` ranks keys by their requests within the window (a batch's use of a key counts
    at its latest use, so a flush spanning a minute's end counts in the later minute), with
    `last_used` the key's latest use. `truncated` is true when the store stopped reading at a
    cap: some figures then cover only part of the window.
    """

    start: float
    end: float
    bucket_ms: float
    providers: tuple[ProviderSeries, ...]
    refusals: Mapping[RefusalReason, int]
    bot_events: Mapping[tuple[BotDetectionType, BotAction], int]
    bot_series: tuple[int, ...]
    auth_failures: tuple[int, ...]
    top_keys: tuple[KeyUsageSummary, ...]
    truncated: bool = False
    shadow_refusals: Mapping[RefusalReason, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The snapshot as the dashboard page reads it (JSON-ready, keys in camelCase)."""
        histogram = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        for series in self.providers:
            for i, n in enumerate(series.latency_histogram):
                histogram[i] += n
        requests = sum(s.total_requests for s in self.providers)
        successes = sum(sum(s.successes) for s in self.providers)
        return {
            "start": self.start,
            "end": self.end,
            "bucketMs": self.bucket_ms,
            "truncated": self.truncated,
            "totals": {
                "requests": requests,
                "successRate": successes / requests if requests else 0.0,
                "p50": histogram_percentile(histogram, 0.5),
                "p95": histogram_percentile(histogram, 0.95),
                "tokens": sum(s.tokens for s in self.providers),
                "cost": sum(s.cost for s in self.providers),
                "authFailures": sum(self.auth_failures),
                "botEvents": sum(self.bot_series),
            },
            "providers": [
                {
                    "provider": s.provider,
                    "requests": list(s.requests),
                    "successes": list(s.successes),
                    "totalRequests": s.total_requests,
                    "successRate": s.success_rate,
                    "p50": s.p50,
                    "p95": s.p95,
                    "tokens": s.tokens,
                    "cost": s.cost,
                }
                for s in self.providers
            ],
            "refusals": {reason: self.refusals.get(reason, 0) for reason in REFUSAL_REASONS},
            "shadowRefusals": {
                reason: self.shadow_refusals.get(reason, 0) for reason in REFUSAL_REASONS
            },
            "botEvents": [
                {"type": kind, "action": action, "count": n}
                for (kind, action), n in sorted(self.bot_events.items())
            ],
            "botSeries": list(self.bot_series),
            "authFailures": list(self.auth_failures),
            "topKeys": [
                {
                    "id": k.id,
                    "name": k.name,
                    "prefix": k.prefix,
                    "kind": k.kind,
                    "requests": k.requests,
                    "lastUsed": k.last_used,
                    "active": k.active,
                }
                for k in self.top_keys
            ],
        }


@runtime_checkable
class DashboardStore(AnalyticsStore, Protocol):
    """What `convex_guard.dashboard` reads: one snapshot per refresh (`check_dashboard_range`
    says which ranges a store must take). A capability of its own, so that an analytics
    store written before the dashboard still is one."""

    async def dashboard(self, start: float, end: float, bucket_ms: float) -> DashboardSnapshot:
        """Every figure of `[start, end)` in buckets of `bucket_ms`, in one read."""
        ...


#: `watch_dashboard(start, end, bucket_ms)`: the snapshot of a fixed range, pushed as it changes.
DashboardFeed = Callable[[float, float, float], AsyncIterator[DashboardSnapshot]]


def dashboard_feed(store: object) -> DashboardFeed | None:
    """The store's pushed snapshots (its `watch_dashboard`), or None: the dashboard polls.

    An optional method rather than a capability, looked up as an attribute: a wrapper
    (`ResilientStore`) has it only while what it wraps does, so the dashboard and the CLI,
    asking the attribute, decide alike. A feed that fails raises `StoreError`.
    """
    watch = getattr(store, "watch_dashboard", None)
    return watch if callable(watch) else None


# -- the audit trail -----------------------------------------------------------------------------
# Who changed which key, when, and how: one append-only entry per administrative change,
# written by the store in the same atomic step as the change (on Convex, the same mutation),
# so there is never a change without its entry nor an entry without its change.

AuditAction = Literal["key.created", "key.revoked", "key.rotated", "key.updated"]
AUDIT_ACTIONS: tuple[AuditAction, ...] = (
    "key.created",
    "key.revoked",
    "key.rotated",
    "key.updated",
)
#: What an entry records as its actor when the caller names none.
UNKNOWN_ACTOR = "unknown"
#: The longest actor an entry takes (`convex/convex/lib/audit.ts` holds the same).
MAX_ACTOR_LENGTH = 200
#: The fields of a key an entry compares, as `ApiKeyRecord` names them. Neither the hash nor
#: the display prefix (the first characters of the raw key): an entry names its key by id.
AUDITED_KEY_FIELDS: tuple[str, ...] = (
    "kind",
    "name",
    "owner",
    "scopes",
    "rate_limit",
    "quotas",
    "expires_at",
    "active",
)

AuditValue = str | float | bool | tuple[str, ...] | KeyRateLimit | tuple[KeyQuota, ...] | None

# A key's text as `core.keys.generate_key` makes it: an actor that holds one is refused, so an
# entry never carries a raw key even when a caller pastes one where its name should be.
_RAW_KEY = re.compile(r"cg_(?:ai|emb)_[0-9A-Za-z]{16,}")


@dataclass(frozen=True, slots=True)
class AuditChange:
    """One field of the record, before and after the change (None: absent, or no record)."""

    field: str
    before: AuditValue
    after: AuditValue


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One administrative change, as the store recorded it.

    `timestamp` is the store's time of the change (epoch ms); `record` the id of the record
    changed (a key's id; never the key, its hash or its prefix); `actor` who asked for it, as
    the caller named them (`UNKNOWN_ACTOR` when it did not); `changes` the fields whose value
    differs, in `AUDITED_KEY_FIELDS` order (every set field on `key.created`; none when a call
    set what was already there). `related` is the other key of a rotation: the new key's id
    on the old key's `key.rotated`, the old key's id on the new key's `key.created`.
    """

    id: str
    timestamp: float
    action: AuditAction
    record: str
    actor: str
    changes: tuple[AuditChange, ...]
    related: str | None = None


def check_actor(actor: str) -> str:
    """`actor` as an entry records it (stripped), or `ConfigurationError` for one it cannot:
    empty, longer than `MAX_ACTOR_LENGTH`, with control characters, or holding a raw key."""
    if not isinstance(actor, str):
        raise ConfigurationError("An audit actor must be a string")
    text = actor.strip()
    if not text or len(text) > MAX_ACTOR_LENGTH:
        raise ConfigurationError(f"An audit actor must be 1 to {MAX_ACTOR_LENGTH} characters")
    if not text.isprintable():
        raise ConfigurationError("An audit actor must not contain control characters")
    if _RAW_KEY.search(text):
        raise ConfigurationError("An audit actor must not contain an API key")
    return text


def check_update_action(action: str) -> AuditAction:
    """`action` if an update may record it, else `ConfigurationError` (`key.created` is the
    creation's own)."""
    if action not in AUDIT_ACTIONS or action == "key.created":
        raise ConfigurationError(f"{action!r} is not an action of a key update")
    return cast(AuditAction, action)


def audit_changes(before: ApiKeyRecord | None, after: ApiKeyRecord) -> tuple[AuditChange, ...]:
    """The audited fields that differ between two states of a key (`before` None: created)."""
    changes = []
    for name in AUDITED_KEY_FIELDS:
        old = None if before is None else getattr(before, name)
        new = getattr(after, name)
        if name == "quotas":  # no tier is no value, as Convex stores it (absent)
            old, new = old or None, new or None
        if old != new:
            changes.append(AuditChange(name, old, new))
    return tuple(changes)


@runtime_checkable
class AuditStore(KeyStore, Protocol):
    """A `KeyStore` that records every change of a key as an `AuditEntry`, in the same atomic
    step as the change: a write that fails leaves no entry, and no entry is written without
    its change. Direct calls record `UNKNOWN_ACTOR`; `ApiKeys` passes the caller's actor.

    An actor `check_actor` refuses is refused with `ConfigurationError` before anything is
    written. `update_api_key` on an existing key always records one entry (`action`, default
    `key.updated`), its `changes` empty when nothing differed; on a missing key, none.
    """

    async def create_api_key(
        self, key: NewApiKey, *, actor: str = UNKNOWN_ACTOR, related: str | None = None
    ) -> ApiKeyRecord: ...

    async def update_api_key(
        self,
        key_id: str,
        *,
        active: bool | None = None,
        expires_at: float | None = None,
        actor: str = UNKNOWN_ACTOR,
        action: AuditAction = "key.updated",
        related: str | None = None,
    ) -> ApiKeyRecord | None: ...

    async def audit_entries(
        self, *, since: float = 0.0, record: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Entries at or after `since` (epoch ms), of `record` only when given, most recent
        first, at most `limit`."""
        ...
