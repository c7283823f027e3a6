"""A store that stops answering (the loopback Convex server SIGSTOPped: connections accepted,
never answered): requests pay at most the configured timeout, the circuit breaker spares
most of them even that, nothing leaks over 1,000 such requests, and once the server resumes
every log row lands exactly once (a batch that timed out but was applied is not written
twice)."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from examples.gateway import create_app
from starlette.types import ASGIApp, Receive, Scope, Send

from convex_guard import (
    HOUR,
    CircuitBreaker,
    FixedWindow,
    LimitRequest,
    MemoryStore,
    ResilientStore,
    Rule,
)

from .conftest import serve
from .convex_server.launch import ConvexTestServer, running_server
from .fault_tools import (
    BROWSER,
    breaker_state,
    chat,
    open_fds,
    open_sockets,
    resilient_settings,
    tasks_in,
)

TIMEOUT = 0.3
COOLDOWN = 0.5
REQUESTS = 1000
CONCURRENCY = 16
WARMUP = 20


class LoopSpy:
    """Remembers the server's event loop, to count the tasks alive in it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@pytest.fixture
def convex() -> Iterator[ConvexTestServer]:
    with running_server() as server:
        yield server


async def drive(url: str, models: list[str]) -> list[tuple[int, float]]:
    """POST one chat per model, `CONCURRENCY` at a time; (status, seconds) per request."""
    queue = list(reversed(models))
    out: list[tuple[int, float]] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"user-agent": BROWSER}, timeout=10
    ) as client:

        async def worker() -> None:
            while queue:
                model = queue.pop()
                started = time.monotonic()
                r = await client.post("/api/ai/openai/chat", json=chat(model))
                out.append((r.status_code, time.monotonic() - started))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return out


def settle(read: Callable[[], int], baseline: int, slack: int, timeout: float = 10.0) -> int:
    """`read()` once it is back within `slack` of `baseline` (or its last value)."""
    deadline = time.monotonic() + timeout
    value = int(read())
    while value > baseline + slack and time.monotonic() < deadline:
        time.sleep(0.1)
        value = int(read())
    return value


@pytest.mark.slow
# Its latency bounds are of the guard's own code: coverage's tracer, which slows every line
# of the client, the server and the writer sharing this process, is off for it.
@pytest.mark.no_cover
def test_paused_store_bounded_latency_no_leaks_no_loss(
    convex: ConvexTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    rules = [Rule("slowIp", FixedWindow(rate=100_000, period=HOUR), key="ip", path="/api/ai")]
    primary, _, settings = resilient_settings(
        convex.url, convex.admin_key, rules, timeout=TIMEOUT, cooldown=COOLDOWN
    )
    spy = LoopSpy(create_app(settings, upstream=None))
    with serve(spy, proxy_headers=False) as server:
        warm = asyncio.run(drive(server.url, [f"warm-{n}" for n in range(WARMUP)]))
        assert {s for s, _ in warm} == {200}
        time.sleep(0.5)
        loop = spy.loop
        assert loop is not None
        tasks_before = tasks_in(loop)
        sockets_before = open_sockets()
        fds_before = open_fds()

        convex.pause()
        started = time.monotonic()
        checks_before = primary.calls["check"]
        answers = asyncio.run(drive(server.url, [f"slow-{n:05d}" for n in range(REQUESTS)]))
        paused_for = time.monotonic() - started
        checks = primary.calls["check"] - checks_before
        convex.resume()

        # Back to normal: the breaker closes, the backlog of rows drains.
        deadline = time.monotonic() + 20
        while len(convex.rows("aiRequestLogs")) < WARMUP + REQUESTS:
            assert time.monotonic() < deadline, "rows never drained after the store resumed"
            time.sleep(0.2)
        tasks_after = settle(lambda: tasks_in(loop), tasks_before, 2)
        sockets_after = settle(open_sockets, sockets_before, 4)
        fds_after = settle(open_fds, fds_before, 4)
        time.sleep(0.5)
        rows = convex.rows("aiRequestLogs")

    statuses = [s for s, _ in answers]
    latencies = [seconds for _, seconds in answers]
    assert statuses == [200] * REQUESTS, "limits decided in-process while the store hangs"
    # Bounded by the timeout: 99% within it plus 1 s of scheduling on a loaded 2-core machine
    # (client, server and writer share this process's GIL), and none anywhere near the pause
    # itself, which every request would wait out if the timeout did not hold.
    p99 = sorted(latencies)[int(len(latencies) * 0.99)]
    assert p99 < TIMEOUT + 1.0, p99
    assert max(latencies) < min(TIMEOUT + 3.0, paused_for), (max(latencies), paused_for)
    # Only the probes (one per cool-down) and the calls in flight when it hung pay the timeout.
    # (Without the breaker every one of the 1,000 would wait the whole timeout, so the median
    # would be above it; a count of requests slower than the timeout would also count those a
    # slow machine delays on its own, which is not what this test is about.)
    assert checks <= CONCURRENCY + paused_for / COOLDOWN + 3, (checks, paused_for)
    assert statistics.median(latencies) < TIMEOUT, (statistics.median(latencies), checks)
    assert tasks_after <= tasks_before + 2, (tasks_before, tasks_after)
    assert sockets_after <= sockets_before + 4, (sockets_before, sockets_after)
    assert fds_after <= fds_before + 4, (fds_before, fds_after)
    models = [str(r["model"]) for r in rows]
    assert len(models) == len(set(models)) == WARMUP + REQUESTS, "each row once"
    assert sorted(models) == sorted(
        [f"warm-{n}" for n in range(WARMUP)] + [f"slow-{n:05d}" for n in range(REQUESTS)]
    )
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= 40]


class HangingStore(MemoryStore):
    """Hangs every `check` while `hang` is set (the store went quiet)."""

    hang = True

    async def check(self, limits: Any, *, bot: Any = None) -> Any:
        if self.hang:
            await asyncio.sleep(3600)
        return await super().check(limits, bot=bot)


def test_a_probe_cancelled_by_the_callers_timeout_does_not_wedge_the_circuit() -> None:
    """The middlewares wrap store calls in their own timeout, equal to the store's and started
    first: it cancels the call before the store's own timer fires. Such a cancelled call must
    still count against the store, and a cancelled probe must not keep the circuit half-open
    forever (the bug: the store came back and was never asked again)."""
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown=1.0, clock=lambda: now[0])
    primary = HangingStore()
    store = ResilientStore(primary, timeout=0.05, breaker=breaker, use_fallback=False)
    limit = [LimitRequest("x", FixedWindow(rate=5, period=HOUR), "k")]

    async def caller_gives_up() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):  # the middleware's timer, same length
                await store.check(limit)

    async def run() -> None:
        await caller_gives_up()
        await caller_gives_up()
        assert breaker.state == "open", "two calls cancelled at the timeout open the circuit"
        now[0] += 1.0
        await caller_gives_up()  # the probe, cancelled too
        assert breaker.state == "open"
        now[0] += 1.0
        primary.hang = False
        outcome = await store.check(limit)  # the next probe gets through
        assert outcome.ok and breaker_state(breaker) == "closed"

    asyncio.run(run())
