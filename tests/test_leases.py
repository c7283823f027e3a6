"""Local leases on unkeyed limits: the sans-IO bookkeeping, and ConvexStore across instances."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convex_guard import HOUR, MINUTE, ConfigurationError, FixedWindow, LimitRequest, TokenBucket
from convex_guard.core.leases import Lease
from convex_guard.middleware.rules import Rule
from convex_guard.stores.base import BotCheck
from convex_guard.stores.convex import ConvexStore

from .conftest import ConvexTestServer


def fresh_window(rate: int, period: float, **options: Any) -> FixedWindow:
    """A fixed window that began a second ago on the wall clock the server shares: a test
    takes seconds, so it never crosses a window's end unless it moves the clock itself."""
    return FixedWindow(rate=rate, period=period, start=int(time.time() * 1000) - 1000, **options)


class CountingStore(ConvexStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()

    async def _call(
        self, kind: Literal["query", "mutation"], path: str, args: Mapping[str, Any]
    ) -> Any:
        self.calls[path] += 1
        return await super()._call(kind, path, args)


def wall_ms() -> float:
    return time.time() * 1000.0


class ShiftedStore(CountingStore):
    """A counting store whose clock runs `shift` ms ahead of the wall's."""

    def __init__(self, *args: Any, **options: Any) -> None:
        self.shift = 0.0
        super().__init__(*args, clock=lambda: wall_ms() + self.shift, **options)


S = TypeVar("S", bound=ConvexStore)


class Connect:
    """Opens stores of a kind on the test server; the `connect` fixture closes them all after
    the test, passed or failed (a store the test closed itself is closed again, harmlessly)."""

    def __init__(self, server: ConvexTestServer) -> None:
        self.server = server
        self.opened: list[ConvexStore] = []

    def __call__(self, kind: type[S], **options: Any) -> S:
        store = kind(self.server.url, self.server.admin_key, timeout=10, **options)
        self.opened.append(store)
        return store


@pytest.fixture
async def connect(convex_server: ConvexTestServer) -> AsyncIterator[Connect]:
    """Stores on a freshly reset test server: each test starts from no limit state."""
    convex_server.reset()
    stores = Connect(convex_server)
    yield stores
    for store in stores.opened:
        await store.close()


# -- the sans-IO core ------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(1, 5), st.floats(0, 3_000)),
        st.tuples(st.just("grant"), st.integers(1, 5), st.sampled_from(["want", "need", "no"])),
        st.tuples(st.just("ahead"), st.just(0), st.sampled_from(["want", "no"])),
        st.tuples(st.just("untake"), st.just(0), st.floats(0, 3_000)),
        st.tuples(st.just("expire"), st.just(0), st.floats(0, 90_000)),
        st.tuples(st.just("return"), st.just(0), st.floats(0, 10_000)),
    ),
    max_size=60,
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    config=st.sampled_from(
        [
            FixedWindow(rate=50, period=MINUTE, start=0),
            TokenBucket(rate=50, period=MINUTE, capacity=50),
            FixedWindow(rate=80, period=MINUTE, start=0, shards=8),
        ]
    ),
)
def test_lease_never_admits_more_than_it_was_granted(
    ops: list[tuple[str, int, Any]], config: FixedWindow | TokenBucket
) -> None:
    lease = Lease(config, horizon=2.0, fraction=0.5, idle=1.0)
    now = 1_000_000.0
    taken: list[tuple[float, float | None]] = []

    def window(at: float) -> float:
        return at - at % config.period if config.kind == "fixed window" else at

    def in_window() -> bool:
        # A fixed window's token is only ever spent inside the window it was granted in.
        return lease.window is None or now < lease.window + config.period

    for op, count, arg in ops:
        if op == "take":
            now += arg
            if lease.take(count, now):
                assert in_window()
                taken.append((count, lease.window))
        elif op == "grant":
            want = lease.ask(count, now)
            assert count <= want <= max(count, 0.5 * config.max)
            granted = {"want": want, "need": count, "no": 0}[arg]
            if lease.grant(granted, want, count, 1_000.0, 10.0, window(now), now):
                assert in_window()
                taken.append((count, lease.window))
            elif granted == 0:
                # now + 1000 - now, in floats
                assert lease.retry_after(now) == pytest.approx(1_000.0)
        elif op == "ahead":
            want = lease.ask(0, now)
            before = lease.retry_after(now)
            lease.grant(want if arg == "want" else 0, want, 0, 1_000.0, 10.0, window(now), now)
            if arg == "no":
                # Too large a block refused says nothing about a request's own need.
                assert lease.retry_after(now) == before
        elif op == "untake" and taken:
            lease.untake(*taken.pop())
            now += arg
        elif op == "expire":
            now += arg
            lease.expire(now)
        elif op == "return":
            now += arg
            if lease.idle(now):
                lease.give_back(now)
        assert lease.tokens >= 0
        assert lease.used <= lease.granted + 1e-9
        total = lease.used + lease.returned + lease.dropped + lease.tokens
        assert total == pytest.approx(lease.granted)
    lease.give_back(now)
    assert lease.tokens == 0
    assert lease.returned + lease.used + lease.dropped == pytest.approx(lease.granted)


def test_block_follows_demand_and_stays_under_the_cap() -> None:
    config = fresh_window(1_000, HOUR)
    lease = Lease(config, horizon=1.0, fraction=0.1)
    now = 5_000.0
    assert lease.ask(1, now) == 1  # no demand yet: just the request's own count
    lease.grant(1, 1, 1, None, 999, 0.0, now)
    for _ in range(40):
        now += 10
        want = lease.ask(1, now)
        lease.grant(1, want, 1, None, 500, 0.0, now)  # only the need granted: nothing held
    # About 40 admissions over the last second, one second of horizon, capped at 100.
    assert lease.tokens == 0
    assert 30 <= lease.ask(1, now + 10) <= 100
    # What is held or already asked for counts against the cap.
    assert lease.ask(1, now + 10) <= 100 - 30
    busy = Lease(config, horizon=60.0, fraction=0.1)
    for i in range(200):
        busy.take(1, now + i) or busy.grant(1, busy.ask(1, now + i), 1, None, 500, 0.0, now + i)
    assert busy.largest <= 100


def test_a_count_a_sharded_limit_cannot_take_in_one_call_is_a_startup_error() -> None:
    # With 8 shards the component takes at most capacity / (shards / 2) = 2.5 per call.
    with pytest.raises(ConfigurationError, match="shards"):
        Rule("global", FixedWindow(rate=10, period=MINUTE, shards=8), count=4)
    Rule("global", FixedWindow(rate=10, period=MINUTE, shards=8), count=2)
    Rule("global", FixedWindow(rate=10, period=MINUTE, shards=2), count=10)


# -- ConvexStore across instances --------------------------------------------------------------


async def test_instances_share_a_global_window_within_the_bound(connect: Connect) -> None:
    limit = 300
    config = fresh_window(limit, HOUR)
    stores = [connect(CountingStore, lease_fraction=0.1) for _ in range(4)]
    admitted = Counter[int]()

    async def drive(index: int, store: ConvexStore) -> None:
        for _ in range(60):
            outcomes = await asyncio.gather(
                *(store.limit("globalAIRequests", config) for _ in range(4))
            )
            admitted[index] += sum(r.ok for r in outcomes)

    await asyncio.gather(*(drive(i, s) for i, s in enumerate(stores)))
    leases = [s._leases["globalAIRequests"] for s in stores]
    total = sum(admitted.values())
    largest = max(lease.largest for lease in leases)
    held = sum(lease.tokens for lease in leases)
    assert 1 < largest <= 0.1 * limit
    assert total <= limit + len(stores) * largest
    assert total >= limit - held
    # Every admission spent a granted token, and a lease took many of them per call.
    calls = sum(s.calls["guard:check"] for s in stores)
    assert total == sum(lease.used for lease in leases)
    assert calls < total / 2


async def test_a_token_bucket_hands_unused_tokens_back_at_close(connect: Connect) -> None:
    config = TokenBucket(rate=100, period=HOUR, capacity=100)
    store = connect(CountingStore, lease_horizon=10.0)
    for _ in range(3):
        assert (await store.limit("openaiRequests", config)).ok
    lease = store._leases["openaiRequests"]
    assert lease.tokens > 0
    held = lease.tokens
    peeker = connect(ConvexStore)
    before = (await peeker.peek("openaiRequests", config)).remaining
    assert before == pytest.approx(100 - 3 - held, abs=0.1)
    await store.close()
    after = (await peeker.peek("openaiRequests", config)).remaining
    assert after == pytest.approx(100 - 3, abs=0.1)


async def test_an_idle_lease_goes_back_with_the_next_call(connect: Connect) -> None:
    config = TokenBucket(rate=100, period=HOUR, capacity=100)
    store = connect(ShiftedStore, lease_horizon=10.0, lease_idle=1.0)
    for _ in range(3):
        await store.limit("groqRequests", config)
    assert store._leases["groqRequests"].tokens > 0
    store.shift += 2_000
    # A keyed request makes a call anyway: the idle lease rides along, no extra call.
    calls = store.calls["guard:check"]
    assert (await store.limit("ipAIRequests", config, key="1.2.3.4")).ok
    assert store.calls["guard:check"] == calls + 1
    assert store._leases["groqRequests"].tokens == 0
    assert (await store.peek("groqRequests", config)).remaining == pytest.approx(97, abs=0.1)


async def test_a_refused_lease_refuses_locally_until_retry_after(
    connect: Connect, convex_server: ConvexTestServer
) -> None:
    config = fresh_window(3, MINUTE)
    store = connect(ShiftedStore)
    results = [await store.limit("perplexityRequests", config) for _ in range(4)]
    assert [r.ok for r in results] == [True, True, True, False]
    denied = results[3]
    assert denied.retry_after is not None and 0 < denied.retry_after <= MINUTE
    calls = store.calls["guard:check"]
    for _ in range(5):
        again = await store.limit("perplexityRequests", config)
        assert not again.ok and again.retry_after is not None
    assert store.calls["guard:check"] == calls  # no store call while refused
    # Past retryAfter (on both clocks) the limit is asked again and admits.
    store.shift += denied.retry_after + 1_000
    convex_server.shift_clock(store.shift)
    assert (await store.limit("perplexityRequests", config)).ok
    assert store.calls["guard:check"] == calls + 1


class ArgsStore(CountingStore):
    """A counting store that keeps the arguments of every `guard:check` it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[Mapping[str, Any]] = []

    async def _call(
        self, kind: Literal["query", "mutation"], path: str, args: Mapping[str, Any]
    ) -> Any:
        if path == "guard:check":
            self.sent.append(args)
        return await super()._call(kind, path, args)


async def test_a_refused_lease_is_not_asked_again_by_requests_that_call_anyway(
    connect: Connect,
) -> None:
    # Every request of a refused provider limit also has a keyed limit, so it calls: the call
    # must not read the spent limit's shared document again (each grant another instance
    # commits would conflict with it), and the refused request consumes none of its keyed
    # limits.
    provider = fresh_window(2, MINUTE)
    per_ip = fresh_window(100, HOUR)
    store = connect(ArgsStore)

    def request(ip: str) -> list[LimitRequest]:
        return [LimitRequest("perplexityRequests", provider), LimitRequest("ip", per_ip, ip)]

    outcomes = [await store.check(request("198.51.100.7")) for _ in range(3)]
    assert [o.ok for o in outcomes] == [True, True, False]
    store.sent.clear()
    for _ in range(4):
        refused = await store.check(request("198.51.100.8"))
        assert not refused.ok
        assert not refused.results[0].ok and refused.results[0].retry_after is not None
    assert len(store.sent) == 4  # the keyed limit still calls ...
    for args in store.sent:  # ... without asking the spent limit again, and denied
        assert "perplexityRequests" not in [lease["name"] for lease in args.get("leases", [])]
        assert args["deny"] is True
    fresh = await store.peek("ip", per_ip, key="198.51.100.8")
    assert fresh.remaining == 100  # nothing of the refused requests was consumed


@pytest.mark.slow
async def test_covered_requests_make_no_call_and_keyed_limits_stay_exact(
    connect: Connect,
) -> None:
    global_ = fresh_window(1_000, HOUR)
    per_ip = fresh_window(30, HOUR)
    stores = [connect(CountingStore, lease_horizon=5.0) for _ in range(4)]
    # Warm a lease on the global limit, then requests covered locally make no call.
    store = stores[0]
    for _ in range(5):
        await store.limit("globalAIRequests", global_)
    assert store._leases["globalAIRequests"].tokens > 0
    calls = store.calls["guard:check"]
    while store._leases["globalAIRequests"].tokens >= 1:
        assert (await store.limit("globalAIRequests", global_)).ok
    assert store.calls["guard:check"] == calls
    # A keyed limit is decided per request, exactly, across instances.
    warm_used = store._leases["globalAIRequests"].used
    outcomes = await asyncio.gather(
        *(
            s.check(
                [
                    LimitRequest("globalAIRequests", global_),
                    LimitRequest("ipAIRequests", per_ip, "203.0.113.9"),
                ]
            )
            for s in stores
            for _ in range(25)
        )
    )
    assert sum(o.ok for o in outcomes) == 30
    # A request its keyed limit denied put its global token back in the local pool.
    leases = [s._leases["globalAIRequests"] for s in stores]
    assert sum(lease.used for lease in leases) == warm_used + 30
    peek = await stores[1].peek("ipAIRequests", per_ip, key="203.0.113.9")
    assert peek.remaining == 0


async def test_a_blocked_bot_spends_no_leased_token(connect: Connect) -> None:
    config = fresh_window(100, HOUR)
    store = connect(CountingStore)
    assert (await store.limit("globalAIRequests", config)).ok
    lease = store._leases["globalAIRequests"]
    used = lease.used
    bot = BotCheck("fp-9", "203.0.113.5", "curl/8", "bot_useragent", "blocked")
    outcome = await store.check([LimitRequest("globalAIRequests", config)], bot=bot)
    assert not outcome.ok and outcome.bot is not None and outcome.bot.action == "blocked"
    assert outcome.results == ()
    assert lease.used == used


async def test_a_fixed_windows_tokens_die_with_their_window(
    connect: Connect, convex_server: ConvexTestServer
) -> None:
    config = fresh_window(100, MINUTE)
    store = connect(ShiftedStore, lease_horizon=10.0)
    for _ in range(3):
        assert (await store.limit("ollamaRequests", config)).ok
    lease = store._leases["ollamaRequests"]
    held, first_window = lease.tokens, lease.window
    assert held > 0 and first_window is not None
    store.shift += MINUTE
    convex_server.shift_clock(store.shift)
    calls = store.calls["guard:check"]
    assert (await store.limit("ollamaRequests", config)).ok
    # The held tokens were dropped, not used in the next window: a new lease was taken.
    assert store.calls["guard:check"] == calls + 1
    assert lease.dropped == held
    assert lease.window == first_window + MINUTE
    await store.close()
    # Only the new window's unused tokens went back, to the new window.
    peeker = connect(ConvexStore)
    assert (await peeker.peek("ollamaRequests", config)).remaining == pytest.approx(99)


async def test_concurrent_requests_share_one_block_in_flight(connect: Connect) -> None:
    config = fresh_window(1_000, HOUR)
    store = connect(CountingStore)
    outcomes = await asyncio.gather(*(store.limit("globalAIRequests", config) for _ in range(64)))
    assert all(r.ok for r in outcomes)
    # The first asks alone; the rest wait for its answer, and the next ask is sized for
    # the queue: a handful of writes of the shared document, not 64.
    assert store.calls["guard:check"] <= 4
    lease = store._leases["globalAIRequests"]
    assert lease.used == 64 and lease.largest <= 100
