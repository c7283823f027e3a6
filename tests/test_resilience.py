"""The circuit breaker and the in-process fallback that keep limits working in an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from convex_guard import (
    HOUR,
    BotCheck,
    BotEvent,
    CheckResult,
    FixedWindow,
    LimitRequest,
    LogBatch,
    MemoryStore,
    StoreError,
)
from convex_guard.stores.resilient import CircuitBreaker, CircuitOpenError, ResilientStore

from .fault_tools import breaker_state


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(MemoryStore):
    """A shared store that can be taken down (raising) or made to hang."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "up"
        self.calls = 0

    async def _trouble(self) -> None:
        self.calls += 1
        if self.mode == "down":
            raise StoreError("connection refused")
        if self.mode == "hang":
            await asyncio.sleep(3600)

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        await self._trouble()
        return await super().check(limits, bot=bot)

    async def write_logs(self, batch: LogBatch) -> None:
        await self._trouble()
        await super().write_logs(batch)


def test_breaker_opens_after_threshold_and_probes_after_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, cooldown=2.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert breaker_state(breaker) == "closed"
    assert breaker.allow()
    breaker.failed()
    assert breaker_state(breaker) == "open" and not breaker.allow()
    clock.now = 1.9
    assert not breaker.allow()
    clock.now = 2.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failed()  # the probe failed: open again for a full cooldown
    assert breaker_state(breaker) == "open"
    clock.now = 4.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker_state(breaker) == "closed" and breaker.allow()


async def test_outage_falls_back_to_local_limits_and_recovers() -> None:
    primary = FlakyStore()
    clock = Clock()
    events: list[BotEvent] = []
    store = ResilientStore(
        primary,
        timeout=0.2,
        breaker=CircuitBreaker(threshold=2, cooldown=1.0, clock=clock),
        on_outage_events=events.append,
    )
    limit = [LimitRequest("ip", FixedWindow(rate=3, period=HOUR, start=0), "1.2.3.4")]
    assert (await store.check(limit)).ok
    assert primary.calls == 1
    primary.mode = "down"
    decided = [(await store.check(limit)).ok for _ in range(5)]
    # The fallback enforces the limit on its own: 3 admitted in all (it starts full).
    assert decided == [True, True, True, False, False]
    assert primary.calls == 3  # two failures opened the circuit: no more calls paid for
    bot = BotCheck("fp", "1.2.3.4", "curl/8", "bot_useragent", "allowed")
    assert (await store.check([], bot=bot)).bot is not None
    assert [e.fingerprint for e in events] == ["fp"]  # queued for the shared store
    primary.mode = "up"
    clock.now = 1.0  # cooldown over: the next call probes, succeeds and closes the circuit
    assert (await store.check(limit)).ok
    # The probe is the replay of the one admission made while the circuit was open (the two
    # that failed after being sent are not replayed: they may have been applied), then the
    # check itself: the shared store has now seen 3 of its 3.
    assert store.breaker.state == "closed" and primary.calls == 5
    assert not (await primary.check(limit)).ok


async def test_a_hanging_store_costs_at_most_the_timeout() -> None:
    primary = FlakyStore()
    primary.mode = "hang"
    store = ResilientStore(primary, timeout=0.1, breaker=CircuitBreaker(threshold=2))
    limit = [LimitRequest("ip", FixedWindow(rate=3, period=HOUR), "k")]
    started = time.monotonic()
    for _ in range(10):
        assert (await store.check(limit)).results  # decided by the fallback
    elapsed = time.monotonic() - started
    # Two timeouts open the circuit; the other eight fail fast.
    assert primary.calls == 2
    assert elapsed < 1.0
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_without_fallback_errors_reach_the_fail_policy() -> None:
    primary = FlakyStore()
    primary.mode = "down"
    store = ResilientStore(primary, use_fallback=False, breaker=CircuitBreaker(threshold=1))
    limit = [LimitRequest("ip", FixedWindow(rate=3, period=HOUR), "k")]
    with pytest.raises(StoreError):
        await store.check(limit)
    with pytest.raises(CircuitOpenError):
        await store.check(limit)
    # Log writes do not pass the request path's breaker: they reach the store (down here).
    with pytest.raises(StoreError) as raised:
        await store.write_logs(LogBatch(id="x"))
    assert not isinstance(raised.value, CircuitOpenError)
