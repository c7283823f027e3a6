"""Outages and a store that misbehaves, through real uvicorn servers: a hanging Convex gets the
fallback's decisions (exactly the limit), what the fallback admitted is charged to the shared
store once it is back (once), an answer of the wrong shape is the fail policy (never a 500)
and counts against the breaker, a deferred bot check fails as the bot middleware does, and
the fallback's cost per flagged request does not grow with the events it holds."""

from __future__ import annotations

import asyncio
import math
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import pytest
from examples.gateway import create_app
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from convex_guard import (
    HOUR,
    BotCategory,
    BotCheck,
    BotEvent,
    CheckResult,
    CircuitBreaker,
    ConvexStore,
    GuardMiddleware,
    GuardSettings,
    LimitRequest,
    LogBatch,
    MemoryStore,
    ResilientStore,
    Rule,
    TokenBucket,
)
from convex_guard.middleware.botdetection import BotDetectionMiddleware, PolicyAction
from convex_guard.middleware.fingerprint import FingerprintMiddleware
from convex_guard.middleware.ratelimit import RateLimitMiddleware
from convex_guard.middleware.rules import FailPolicy
from convex_guard.stores.base import BotVerdict

from .conftest import ConvexTestServer, serve
from .fault_tools import BROWSER, Switch
from .strategies import (
    CHAT_BODY,
    call,
    headers_strategy,
    method_strategy,
    on_one_app,
    path_strategy,
)

TIMEOUT = 0.3
#: `ResilientStore`'s default cooldown, which the env-configured store uses.
COOLDOWN = 2.0
PER_HOUR = 10
EXAMPLE_BOT = "examplebot/1.0 (+http://example.com/bot)"  # category other_bot


def endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/limited", endpoint), Route("/open", endpoint)])


def ip_rule(fail: FailPolicy = "open") -> Rule:
    # A token bucket: no window boundary can fall inside the test (a fixed window's can).
    return Rule(
        "outageIp",
        TokenBucket(rate=PER_HOUR, period=HOUR, capacity=PER_HOUR),
        key="ip",
        path="/limited",
        fail=fail,
    )


def env_guard(
    monkeypatch: pytest.MonkeyPatch, convex: ConvexTestServer, fail: FailPolicy
) -> GuardMiddleware:
    """GuardMiddleware on the store the environment names: the loopback Convex server."""
    monkeypatch.setenv("CONVEX_SELF_HOSTED_URL", convex.url)
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", convex.admin_key)
    guard = GuardMiddleware(
        bare_app(),
        rules=[ip_rule(fail)],
        key_routes=(),
        timeout=TIMEOUT,
        fail=fail,
    )
    assert isinstance(guard.store, ResilientStore)
    return guard


def statuses(url: str, n: int, *, workers: int = 4, agent: str = BROWSER) -> list[int]:
    """`n` GETs of /limited from one client, `workers` at a time."""

    async def run() -> list[int]:
        out: list[int] = []
        remaining = [n]
        async with httpx.AsyncClient(
            base_url=url, headers={"user-agent": agent}, timeout=30
        ) as client:

            async def worker() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    out.append((await client.get("/limited")).status_code)

            await asyncio.gather(*(worker() for _ in range(workers)))
        return out

    return asyncio.run(run())


@pytest.fixture
def paused(convex_server: ConvexTestServer) -> Iterator[ConvexTestServer]:
    """The session's server, emptied; resumed whatever happens (other tests share it)."""
    convex_server.reset()
    try:
        yield convex_server
    finally:
        convex_server.resume()


# -- 11: a hanging store gets the fallback, not the fail policy --------------------------------


@pytest.mark.parametrize("fail", ["open", "closed"])
def test_a_hanging_store_gets_fallback_decisions_exactly_the_limit(
    monkeypatch: pytest.MonkeyPatch, paused: ConvexTestServer, fail: FailPolicy
) -> None:
    guard = env_guard(monkeypatch, paused, fail)
    with serve(guard) as server:
        paused.pause()
        got = statuses(server.url, 40)
    assert 500 not in got and 503 not in got, got
    assert got.count(200) == PER_HOUR, got
    assert got.count(429) == 40 - PER_HOUR, got


# -- 12: reconciliation ---------------------------------------------------------------------


@pytest.mark.slow
def test_what_the_fallback_admitted_is_charged_to_the_shared_store_once(
    monkeypatch: pytest.MonkeyPatch, paused: ConvexTestServer
) -> None:
    guard = env_guard(monkeypatch, paused, "open")
    with serve(guard) as server:
        paused.pause()
        # One at a time: the calls sent before the circuit opened are then exactly the ones
        # the fallback admitted. (Concurrently, a call sent, timed out and then refused by the
        # fallback may still commit: the shared store then counts a request the client was
        # refused. That is the one error the scheme allows; it never counts one twice.)
        during = statuses(server.url, 20, workers=1)
        paused.resume()
        # The calls that timed out reach the server now and may commit there: they must not
        # be counted a second time by the replay.
        time.sleep(COOLDOWN + 0.5)
        after = statuses(server.url, 10, workers=1)
        with httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}) as client:
            refused = client.get("/limited")
    assert during.count(200) == PER_HOUR, during
    assert after == [429] * 10, after
    # Decided by the shared store (not this process): the bucket holds about -1 after the
    # refused request's count, so its retry is about one token's refill (360 s). Any
    # admission counted twice there would push it to 720 s or more.
    retry = int(refused.headers["retry-after"])
    assert 300 <= retry <= 361, retry
    store = guard.store
    assert isinstance(store, ResilientStore)
    assert not store._owed and store.dropped_replays == 0

    # Another instance, with a fallback of its own that saw nothing, gets nothing either.
    other = env_guard(monkeypatch, paused, "open")
    with serve(other) as server:
        assert statuses(server.url, 3, workers=1) == [429] * 3


async def test_replays_only_what_was_never_sent_and_each_at_most_once() -> None:
    """The scheme behind "never counted twice", without a server: a call that failed after it
    was sent is decided locally and not replayed; a replay that fails after it was sent is
    dropped, not retried; one kept from being sent by the open circuit is kept."""
    clock = [0.0]
    primary = Switch(MemoryStore())
    store = ResilientStore(
        primary,
        timeout=0.1,
        breaker=CircuitBreaker(threshold=2, cooldown=1.0, clock=lambda: clock[0]),
    )
    limit = [LimitRequest("ip", TokenBucket(rate=10, period=HOUR, capacity=10), "k")]
    primary.down = True
    for _ in range(5):
        assert (await store.check(limit)).ok
    # Two calls were sent (and failed), opening the circuit; three were decided locally.
    assert primary.calls == 2
    assert store._owed[("ip", "k")].count == 3
    clock[0] = 1.0  # cooldown over: the next check replays first (the probe), still down
    assert (await store.check(limit)).ok
    # The replay was sent and failed (it may have landed): dropped, never retried. The check
    # after it met the circuit open again: decided locally, and owed.
    assert store.dropped_replays == 1 and store._owed[("ip", "k")].count == 1
    assert primary.calls == 3
    clock[0] = 2.0
    primary.down = False
    assert (await store.check(limit)).ok
    # The replay of the one owed, then the check: the shared store saw those two only.
    assert primary.calls == 5 and not store._owed
    peek = await primary.inner.peek("ip", limit[0].config, key="k")
    assert 7.9 < peek.remaining < 8.1


# -- 13: garbage answers ----------------------------------------------------------------------


GARBAGE: dict[str, Callable[[Sequence[LimitRequest], BotCheck | None, CheckResult], Any]] = {
    "none": lambda limits, bot, real: None,
    "a string": lambda limits, bot, real: "ok",
    "no results": lambda limits, bot, real: CheckResult(True, (), real.bot),
    "short results": lambda limits, bot, real: (
        CheckResult(real.ok, real.results[:-1] or (), real.bot)
        if real.results
        else CheckResult(True, (None,), real.bot)  # type: ignore[arg-type]  # garbage on purpose
    ),
    "dicts for results": lambda limits, bot, real: CheckResult(
        True,
        tuple({"ok": True} for _ in limits),  # type: ignore[misc]  # garbage on purpose
        real.bot,
    ),
    "no bot verdict": lambda limits, bot, real: CheckResult(real.ok, real.results, None),
    "unknown bot action": lambda limits, bot, real: CheckResult(
        real.ok,
        real.results,
        BotVerdict("maybe", 0) if bot is not None else None,  # type: ignore[arg-type]  # on purpose
    ),
}

BOT_ONLY = {"no bot verdict", "unknown bot action"}


class GarbageStore:
    """A store whose hot-path answers have the wrong shape (`mode`, one of GARBAGE); keys and
    the failed-auth limit answer garbage too. Everything else is a MemoryStore's."""

    def __init__(self, mode: str) -> None:
        self.inner = MemoryStore()
        self.mode = mode
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def check(self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None) -> Any:
        self.calls += 1
        real = await self.inner.check(limits, bot=bot)
        return GARBAGE[self.mode](limits, bot, real)

    async def limit(self, name: str, config: Any, **options: Any) -> Any:
        self.calls += 1
        return {"ok": True}

    async def find_api_key(self, key_hash: str) -> Any:
        self.calls += 1
        return "a key"


def garbage_json(body: object) -> httpx.MockTransport:
    """A Convex deployment that answers every call with `body` as the function's value."""
    return httpx.MockTransport(
        lambda request: httpx.Response(200, json={"status": "success", "value": body})
    )


CONVEX_GARBAGE = {
    "convex: missing fields": {"ok": True},
    "convex: results missing": {"ok": True, "now": 1.0},
    "convex: short results": {"ok": True, "now": 1.0, "results": []},
    "convex: null": None,
    "convex: a list": [1, 2],
    "convex: results of wrong type": {"ok": True, "now": 1.0, "results": [None]},
}


def garbage_store(mode: str) -> Any:
    if mode in CONVEX_GARBAGE:
        return ConvexStore(
            "http://127.0.0.1:9", "admin-key", transport=garbage_json(CONVEX_GARBAGE[mode])
        )
    return GarbageStore(mode)


@pytest.mark.parametrize("fail", ["open", "closed"])
@pytest.mark.parametrize("mode", [*GARBAGE, *CONVEX_GARBAGE])
def test_an_answer_of_the_wrong_shape_is_the_fail_policy_never_a_500(
    mode: str, fail: FailPolicy
) -> None:
    store = garbage_store(mode)
    guard = GuardMiddleware(
        bare_app(), store=store, rules=[ip_rule(fail)], key_routes=(), fail=fail
    )
    expected = 200 if fail == "open" else 503
    with serve(guard) as server:
        # (Modes that garble only the bot verdict answer a person's request correctly.)
        people = 200 if mode in BOT_ONLY else expected
        assert statuses(server.url, 3, workers=1) == [people] * 3
        # A bot whose category is recorded: its check is deferred to the limiter's call.
        assert statuses(server.url, 2, workers=1, agent=EXAMPLE_BOT) == [expected] * 2


@pytest.mark.parametrize("mode", [*GARBAGE, *CONVEX_GARBAGE])
def test_a_resilient_store_counts_garbage_against_the_breaker(mode: str) -> None:
    primary = garbage_store(mode)
    calls = [0]
    if isinstance(primary, GarbageStore):

        def count() -> int:
            return primary.calls
    else:
        original = primary._client.post

        async def counting(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return await original(*args, **kwargs)

        primary._client.post = counting

        def count() -> int:
            return calls[0]

    store = ResilientStore(
        primary, use_fallback=False, breaker=CircuitBreaker(threshold=3, cooldown=60)
    )
    guard = GuardMiddleware(
        bare_app(), store=store, rules=[ip_rule("closed")], key_routes=(), fail="closed"
    )
    agent = EXAMPLE_BOT if mode in BOT_ONLY else BROWSER
    with serve(guard) as server:
        assert statuses(server.url, 8, workers=1, agent=agent) == [503] * 8
    assert store.breaker.state == "open"
    assert count() == 3  # three garbage answers opened the circuit; the rest failed fast

    # With the fallback (the default), garbage is answered by this process: exactly the limit.
    fallback = ResilientStore(garbage_store(mode), breaker=CircuitBreaker(threshold=3))
    guard = GuardMiddleware(bare_app(), store=fallback, rules=[ip_rule()], key_routes=())
    with serve(guard) as server:
        got = statuses(server.url, PER_HOUR + 5, workers=1)
    assert got == [200] * PER_HOUR + [429] * 5


@pytest.fixture(scope="module")
def garbage_apps() -> Iterator[tuple[asyncio.Runner, dict[tuple[str, str], Any]]]:
    """The example gateway on each garbage store, fail open and closed, on one event loop."""
    apps = {}
    for mode in [*GARBAGE, *CONVEX_GARBAGE]:
        for fail in ("open", "closed"):
            settings_ = GuardSettings(store=garbage_store(mode), fail=fail, writer_interval=0.05)
            apps[(mode, fail)] = create_app(settings_, upstream=None)
    with asyncio.Runner() as runner:
        yield runner, apps


@pytest.mark.slow
@on_one_app(200)
@given(
    store=st.sampled_from(
        [(m, f) for m in [*GARBAGE, *CONVEX_GARBAGE] for f in ("open", "closed")]
    ),
    method=method_strategy,
    path=st.one_of(
        path_strategy,
        st.sampled_from(["/api/ai/openai/chat", "/api/embeddings", "/api/ai/perplexity/chat"]),
    ),
    headers=headers_strategy,
)
def test_no_request_gets_a_500_from_a_store_answering_garbage(
    garbage_apps: tuple[asyncio.Runner, dict[tuple[str, str], Any]],
    store: tuple[str, str],
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
) -> None:
    runner, apps = garbage_apps
    status, _ = runner.run(call(apps[store], method, path, headers, ("127.0.0.1", 5000), CHAT_BODY))
    assert status < 500 or status == 503, (status, store, method, path[:80])


# -- 14: one bot fail policy, deferred or not ------------------------------------------------


@pytest.mark.parametrize("fail", ["open", "closed"])
@pytest.mark.parametrize("agent", [EXAMPLE_BOT, BROWSER])
def test_a_deferred_bot_check_fails_as_the_bot_middleware_does(
    fail: FailPolicy, agent: str
) -> None:
    policy: dict[BotCategory, PolicyAction] = {"other_bot": "challenge"}

    def down() -> Switch:
        store = Switch(MemoryStore())
        store.down = True
        return store

    guard = GuardMiddleware(
        bare_app(),
        store=down(),
        rules=[ip_rule("open")],  # the limits fail open: only the bot's policy may refuse
        key_routes=(),
        bot_policy=policy,
        fail=fail,
    )
    store = down()
    stacked = FingerprintMiddleware(
        BotDetectionMiddleware(
            RateLimitMiddleware(bare_app(), store=store, rules=[ip_rule("open")]),
            store=store,
            policy=policy,
            fail=fail,
        )
    )
    answers = []
    for app in (guard, stacked):
        with serve(app) as server:
            answers.append(statuses(server.url, 2, workers=1, agent=agent))
    refused = fail == "closed" and agent == EXAMPLE_BOT
    assert answers == [[429 if refused else 200] * 2] * 2


# -- 15: the outage's cost per flagged request -------------------------------------------------


async def _allocated_per_flagged_request(events: int) -> int:
    """Peak bytes allocated by one fallback decision of a flagged request, with `events`
    events already in the fallback (its own max_rows, so none is dropped meanwhile)."""
    primary = Switch(MemoryStore())
    primary.down = True
    queued: list[BotEvent] = []
    store = ResilientStore(
        primary,
        fallback=MemoryStore(max_rows=events + 1000),
        breaker=CircuitBreaker(threshold=1, cooldown=3600),
        on_outage_events=queued.append,
    )
    assert store.fallback is not None
    await store.fallback.write_logs(
        LogBatch(
            id="seed",
            bot_events=[
                BotEvent(float(i), f"seed{i}", "10.0.0.1", "bot", "bot_useragent", "allowed")
                for i in range(events)
            ],
        )
    )
    check = BotCheck("fp", "10.0.0.2", "examplebot", "bot_useragent", "allowed")
    for _ in range(3):  # warm: the circuit opens, the fingerprint's entries exist
        await store.check([], bot=check)
    peaks = []
    tracemalloc.start()
    try:
        for _ in range(5):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            await store.check([], bot=check)
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    assert len(queued) == 8 and queued[-1].fingerprint == "fp"  # still queued, each once
    return min(peaks)


async def test_a_flagged_request_in_an_outage_costs_the_same_at_1k_and_100k_events() -> None:
    small = await _allocated_per_flagged_request(1_000)
    large = await _allocated_per_flagged_request(100_000)
    # Copying the event list is 8 bytes per event (800 kB at 100k); a decision is a few kB.
    assert large <= 2 * small + 4096, (small, large)


async def test_bot_events_copies_only_what_it_returns() -> None:
    store = MemoryStore()
    await store.write_logs(
        LogBatch(
            id="seed",
            bot_events=[
                BotEvent(float(i), "fp", "10.0.0.1", "bot", "bot_useragent", "allowed")
                for i in range(50_000)
            ],
        )
    )
    newest = await store.bot_events(since=-math.inf, limit=3)
    assert [e.timestamp for e in newest] == [49_999.0, 49_998.0, 49_997.0]
    assert [e.timestamp for e in await store.bot_events(since=49_998.5, limit=10)] == [49_999.0]
    assert await store.bot_events(since=-math.inf, limit=0) == []
    assert store.last_bot_event is not None and store.last_bot_event.timestamp == 49_999.0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        await store.bot_events(since=-math.inf, limit=1)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 50_000, peak  # a copy of the whole list would be 400 kB
