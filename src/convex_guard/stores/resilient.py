"""Surviving a store outage: a bounded timeout, a circuit breaker and an in-process fallback."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

from convex_guard.core.alerts import AlertRule
from convex_guard.core.errors import (
    ConfigurationError,
    StoreAnswerError,
    StoreError,
    StoreTimeoutError,
)
from convex_guard.core.keys import ApiKeyKind
from convex_guard.core.limits import LimitConfig, LimitResult
from convex_guard.core.logs import ThrottledLog, logger
from convex_guard.stores.base import (
    Alert,
    AlertOutcome,
    AlertStore,
    ApiKeyList,
    ApiKeyRecord,
    AuditAction,
    AuditEntry,
    AuditStore,
    BotCheck,
    BotEvent,
    BotVerdict,
    CheckResult,
    DashboardFeed,
    DashboardSnapshot,
    DashboardStore,
    EmbeddingUsage,
    LimitRequest,
    LimitThroughCheck,
    LogBatch,
    NewApiKey,
    ProviderStats,
    Store,
    dashboard_feed,
    require,
)
from convex_guard.stores.memory import MemoryStore

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half-open"]

#: Limits replayed to the shared store per call when it is back: a few dozen documents per
#: mutation stay far below Convex's per-transaction limits.
REPLAY_CHUNK = 64
#: Distinct (limit, key) pairs owed to the shared store at most; an outage long and wide
#: enough to exceed it drops the excess (counted and logged), so memory stays bounded.
MAX_OWED = 100_000
_BOT_ACTIONS = frozenset(("blocked", "challenged", "allowed"))


class _AuditEntries(Protocol):
    """`AuditStore.audit_entries`, as a value."""

    def __call__(
        self, *, since: float = 0.0, record: str | None = None, limit: int = 100
    ) -> Coroutine[Any, Any, list[AuditEntry]]: ...


def _keeps_audit(store: object) -> bool:
    # An attribute test, not `isinstance(store, AuditStore)`: from Python 3.12 on that reads
    # attributes statically, and so would take a `ResilientStore` around a store without a
    # trail for one.
    return callable(getattr(store, "audit_entries", None))


def answers_checked(store: object) -> bool:
    """Whether `store` bounds its own calls and checks its answers' shape.

    A middleware puts no timer of its own around such a store: a `ResilientStore` owns the
    timeout (a second timer, started first, would fire first and turn every hanging call into
    the fail policy instead of a fallback decision), and a `MemoryStore` never waits.
    """
    return type(store) is MemoryStore or isinstance(store, ResilientStore)


def checked_answer(outcome: object, limits: int, bot: bool) -> CheckResult:
    """`outcome` if it is the answer to a `check` of `limits` limits (and a bot check when
    `bot`), else `StoreAnswerError`: an answer of the wrong shape is a failed call, never a 500.

    A refused bot may come with no limit results (nothing was decided after it).
    """
    if not isinstance(outcome, CheckResult):
        raise StoreAnswerError(f"check answered {type(outcome).__name__}, not a CheckResult")
    verdict = outcome.bot
    if bot and (not isinstance(verdict, BotVerdict) or verdict.action not in _BOT_ACTIONS):
        raise StoreAnswerError(f"check answered no usable bot verdict ({verdict!r:.80})")
    results = outcome.results
    if not isinstance(results, tuple | list):
        raise StoreAnswerError(f"check answered results of type {type(results).__name__}")
    if len(results) != limits and not (
        not results and isinstance(verdict, BotVerdict) and verdict.action != "allowed"
    ):
        raise StoreAnswerError(f"check answered {len(results)} limits for {limits}")
    for result in results:
        if not isinstance(result, LimitResult):
            raise StoreAnswerError(f"check answered a {type(result).__name__} for a limit")
    return outcome


class CircuitOpenError(StoreError):
    """The store failed repeatedly; calls fail fast until a probe succeeds."""


class CircuitBreaker:
    """Counts consecutive failures; after `threshold` the circuit opens for `cooldown` seconds.

    Open: calls fail at once instead of each paying the timeout. After the cooldown one call
    is let through as a probe (half-open): success closes the circuit, failure opens it again.
    Sans-IO: the caller reports outcomes, `clock` (monotonic seconds) is injectable.
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        cooldown: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ConfigurationError("threshold must be at least 1")
        if not 0 < cooldown < math.inf:
            raise ConfigurationError("cooldown must be a positive number of seconds")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return "half-open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go to the store now (claims the probe when half-open)."""
        if self._opened_at is None:
            return True
        if self._probing or self._clock() - self._opened_at < self.cooldown:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        if self._opened_at is not None:
            logger.warning("Store answered again: circuit closed")
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def abandoned(self) -> None:
        """A call ended with no outcome (cancelled, e.g. by the caller's own timeout).

        It says nothing about the store, but a probe must not stay claimed forever, or the
        circuit could never close again.
        """
        self._probing = False

    def failed(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            if self._opened_at is None:
                logger.warning(
                    "Store failed %d times in a row: circuit open for %.1f s",
                    self._failures,
                    self.cooldown,
                )
            self._opened_at = self._clock()
            self._probing = False


class ResilientStore(LimitThroughCheck):
    """A shared store (e.g. ConvexStore) that degrades instead of failing requests.

    Every call is bounded by `timeout` seconds and goes through a circuit breaker, so while
    the store is down requests stop paying the timeout. Rate-limit decisions (`check`,
    `limit`) then fall back to `fallback`, an in-process MemoryStore (on by default; pass
    `fallback=None` to let each rule's fail policy decide instead): one instance still enforces
    its limits. Bot events decided during the outage are queued, through `on_outage_events`,
    for the shared store once it is back (GuardMiddleware connects this to its log writer).
    Everything else (keys, analytics) raises `StoreError` fast while the circuit is open. Log
    writes are bounded by `timeout` but never pass (or trip) the breaker; the log writer keeps
    its rows and retries them in order.

    This store owns the timeout: the middlewares put no timer of their own around it (see
    `answers_checked`), so a hanging store gets fallback decisions, not the fail policy. An
    answer of the wrong shape (`checked_answer`) is a failed call: it counts against the
    breaker and falls back like any other.

    Reconciliation: what the fallback admitted while the store was down is owed to the shared
    store, and replayed to it (with `reserve`, so the replay is charged even where the quota is
    spent) before the first decision it makes once it is back: a client gets its quota once,
    not once per outage. No decision is ever counted twice there:

    - only decisions whose primary call was never sent (the circuit was open) are owed. A call
      that was made and failed (a timeout, a lost connection, an answer that could not be
      read) may have committed on the backend: its request is decided by the fallback but not
      replayed, so it is counted by the backend if the call committed, and only in this
      process if it did not. (A refused connection did not commit, but the errors do not
      always tell the two apart, so it is treated alike.) Such calls are those in flight when
      the circuit opens plus one probe per cooldown: the shared count of an outage is off by at
      most that many (under, or over when the fallback refused a call that committed), and
      never counts a decision twice;
    - a replay call is made at most once, for the same reason: one that fails after it was
      sent is dropped (counted in `dropped_replays` and logged), never retried. Only a replay
      the open circuit kept from being sent is kept for the next try.

    Exactly-once would need the backend to deduplicate replays by an id; at-most-once needs
    nothing of it, and its error is bounded by the calls made while the store was failing.
    """

    def __init__(
        self,
        primary: Store,
        *,
        fallback: MemoryStore | None = None,
        use_fallback: bool = True,
        timeout: float = 0.5,
        breaker: CircuitBreaker | None = None,
        on_outage_events: Callable[[BotEvent], None] | None = None,
    ) -> None:
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        # It answers for every capability, so a middleware's check of it says nothing of a
        # primary that lacks one: the primary must have them all.
        require(primary, (Store,), "ResilientStore")
        self.primary = primary
        self.fallback = (fallback or MemoryStore()) if use_fallback else None
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self.on_outage_events = on_outage_events
        self._trouble = ThrottledLog()
        # (limit name, key) -> the tokens the fallback admitted while the circuit was open.
        self._owed: dict[tuple[str, str | None], _Owed] = {}
        self._replaying: asyncio.Task[None] | None = None
        #: Limits whose replay failed after it was sent (may have been applied): not retried.
        self.dropped_replays = 0
        #: Limits not owed because `MAX_OWED` pairs were already owed.
        self.dropped_owed = 0

    def __repr__(self) -> str:
        return f"ResilientStore({self.primary!r}, circuit={self.breaker.state})"

    async def _guarded(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        if not self.breaker.allow():
            raise CircuitOpenError(f"{what}: store circuit open (failing fast)")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(self.timeout):
                result = await call()
        except asyncio.CancelledError:
            # The caller gave up. A timer of the caller's own (the middlewares put none
            # around this store) lands here instead of in TimeoutError below: a call that had
            # used most of its time counts as a slow store; a quicker one (the client went
            # away) judges nothing, but frees the probe it may hold.
            if loop.time() - started >= self.timeout / 2:
                self.breaker.failed()
            else:
                self.breaker.abandoned()
            raise
        except TimeoutError:
            self.breaker.failed()
            raise StoreTimeoutError(f"{what}: no answer within {self.timeout} s") from None
        except StoreError:
            self.breaker.failed()
            raise
        except ConfigurationError as exc:
            self.breaker.failed()
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            # A store parsing an answer that lacks a field or has the wrong type.
            self.breaker.failed()
            raise StoreAnswerError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            self.breaker.failed()
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
        self.breaker.succeeded()
        return result

    # -- rate limits: fall back to this process ------------------------------------------------
    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        if self._owed and self.breaker.state != "open":
            # The store may be back: charge it what the fallback admitted, before it decides
            # anything new. While the circuit is half-open the replay in flight is its probe:
            # the calls meanwhile are decided as the open circuit decides them, rather than
            # each waiting out the probe's timeout when the store is still down.
            replay = self._replaying
            if replay is None or replay.done() or self.breaker.state == "closed":
                await self._settle()
        try:
            return await self._guarded(lambda: self._primary_check(limits, bot), "check")
        except StoreError as exc:
            if self.fallback is None:
                raise
            self._trouble.warning("Store unavailable (%s): deciding limits in this process", exc)
            fallback = self.fallback
            outcome = await fallback.check(limits, bot=bot)
            verdict = outcome.bot
            if verdict is not None and self.on_outage_events is not None:
                event = fallback.last_bot_event  # the event this call recorded, in O(1)
                if event is not None:
                    self.on_outage_events(event)
            if isinstance(exc, CircuitOpenError):  # never sent: nothing of it reached the store
                if outcome.ok:
                    for request in limits:
                        self._owe(request)
                allowed = verdict is not None and verdict.action == "allowed"
                if bot is not None and bot.limit is not None and allowed:
                    self._owe(bot.limit)
            return outcome

    async def _primary_check(
        self, limits: Sequence[LimitRequest], bot: BotCheck | None
    ) -> CheckResult:
        outcome = await self.primary.check(limits, bot=bot)
        return checked_answer(outcome, len(limits), bot is not None)

    def _owe(self, request: LimitRequest) -> None:
        if request.count <= 0:
            return
        pair = (request.name, request.key)
        owed = self._owed.get(pair)
        if owed is None:
            if len(self._owed) >= MAX_OWED:
                self.dropped_owed += 1
                return
            self._owed[pair] = _Owed(request.config, request.count)
        else:
            owed.config = request.config
            owed.count += request.count

    def _settle(self) -> Awaitable[None]:
        """The replay of what is owed, started once; shielded from a caller that goes away."""
        task = self._replaying
        if task is None or task.done():
            task = self._replaying = asyncio.get_running_loop().create_task(self._replay())
        return asyncio.shield(task)

    async def _replay(self) -> None:
        owed, self._owed = self._owed, {}
        pending = [
            LimitRequest(name, o.config, key, _replayable(o.config, o.count), True)
            for (name, key), o in owed.items()
        ]
        done = replayed = 0
        try:
            while done < len(pending):
                chunk = pending[done : done + REPLAY_CHUNK]
                try:
                    await self._guarded(functools.partial(self.primary.check, chunk), "replay")
                except CircuitOpenError:
                    break  # not sent: kept below, for the next try
                except Exception as exc:
                    done += len(chunk)
                    self.dropped_replays += len(chunk)
                    logger.warning(
                        "Replaying %d limits consumed during the outage failed (%s): not "
                        "retried, as the store may have applied them",
                        len(chunk),
                        exc,
                    )
                    break
                done += len(chunk)
                replayed += len(chunk)
        finally:
            for request in pending[done:]:
                self._owe(request)
        if replayed:
            logger.warning("Store back: %d limits consumed during the outage replayed", replayed)

    async def reset(self, name: str, *, key: str | None = None) -> None:
        if self.fallback is not None:
            await self.fallback.reset(name, key=key)
        await self._guarded(lambda: self.primary.reset(name, key=key), "reset")

    async def peek(self, name: str, config: LimitConfig, *, key: str | None = None) -> LimitResult:
        try:
            return await self._guarded(lambda: self.primary.peek(name, config, key=key), "peek")
        except StoreError:
            if self.fallback is None:
                raise
            return await self.fallback.peek(name, config, key=key)

    # -- everything else: fail fast while the circuit is open ----------------------------------
    async def count_bot_events(self, fingerprint: str, since: float) -> int:
        return await self._guarded(
            lambda: self.primary.count_bot_events(fingerprint, since), "count_bot_events"
        )

    async def bot_events(self, *, since: float, limit: int = 100) -> list[BotEvent]:
        return await self._guarded(
            lambda: self.primary.bot_events(since=since, limit=limit), "bot_events"
        )

    # Key writes have no fallback: while the circuit is open they fail, entry and change
    # alike, since the primary writes both in one call. One that times out may have committed
    # (both) or not (neither); `audit_entries` tells which.
    async def create_api_key(
        self, key: NewApiKey, *, actor: str | None = None, related: str | None = None
    ) -> ApiKeyRecord:
        audit = self._audit_args(actor, related=related)
        return await self._guarded(
            lambda: self.primary.create_api_key(key, **audit), "create_api_key"
        )

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        return await self._guarded(lambda: self.primary.find_api_key(key_hash), "find_api_key")

    async def list_api_keys(
        self, *, kind: ApiKeyKind | None = None, owner: str | None = None
    ) -> ApiKeyList:
        return await self._guarded(
            lambda: self.primary.list_api_keys(kind=kind, owner=owner), "list_api_keys"
        )

    async def update_api_key(
        self,
        key_id: str,
        *,
        active: bool | None = None,
        expires_at: float | None = None,
        actor: str | None = None,
        action: AuditAction | None = None,
        related: str | None = None,
    ) -> ApiKeyRecord | None:
        audit = self._audit_args(actor, action=action, related=related)
        return await self._guarded(
            lambda: self.primary.update_api_key(
                key_id, active=active, expires_at=expires_at, **audit
            ),
            "update_api_key",
        )

    def _audit_args(self, actor: str | None, **more: str | None) -> dict[str, str]:
        """The audit arguments to pass on: those given, for a primary that keeps a trail.

        A primary without one is given none (its old signature), and asking it to record
        an actor is refused: a change must not happen without the entry it was asked for.
        """
        given = {k: v for k, v in {"actor": actor, **more}.items() if v is not None}
        if given and not _keeps_audit(self.primary):
            raise ConfigurationError(
                f"audit: the store {type(self.primary).__name__} keeps no audit trail"
            )
        return given

    @property
    def audit_entries(self) -> _AuditEntries:
        """The primary's audit trail, when it keeps one (else there is no such attribute, so
        `require`, `ApiKeys` and the CLI see what the primary is). Reads go through the
        breaker like every key call."""
        primary = self.primary
        if not _keeps_audit(primary):
            raise AttributeError(
                f"'ResilientStore': the store {type(primary).__name__} keeps no audit trail"
            )

        async def audit_entries(
            *, since: float = 0.0, record: str | None = None, limit: int = 100
        ) -> list[AuditEntry]:
            return await self._guarded(
                lambda: cast(AuditStore, primary).audit_entries(
                    since=since, record=record, limit=limit
                ),
                "audit_entries",
            )

        return audit_entries

    async def write_logs(self, batch: LogBatch) -> None:
        # Bounded, but outside the request path's breaker: a log outage, or a batch refused
        # as invalid, must never make keyed requests fail fast. The log writer backs off on
        # its own, and tells a bad row (raised as it is, to be split out) from an outage.
        try:
            async with asyncio.timeout(self.timeout):
                await self.primary.write_logs(batch)
        except TimeoutError:
            raise StoreTimeoutError(f"write_logs: no answer within {self.timeout} s") from None

    async def provider_stats(self, provider: str, start: float, end: float) -> ProviderStats:
        return await self._guarded(
            lambda: self.primary.provider_stats(provider, start, end), "provider_stats"
        )

    async def embedding_usage(self, key_hash: str, start: float, end: float) -> EmbeddingUsage:
        return await self._guarded(
            lambda: self.primary.embedding_usage(key_hash, start, end), "embedding_usage"
        )

    async def count_auth_failures(self, key_hash: str, since: float) -> int:
        return await self._guarded(
            lambda: self.primary.count_auth_failures(key_hash, since), "count_auth_failures"
        )

    # -- alerts: the primary's, outside the request path's breaker ---------------------------
    # The deliverer polls on its own task and retries by itself; its calls must not open the
    # circuit that keyed requests depend on, so they are only bounded by the timeout.
    def _alerting(self) -> AlertStore:
        primary = self.primary
        if not isinstance(primary, AlertStore):
            raise ConfigurationError(f"alerts: the store {type(primary).__name__} lacks AlertStore")
        return primary

    async def _alert_call(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except TimeoutError:
            raise StoreTimeoutError(f"{what}: no answer within {self.timeout} s") from None

    def configure_alerts(self, rules: Sequence[AlertRule]) -> None:
        # Only the shared store evaluates: the rows of an outage reach it later, through
        # the log writer's retries, and are evaluated then, once for every instance.
        self._alerting().configure_alerts(rules)

    async def alerts(self, *, since: float, limit: int = 100) -> list[Alert]:
        store = self._alerting()
        return await self._alert_call(lambda: store.alerts(since=since, limit=limit), "alerts")

    async def pending_alerts(self, *, limit: int = 100) -> list[Alert]:
        store = self._alerting()
        return await self._alert_call(lambda: store.pending_alerts(limit=limit), "pending_alerts")

    async def claim_alert(self, alert_id: str, owner: str, lease_ms: float) -> bool:
        store = self._alerting()
        return await self._alert_call(
            lambda: store.claim_alert(alert_id, owner, lease_ms), "claim_alert"
        )

    async def mark_alert(self, alert_id: str, owner: str, outcome: AlertOutcome) -> bool:
        store = self._alerting()
        return await self._alert_call(
            lambda: store.mark_alert(alert_id, owner, outcome), "mark_alert"
        )

    # -- the dashboard --------------------------------------------------------------------------
    async def dashboard(self, start: float, end: float, bucket_ms: float) -> DashboardSnapshot:
        """The primary's snapshot, bounded and through the breaker like any analytics call."""
        primary = self.primary
        if not isinstance(primary, DashboardStore):
            raise ConfigurationError(
                f"ResilientStore: the store {type(primary).__name__} has no dashboard"
            )
        return await self._guarded(lambda: primary.dashboard(start, end, bucket_ms), "dashboard")

    @property
    def watch_dashboard(self) -> DashboardFeed:
        """The primary's pushed snapshots, when it has them (else there is no such attribute,
        and the dashboard polls `dashboard`).

        Like the alert calls, the subscription bypasses the breaker: a long-lived stream that
        fails says little of the request path, and must not open the circuit keyed requests
        depend on. Any failure of it ends the iteration with a `StoreError`, on which the
        dashboard tells the page to poll (through the breaker, as every snapshot goes).
        """
        feed = dashboard_feed(self.primary)
        if feed is None:
            raise AttributeError(
                f"'ResilientStore': the store {type(self.primary).__name__} pushes no snapshots"
            )
        return functools.partial(self._followed, feed)

    @staticmethod
    async def _followed(
        feed: DashboardFeed, start: float, end: float, bucket_ms: float
    ) -> AsyncIterator[DashboardSnapshot]:
        try:
            async for snapshot in feed(start, end, bucket_ms):
                if not isinstance(snapshot, DashboardSnapshot):
                    raise StoreAnswerError(
                        f"watch_dashboard pushed a {type(snapshot).__name__}, not a snapshot"
                    )
                yield snapshot
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"watch_dashboard: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._owed and self.breaker.state != "open":
            await self._settle()  # a last try: what is still owed is lost with this process
        await self.primary.close()
        if self.fallback is not None:
            await self.fallback.close()


@dataclass(slots=True)
class _Owed:
    """Tokens the fallback admitted for one (limit, key) while the circuit was open."""

    config: LimitConfig
    count: float


def _replayable(config: LimitConfig, count: float) -> float:
    """What a replay may charge: with `max_reserved` the component refuses more than capacity
    plus it in one call, and a refused replay would charge nothing at all."""
    if config.max_reserved is not None:
        return min(count, config.max + config.max_reserved)
    return count
