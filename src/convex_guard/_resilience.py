"""Surviving a store outage: a bounded timeout, a circuit breaker and an in-process fallback."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from ._errors import ConfigurationError, StoreError, StoreTimeoutError
from ._limits import LimitConfig, LimitResult
from ._logging import ThrottledLog, logger
from ._memory import MemoryStore
from ._store import (
    ApiKeyKind,
    ApiKeyList,
    ApiKeyRecord,
    BotCheck,
    BotEvent,
    CheckResult,
    EmbeddingUsage,
    LimitRequest,
    LogBatch,
    NewApiKey,
    ProviderStats,
    Store,
)

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half-open"]


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


class ResilientStore:
    """A shared store (e.g. ConvexStore) that degrades instead of failing requests.

    Every call is bounded by `timeout` seconds and goes through a circuit breaker, so while
    the store is down requests stop paying the timeout. Rate-limit decisions (`check`,
    `limit`) then fall back to `fallback`, an in-process MemoryStore (on by default; pass
    `fallback=None` to let each rule's fail policy decide instead): one instance still enforces
    its limits. Bot events decided during the outage are queued, through `on_outage_events`,
    for the shared store once it is back (GuardMiddleware connects this to its log writer).
    Everything else (keys, logs, analytics) raises `StoreError` fast while the circuit is open;
    the log writer keeps its rows and retries them in order.
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
        self.primary = primary
        self.fallback = (fallback or MemoryStore()) if use_fallback else None
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self.on_outage_events = on_outage_events
        self._trouble = ThrottledLog()

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
            # The caller gave up. A middleware's own timeout (often the same as ours, and
            # started first) lands here instead of in TimeoutError below: a call that had
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
        except Exception as exc:
            self.breaker.failed()
            raise StoreError(f"{what}: {type(exc).__name__}: {exc}") from exc
        self.breaker.succeeded()
        return result

    # -- rate limits: fall back to this process ------------------------------------------------
    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        try:
            return await self._guarded(lambda: self.primary.check(limits, bot=bot), "check")
        except StoreError as exc:
            if self.fallback is None:
                raise
            self._trouble.warning("Store unavailable (%s): deciding limits in this process", exc)
            outcome = await self.fallback.check(limits, bot=bot)
            if bot is not None and outcome.bot is not None and self.on_outage_events is not None:
                events = await self.fallback.bot_events(since=-math.inf, limit=1)
                if events:
                    self.on_outage_events(events[0])
            return outcome

    async def limit(
        self,
        name: str,
        config: LimitConfig,
        *,
        key: str | None = None,
        count: float = 1.0,
        reserve: bool = False,
    ) -> LimitResult:
        outcome = await self.check([LimitRequest(name, config, key, count, reserve)])
        return outcome.results[0]

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

    async def create_api_key(self, key: NewApiKey) -> ApiKeyRecord:
        return await self._guarded(lambda: self.primary.create_api_key(key), "create_api_key")

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
    ) -> ApiKeyRecord | None:
        return await self._guarded(
            lambda: self.primary.update_api_key(key_id, active=active, expires_at=expires_at),
            "update_api_key",
        )

    async def write_logs(self, batch: LogBatch) -> None:
        await self._guarded(lambda: self.primary.write_logs(batch), "write_logs")

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

    async def close(self) -> None:
        await self.primary.close()
        if self.fallback is not None:
            await self.fallback.close()
