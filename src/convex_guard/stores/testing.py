"""The store contract: what a store promises, capability by capability, as pytest test classes.

A store's project subclasses the classes of the capabilities its store has (`StoreContract`
for all of them) under a name pytest collects, and gives them a `store` fixture that yields a
fresh, empty store nobody else writes to while a test runs::

    import pytest
    from convex_guard.stores.testing import LimitStoreContract

    class TestRedisLimiter(LimitStoreContract):
        @pytest.fixture
        async def store(self) -> AsyncIterator[RedisLimiter]:
            limiter = RedisLimiter(url, prefix=uuid.uuid4().hex)
            yield limiter
            await limiter.aclose()

The project configures pytest-asyncio in auto mode (`asyncio_mode = "auto"`, and
`asyncio_default_fixture_loop_scope = "function"`: the tests and the fixture are coroutines)
and registers the `slow` marker the concurrency test carries (`markers = ["slow: …"]`;
`--strict-markers` refuses an unknown one). pytest explains a failed `assert` in detail only
in the modules it rewrites: call `pytest.register_assert_rewrite("convex_guard.stores.testing")`
in the project's `conftest.py`, before anything imports this module.

Time: the tests read and move time through the `clock` fixture, a `ContractClock`, which by
default reads the wall clock and sleeps (the whole suite then waits a few seconds). A store
with an injectable clock overrides `clock` with a `ShiftedClock` and builds the store on its
`now`, and time moves without waiting. A store that never refuses concurrent calls sets
`conflicts = False` on its class, and the concurrency test then expects every call answered.

pytest is imported by this module only: importing `convex_guard` does not import it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import ClassVar, Protocol, cast

import pytest

from convex_guard.core.alerts import AlertRule, WatchedLimit
from convex_guard.core.errors import ConfigurationError, StoreConflictError
from convex_guard.core.keys import ApiKeyKind, generate_key
from convex_guard.core.limits import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    FixedWindow,
    LimitResult,
    TokenBucket,
)
from convex_guard.stores.base import (
    UNKNOWN_ACTOR,
    AIRequestLog,
    AlertStore,
    AnalyticsStore,
    AuditChange,
    AuditEntry,
    AuditStore,
    AuthFailure,
    BotCheck,
    BotEvent,
    BotStore,
    DashboardStore,
    EmbeddingRequestLog,
    KeyQuota,
    KeyRateLimit,
    KeyStore,
    KeyUsage,
    LimitRequest,
    LimitStore,
    LogBatch,
    LogStore,
    NewApiKey,
    Settlement,
    Store,
)
from convex_guard.stores.keys import ApiKeys


class ContractClock:
    """The time the contract sees: `now()` in epoch ms; `advance(ms)` lets that much pass."""

    def now(self) -> float:
        return time.time() * 1000.0

    async def advance(self, ms: float) -> None:
        await asyncio.sleep(ms / 1000.0)


class ShiftedClock(ContractClock):
    """The wall clock plus an offset that `advance` grows at once: give `now` to the store."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() * 1000.0 + self.offset

    async def advance(self, ms: float) -> None:
        self.offset += ms


class _Contract:
    #: Whether concurrent calls on one key may be refused with `StoreConflictError`.
    conflicts: ClassVar[bool] = True

    @pytest.fixture
    def store(self) -> object:
        raise NotImplementedError(f"{type(self).__name__} must override the `store` fixture")

    @pytest.fixture
    def clock(self) -> ContractClock:
        return ContractClock()


class LimitStoreContract(_Contract):
    """`LimitStore`: the limits of `core.limits`, decided atomically, all or nothing."""

    async def test_fixed_window_admits_rate_then_denies(
        self, store: LimitStore, clock: ContractClock
    ) -> None:
        config = FixedWindow(rate=3, period=HOUR, start=0)
        results = [await store.limit("ip", config, key="1.2.3.4") for _ in range(4)]
        assert [r.ok for r in results] == [True, True, True, False]
        assert [r.remaining for r in results[:3]] == [2, 1, 0]
        denied = results[3]
        next_window = (clock.now() // HOUR + 1) * HOUR
        assert denied.retry_after is not None
        assert denied.retry_after == pytest.approx(next_window - clock.now(), abs=2_000)
        # Another key is unaffected.
        assert (await store.limit("ip", config, key="5.6.7.8")).ok

    async def test_token_bucket_retry_after_and_refill(
        self, store: LimitStore, clock: ContractClock
    ) -> None:
        # A token every 2 s: short enough to wait for on a wall clock, long enough that ten
        # calls to a remote store finish well within one token.
        config = TokenBucket(rate=10, period=20 * SECOND, capacity=10)
        for _ in range(10):
            assert (await store.limit("user", config, key="ann")).ok
        denied = await store.limit("user", config, key="ann")
        assert not denied.ok and denied.retry_after is not None
        assert denied.retry_after == pytest.approx(2 * SECOND, abs=1_000)
        await clock.advance(denied.retry_after + 200)
        assert (await store.limit("user", config, key="ann")).ok

    async def test_count_and_reserve(self, store: LimitStore) -> None:
        config = TokenBucket(rate=10, period=MINUTE, capacity=10, max_reserved=5)
        assert (await store.limit("t", config, count=8)).ok
        reserved = await store.limit("t", config, count=5, reserve=True)
        assert reserved.ok and reserved.retry_after == pytest.approx(3 * 6_000, abs=500)
        too_far = await store.limit("t", config, count=3, reserve=True)
        assert not too_far.ok

    async def test_a_count_no_waiting_could_admit_is_refused_as_a_configuration_error(
        self, store: LimitStore
    ) -> None:
        config = TokenBucket(rate=10, period=MINUTE, capacity=10)
        with pytest.raises(ConfigurationError):
            await store.limit("big", config, key="k", count=11)
        with pytest.raises(ConfigurationError):
            await store.check(
                [LimitRequest("small", config, "k"), LimitRequest("big", config, "k", 11)]
            )
        # Nothing was consumed by the refused calls.
        assert (await store.peek("small", config, key="k")).remaining == 10
        assert (await store.limit("big", config, key="k", count=10)).ok

    async def test_check_is_all_or_nothing(self, store: LimitStore) -> None:
        roomy = FixedWindow(rate=10, period=HOUR, start=0)
        tight = FixedWindow(rate=1, period=HOUR, start=0)
        first = await store.check([LimitRequest("a", roomy, "k"), LimitRequest("b", tight, "k")])
        assert first.ok and [r.ok for r in first.results] == [True, True]
        second = await store.check([LimitRequest("a", roomy, "k"), LimitRequest("b", tight, "k")])
        assert not second.ok
        assert [r.ok for r in second.results] == [True, False]
        # The denied call consumed nothing from "a".
        assert (await store.peek("a", roomy, key="k")).remaining == 9

    async def test_reset_and_peek(self, store: LimitStore) -> None:
        config = FixedWindow(rate=2, period=HOUR, start=0)
        assert (await store.peek("p", config, key="k")).remaining == 2
        await store.limit("p", config, key="k")
        await store.limit("p", config, key="k")
        assert (await store.peek("p", config, key="k")).remaining == 0
        assert not (await store.limit("p", config, key="k")).ok
        await store.reset("p", key="k")
        assert (await store.peek("p", config, key="k")).remaining == 2

    @pytest.mark.slow
    async def test_concurrent_calls_admit_exactly_the_limit(self, store: LimitStore) -> None:
        # 100 concurrent calls on one key are one hot document on Convex: the backend may
        # answer some of them 503 after its retries (StoreConflictError), never admit one
        # twice. Every call that was answered is admitted while the limit lasts, the rest
        # refused.
        config = FixedWindow(rate=30, period=HOUR, start=0)
        results = await asyncio.gather(
            *(store.limit("burst", config, key="k") for _ in range(100)),
            return_exceptions=True,
        )
        answered = [r for r in results if isinstance(r, LimitResult)]
        failed = [r for r in results if not isinstance(r, LimitResult)]
        assert all(isinstance(e, StoreConflictError) for e in failed), failed
        assert self.conflicts or not failed
        assert sum(r.ok for r in answered) == min(30, len(answered))


class BotStoreContract(_Contract):
    """`BotStore`: a bot check escalated by its client's history, in the same atomic call."""

    async def test_bot_escalation_and_events(self, store: BotStore, clock: ContractClock) -> None:
        config = FixedWindow(rate=100, period=HOUR, start=0)
        bot = BotCheck("fp-1", "203.0.113.9", "python-requests/2.32", "bot_useragent", "allowed")
        actions = []
        for _ in range(12):
            outcome = await store.check([LimitRequest("ip", config, "203.0.113.9")], bot=bot)
            assert outcome.bot is not None
            actions.append(outcome.bot.action)
            assert outcome.ok == (outcome.bot.action == "allowed")
        assert actions == ["allowed"] * 5 + ["challenged"] * 5 + ["blocked"] * 2
        assert (await store.peek("ip", config, key="203.0.113.9")).remaining == 95
        since = clock.now() - MINUTE
        events = await store.bot_events(since=since, limit=5)
        assert len(events) == 5
        assert events[0].action == "blocked"  # newest first
        assert events[0].metadata is not None and events[0].metadata["previousAttempts"] == 11
        assert await store.count_bot_events("fp-1", since) == 12
        assert await store.count_bot_events("other", since) == 0

    async def test_bot_events_keep_their_evidence(
        self, store: BotStore, clock: ContractClock
    ) -> None:
        """What bot detection decided and why (`verification`, `evidence`, …) comes back
        as it was stored, with the store's `previousAttempts` beside it."""
        metadata = {
            "category": "search_engine",
            "agent": "Googlebot",
            "path": "/",
            "verification": "spoofed",
            "verifiedName": "googlebot",
            "method": "ranges",
            "evidence": "ip 8.8.4.4 not in googlebot ranges (2026-08-20)",
        }
        bot = BotCheck("fp-ev", "8.8.4.4", "Googlebot/2.1", "bot_useragent", "blocked", metadata)
        await store.check((), bot=bot)
        (event,) = await store.bot_events(since=clock.now() - MINUTE, limit=1)
        assert {**metadata, "previousAttempts": 0} == dict(event.metadata or {})

    async def test_rotating_fingerprints_from_one_client_key_still_escalate(
        self, store: BotStore
    ) -> None:
        client = f"2001:db8:{uuid.uuid4().int % 0xFFFF:x}::/64"
        actions = []
        for i in range(12):
            bot = BotCheck(
                f"fp-rotated-{i}",
                "2001:db8::1",
                "curl/8",
                "bot_useragent",
                "allowed",
                client_key=client,
            )
            outcome = await store.check([], bot=bot)
            assert outcome.bot is not None
            actions.append(outcome.bot.action)
        assert actions == ["allowed"] * 5 + ["challenged"] * 5 + ["blocked"] * 2
        # The fingerprint's own history still counts when the client key's is shorter.
        moved = BotCheck("fp-rotated-3", "192.0.2.1", "curl/8", "bot_useragent", "allowed")
        outcome = await store.check([], bot=moved)
        assert outcome.bot is not None and outcome.bot.previous_events == 1

    async def test_bot_limit_exhaustion_challenges(
        self, store: BotStore, clock: ContractClock
    ) -> None:
        suspicious = LimitRequest(
            "suspiciousBehavior", FixedWindow(rate=2, period=HOUR, start=0), "fp"
        )
        bot = BotCheck("fp", "ip", "curl/8", "bot_useragent", "allowed", limit=suspicious)
        actions = []
        for _ in range(3):
            outcome = await store.check([], bot=bot)
            assert outcome.bot is not None
            actions.append(outcome.bot.action)
        assert actions == ["allowed", "allowed", "challenged"]
        events = await store.bot_events(since=clock.now() - MINUTE)
        assert [e.action for e in events] == ["challenged", "allowed", "allowed"]

    async def test_policy_block_is_never_softened(self, store: BotStore) -> None:
        bot = BotCheck("fp", "ip", "GPTBot/1.2", "ai_scraper", "blocked")
        outcome = await store.check([LimitRequest("x", FixedWindow(rate=1, period=HOUR))], bot=bot)
        assert not outcome.ok and outcome.bot is not None and outcome.bot.action == "blocked"


def new_key(now: float) -> NewApiKey:
    return NewApiKey(
        kind="embedding",
        key_hash="a" * 64,
        prefix="cg_emb_abcd",
        name="indexer",
        owner="team-search",
        scopes=("embeddings",),
        rate_limit=KeyRateLimit(requests=50, period=MINUTE),
        created_at=now,
        expires_at=now + 30 * 24 * HOUR,
    )


class KeyStoreContract(_Contract):
    """`KeyStore`: records found by hash, listed by kind and owner, revoked in place."""

    async def test_a_key_keeps_its_tier(self, store: KeyStore, clock: ContractClock) -> None:
        tier = (KeyQuota("tokens", 40_000, MINUTE), KeyQuota("cost", 12.5, DAY))
        kinds: tuple[tuple[ApiKeyKind, str], ...] = (("ai", "d"), ("embedding", "e"))
        for kind, digit in kinds:
            new = replace(new_key(clock.now()), kind=kind, key_hash=digit * 64, quotas=tier)
            created = await store.create_api_key(new)
            assert created.quotas == tier
            found = await store.find_api_key(digit * 64)
            assert found is not None and found.quotas == tier
        plain = await store.create_api_key(replace(new_key(clock.now()), key_hash="f" * 64))
        assert plain.quotas == ()

    async def test_api_key_lifecycle(self, store: KeyStore, clock: ContractClock) -> None:
        now = clock.now()
        created = await store.create_api_key(new_key(now))
        assert created.active and created.request_count == 0 and created.last_used is None
        assert created.rate_limit == KeyRateLimit(50, MINUTE)
        found = await store.find_api_key("a" * 64)
        assert found == created
        assert await store.find_api_key("b" * 64) is None
        await store.create_api_key(
            NewApiKey("ai", "c" * 64, "cg_ai_x", "chat", None, (), None, now, None)
        )
        assert {k.name for k in await store.list_api_keys()} == {"indexer", "chat"}
        assert [k.name for k in await store.list_api_keys(kind="ai")] == ["chat"]
        assert [k.name for k in await store.list_api_keys(owner="team-search")] == ["indexer"]
        revoked = await store.update_api_key(created.id, active=False)
        assert revoked is not None and not revoked.active
        assert await store.find_api_key("a" * 64) == revoked
        assert await store.update_api_key("no-such-key", active=False) is None


def ai_row(
    t: float, provider: str, ok: bool, latency: float, tokens: int, cost: float
) -> AIRequestLog:
    return AIRequestLog(
        timestamp=t,
        provider=provider,
        model="gpt-x",
        fingerprint="fp",
        ip="198.51.100.1",
        success=ok,
        latency_ms=latency,
        tokens_used=tokens,
        cost=cost,
        error=None if ok else "upstream_error",
    )


def embedding_rows(now: float) -> list[EmbeddingRequestLog]:
    return [
        EmbeddingRequestLog("r1", "h" * 64, now, 4, 12.5, 40, True, "bge-small"),
        EmbeddingRequestLog("r2", "h" * 64, now + 1, 2, 8.0, 0, False, "bge-small", "oops"),
        EmbeddingRequestLog("r3", "z" * 64, now + 2, 9, 8.0, 90, True, "bge-small"),
    ]


class LogStoreContract(_Contract):
    """`LogStore`: every kind of row the middlewares write, taken in one call, retries too."""

    async def test_every_kind_of_row_is_taken_and_a_retry_lands_once(
        self, store: LogStore, clock: ContractClock
    ) -> None:
        now = clock.now()
        batch = LogBatch(
            id=uuid.uuid4().hex,
            ai_requests=[ai_row(now, "openai", True, 100, 10, 0.5)],
            embedding_requests=embedding_rows(now),
            auth_failures=[AuthFailure("x" * 64, now, "203.0.113.1", "curl/8")],
            bot_events=[
                BotEvent(now, "fp-9", "203.0.113.1", "curl/8", "rate_limit", "blocked", None)
            ],
        )
        await store.write_logs(batch)
        await store.write_logs(batch)  # a retry after a lost answer: the same id
        await store.write_logs(LogBatch(id=uuid.uuid4().hex))  # nothing to write


class AnalyticsStoreContract(_Contract):
    """`AnalyticsStore`: figures over what `write_logs` was given, each batch counted once."""

    async def test_provider_stats_from_batches(
        self, store: AnalyticsStore, clock: ContractClock
    ) -> None:
        base = (clock.now() // HOUR - 2) * HOUR + 30_000  # inside an old minute, mid-minute
        rows = [
            ai_row(base, "openai", True, 100, 10, 0.5),
            ai_row(base + 61_000, "openai", False, 300, 0, 0.0),
            ai_row(base + 5 * MINUTE, "openai", True, 200, 20, 1.5),
            ai_row(base + 10 * MINUTE, "groq", True, 50, 5, 0.1),
        ]
        await store.write_logs(LogBatch(id="b1", ai_requests=rows))
        # The same batch again (a retry after a lost answer) lands once.
        await store.write_logs(LogBatch(id="b1", ai_requests=rows))
        stats = await store.provider_stats("openai", base - 1, base + HOUR)
        assert stats.total_requests == 3
        assert stats.success_rate == pytest.approx(2 / 3)
        assert stats.average_latency == pytest.approx(200)
        assert stats.total_tokens == 30
        assert stats.total_cost == pytest.approx(2.0)
        narrow = await store.provider_stats("openai", base + 60_000, base + 2 * MINUTE)
        assert narrow.total_requests == 1 and narrow.success_rate == 0
        empty = await store.provider_stats("perplexity", base, base + HOUR)
        assert (empty.total_requests, empty.success_rate, empty.average_latency) == (0, 0.0, 0.0)
        assert (empty.total_tokens, empty.total_cost) == (0, 0.0)

    async def test_embedding_usage_and_auth_failures(
        self, store: AnalyticsStore, clock: ContractClock
    ) -> None:
        now = clock.now()
        await store.write_logs(
            LogBatch(
                id="b2",
                embedding_requests=embedding_rows(now),
                auth_failures=[
                    AuthFailure("x" * 64, now, "203.0.113.1", "curl/8"),
                    AuthFailure("x" * 64, now + 1, None, None),
                ],
            )
        )
        usage = await store.embedding_usage("h" * 64, now - 1, now + 10)
        assert (usage.total_requests, usage.successful_requests) == (2, 1)
        assert (usage.total_tokens, usage.total_items) == (40, 6)
        assert await store.count_auth_failures("x" * 64, now - 1) == 2
        assert await store.count_auth_failures("x" * 64, now + 1) == 1


class DashboardStoreContract(_Contract):
    """`DashboardStore`: one snapshot of a window, bucketed, the same figures on every store
    (latency percentiles off the shared `LATENCY_BOUNDS_MS` buckets)."""

    async def test_dashboard_snapshot_from_batches(
        self, store: Store, clock: ContractClock
    ) -> None:
        board = cast(DashboardStore, store)  # with keys and logs: what the snapshot reads
        hour = (clock.now() // HOUR - 3) * HOUR  # a whole hour, long past
        rows = [
            ai_row(hour + 1_000, "openai", True, 20, 10, 0.5),
            ai_row(hour + 2_000, "openai", True, 80, 20, 1.5),
            ai_row(hour + MINUTE + 5, "openai", False, 900, 0, 0.0),
            ai_row(hour + 2 * MINUTE, "groq", True, 3_000, 5, 0.25),
            ai_row(hour + 3 * MINUTE, "groq", True, 5, 5, 0.25),  # past the range's end
        ]
        rows[2] = rows[2]._replace(error="rate_limited:requests")
        events = [
            BotEvent(hour + 5, "fp-d", "203.0.113.4", "curl/8", "bot_useragent", "blocked"),
            BotEvent(hour + 6, "fp-d", "203.0.113.4", "curl/8", "bot_useragent", "blocked"),
            BotEvent(hour + MINUTE, "fp-e", "203.0.113.5", "GPTBot", "ai_scraper", "challenged"),
        ]
        failures = [AuthFailure("x" * 64, hour + 2 * MINUTE + 1, "203.0.113.1", "curl/8")]
        created = await store.create_api_key(new_key(clock.now()))
        await store.write_logs(
            LogBatch(
                id=uuid.uuid4().hex,
                ai_requests=rows,
                bot_events=events,
                auth_failures=failures,
                key_usage=[KeyUsage(created.id, hour + 9, 4)],
            )
        )
        snap = await board.dashboard(hour, hour + 3 * MINUTE, MINUTE)
        assert (snap.start, snap.end, snap.bucket_ms) == (hour, hour + 3 * MINUTE, MINUTE)
        assert [p.provider for p in snap.providers] == ["groq", "openai"]
        groq, openai = snap.providers
        assert openai.requests == (2, 1, 0) and openai.successes == (2, 0, 0)
        assert openai.tokens == 30 and openai.cost == pytest.approx(2.0)
        assert openai.success_rate == pytest.approx(2 / 3)
        assert (openai.p50, openai.p95) == (100, 1000)
        assert groq.requests == (0, 0, 1) and (groq.p50, groq.p95) == (5000, 5000)
        assert snap.refusals.get("limit") == 1 and not snap.refusals.get("bot")
        assert dict(snap.bot_events) == {
            ("bot_useragent", "blocked"): 2,
            ("ai_scraper", "challenged"): 1,
        }
        assert snap.bot_series == (2, 1, 0)
        assert snap.auth_failures == (0, 0, 1)
        assert [(k.id, k.name, k.requests) for k in snap.top_keys] == [
            (created.id, created.name, 4)
        ]
        assert not snap.truncated
        hourly = await board.dashboard(hour, hour + 2 * HOUR, HOUR)
        assert [p.total_requests for p in hourly.providers] == [2, 3]
        assert hourly.providers[0].requests == (2, 0)
        with pytest.raises(ValueError):
            await board.dashboard(hour + 1, hour + MINUTE + 1, MINUTE)

    async def test_dashboard_top_keys_within_the_window(
        self, store: Store, clock: ContractClock
    ) -> None:
        board = cast(DashboardStore, store)
        hour = (clock.now() // HOUR - 3) * HOUR
        first = await store.create_api_key(new_key(clock.now()))
        second = await store.create_api_key(
            replace(new_key(clock.now()), kind="ai", key_hash="b" * 64, name="second")
        )
        uses = [
            KeyUsage(first.id, hour - 1, 100),  # before the window
            KeyUsage(first.id, hour + 5, 2),
            KeyUsage(second.id, hour + MINUTE + 9, 3),
            KeyUsage(first.id, hour + 2 * MINUTE, 50),  # at the window's end: outside
        ]
        for use in uses:  # one batch each, as flushes of different minutes
            await store.write_logs(LogBatch(id=uuid.uuid4().hex, key_usage=[use]))
        await store.write_logs(
            LogBatch(id=uuid.uuid4().hex, key_usage=[KeyUsage(second.id, hour + MINUTE + 20, 1)])
        )
        snap = await board.dashboard(hour, hour + 2 * MINUTE, MINUTE)
        assert [(k.id, k.name, k.requests) for k in snap.top_keys] == [
            (second.id, "second", 4),
            (first.id, first.name, 2),
        ]
        assert snap.top_keys[0].last_used == hour + MINUTE + 20
        assert snap.top_keys[1].last_used == hour + 2 * MINUTE  # its latest use, after the window
        later = await board.dashboard(hour + 2 * MINUTE, hour + 3 * MINUTE, MINUTE)
        assert [(k.id, k.requests) for k in later.top_keys] == [(first.id, 50)]
        hourly = await board.dashboard(hour - HOUR, hour + HOUR, HOUR)
        assert [(k.id, k.requests) for k in hourly.top_keys] == [(first.id, 152), (second.id, 4)]
        assert not snap.truncated


class _SettlingStore(LimitStore, LogStore, Protocol):
    """A store that reserves through `check` and settles through `write_logs`."""


class SettlementContract(_Contract):
    """Token and cost reservations (`LimitRequest.settled`) corrected by `Settlement`s that
    arrive with a log batch: a charge may go into debt, a refund goes back only to the window
    it was taken from, a batch retried lands once, and an unkeyed settled limit is exact."""

    @staticmethod
    def _window(clock: ContractClock, period: float = HOUR) -> FixedWindow:
        # Begun a second ago: the test never crosses a window's end by itself.
        return FixedWindow(rate=100, period=period, start=float(int(clock.now()) - SECOND))

    @staticmethod
    async def _reserve(
        store: _SettlingStore, config: FixedWindow | TokenBucket, count: float, key: str | None
    ) -> tuple[bool, float]:
        outcome = await store.check([LimitRequest("tpm", config, key, count, settled=True)])
        assert outcome.now is not None, "check must say when it decided (CheckResult.now)"
        return outcome.ok, outcome.now

    @staticmethod
    async def _settle(
        store: _SettlingStore,
        config: FixedWindow | TokenBucket,
        amount: float,
        at: float,
        key: str | None,
        batch: str | None = None,
    ) -> None:
        settlement = Settlement("tpm", config, key, amount, at)
        await store.write_logs(LogBatch(id=batch or uuid.uuid4().hex, settlements=[settlement]))

    async def test_settle_up_and_down_and_a_retry_lands_once(
        self, store: _SettlingStore, clock: ContractClock
    ) -> None:
        config = self._window(clock)
        ok, at = await self._reserve(store, config, 30, "k")
        assert ok
        assert (await store.peek("tpm", config, key="k")).remaining == 70
        await self._settle(store, config, 20, at, "k", batch="up")  # used 50
        await self._settle(store, config, 20, at, "k", batch="up")  # the same batch again
        assert (await store.peek("tpm", config, key="k")).remaining == 50
        ok, at = await self._reserve(store, config, 40, "k")
        assert ok
        await self._settle(store, config, -35, at, "k")  # used 5 of 40
        assert (await store.peek("tpm", config, key="k")).remaining == 45

    async def test_a_failed_request_gets_its_reservation_back(
        self, store: _SettlingStore, clock: ContractClock
    ) -> None:
        config = self._window(clock)
        ok, at = await self._reserve(store, config, 100, "k")
        assert ok
        assert not (await self._reserve(store, config, 1, "k"))[0]
        await self._settle(store, config, -100, at, "k")
        assert (await store.peek("tpm", config, key="k")).remaining == 100
        assert (await self._reserve(store, config, 100, "k"))[0]

    async def test_a_charge_past_the_limit_is_a_debt_carried_over(
        self, store: _SettlingStore, clock: ContractClock
    ) -> None:
        config = self._window(clock, period=10 * SECOND)
        ok, at = await self._reserve(store, config, 90, "team")
        assert ok
        await self._settle(store, config, 30, at, "team")  # used 120 of 100
        assert (await store.peek("tpm", config, key="team")).remaining == 0
        assert not (await self._reserve(store, config, 1, "team"))[0]
        await clock.advance(10 * SECOND)
        # The next window starts 20 short, and a refund from the last one never reaches it.
        await self._settle(store, config, -50, at, "team")
        assert (await self._reserve(store, config, 80, "team"))[0]
        assert not (await self._reserve(store, config, 1, "team"))[0]

    async def test_a_budget_rolls_over_with_its_period(
        self, store: _SettlingStore, clock: ContractClock
    ) -> None:
        # 5.0 a period, reserved and charged in fractions of the unit, as money is.
        budget = FixedWindow(rate=5, period=10 * SECOND, start=float(int(clock.now()) - SECOND))
        ok, at = await self._reserve(store, budget, 0.25, "key")
        assert ok
        await self._settle(store, budget, 4.5, at, "key")  # cost 4.75
        left = (await store.peek("tpm", budget, key="key")).remaining
        assert left == pytest.approx(0.25)
        assert not (await self._reserve(store, budget, 0.5, "key"))[0]
        await clock.advance(10 * SECOND)
        assert (await self._reserve(store, budget, 5, "key"))[0]

    async def test_an_unkeyed_settled_limit_is_decided_exactly(
        self, store: _SettlingStore, clock: ContractClock
    ) -> None:
        config = self._window(clock)
        ok, at = await self._reserve(store, config, 60, None)
        assert ok
        await self._settle(store, config, -15, at, None)
        assert (await self._reserve(store, config, 55, None))[0]
        assert not (await self._reserve(store, config, 1, None))[0]


class StoreContract(
    LimitStoreContract,
    BotStoreContract,
    KeyStoreContract,
    LogStoreContract,
    AnalyticsStoreContract,
    DashboardStoreContract,
    SettlementContract,
):
    """`Store`: every capability's contract, and what `write_logs` does to the others: bot
    events join the escalation history and key usage reaches the key's record."""

    async def test_bot_events_written_in_a_batch_count_towards_escalation(
        self, store: Store, clock: ContractClock
    ) -> None:
        now = clock.now()
        client = f"198.51.100.{uuid.uuid4().int % 250}"
        await store.write_logs(
            LogBatch(
                id=uuid.uuid4().hex,
                bot_events=[
                    BotEvent(
                        now - i, f"fp-b{i}", client, "x", "rate_limit", "blocked", None, client
                    )
                    for i in range(6)
                ],
            )
        )
        late = BotCheck("fp-new", client, "curl/8", "bot_useragent", "allowed", client_key=client)
        outcome = await store.check([], bot=late)
        assert outcome.bot is not None and outcome.bot.action == "challenged"
        assert outcome.bot.previous_events == 6
        newest = (await store.bot_events(since=now - MINUTE, limit=1))[0]
        assert (newest.fingerprint, newest.client_key) == ("fp-new", client)

    async def test_bot_event_rows_are_listed(self, store: Store, clock: ContractClock) -> None:
        now = clock.now()
        event = BotEvent(now, "fp-9", "203.0.113.1", "curl/8", "rate_limit", "blocked", None)
        await store.write_logs(LogBatch(id="b3", bot_events=[event]))
        events = await store.bot_events(since=now - 1)
        assert [(e.fingerprint, e.detection_type, e.action) for e in events] == [
            ("fp-9", "rate_limit", "blocked")
        ]
        assert await store.count_bot_events("fp-9", now - 1) == 1

    async def test_key_usage_reaches_the_key(self, store: Store, clock: ContractClock) -> None:
        now = clock.now()
        created = await store.create_api_key(new_key(now))
        await store.write_logs(LogBatch(id="usage-1", key_usage=[KeyUsage(created.id, now + 5, 7)]))
        used = await store.find_api_key("a" * 64)
        assert used is not None and used.request_count == 7 and used.last_used == now + 5


class AlertStoreContract(_Contract):
    """`AlertStore`: rules evaluated with `write_logs`, one alert per (kind, subject) per
    cool-down, and delivery claims that exactly one claimer wins until its lease runs out.
    The store must also be a `LogStore` (the rows the rules count come through it)."""

    RULES = (AlertRule("auth_failures", threshold=3, window_ms=HOUR, cooldown_ms=HOUR),)

    async def _failures(self, store: AlertStore, clock: ContractClock, n: int, key: str) -> None:
        assert isinstance(store, LogStore)
        for _ in range(n):
            now = clock.now()
            row = AuthFailure(key, now, "192.0.2.77", "curl/8")
            await store.write_logs(LogBatch(id=uuid.uuid4().hex, auth_failures=[row]))

    async def test_an_auth_failure_spike_opens_one_alert_per_subject_over_the_cooldown(
        self, store: AlertStore, clock: ContractClock
    ) -> None:
        store.configure_alerts(self.RULES)
        start = clock.now()
        key = "e" * 64
        await self._failures(store, clock, 3, key)
        assert await store.alerts(since=start - 1) == []
        await self._failures(store, clock, 2, key)
        alerts = await store.alerts(since=start - 1)
        assert sorted(a.subject for a in alerts) == ["client:192.0.2.77", f"key:{key}"]
        for alert in alerts:
            assert (alert.kind, alert.threshold, alert.window_ms) == ("auth_failures", 3, HOUR)
            assert (alert.count, alert.status, alert.attempts) == (2, "pending", 0)
            assert alert.value == 4  # read up to threshold + 1: enough to decide
        assert {a.id for a in await store.pending_alerts()} == {a.id for a in alerts}
        await clock.advance(HOUR)
        await self._failures(store, clock, 4, key)
        later = await store.alerts(since=start - 1)
        assert len(later) == 4 and len({a.id for a in later}) == 4
        assert later[0].last_seen >= later[-1].last_seen

    async def test_a_claim_is_exclusive_until_its_lease_runs_out(
        self, store: AlertStore, clock: ContractClock
    ) -> None:
        store.configure_alerts(self.RULES)
        await self._failures(store, clock, 4, "no-key")  # no key: the client's alert only
        [alert] = await store.pending_alerts()
        assert alert.subject == "client:192.0.2.77"
        assert await store.claim_alert(alert.id, "A", 2 * SECOND)
        assert not await store.claim_alert(alert.id, "B", 2 * SECOND)
        assert await store.pending_alerts() == []
        await clock.advance(2 * SECOND + 1)
        assert await store.claim_alert(alert.id, "B", MINUTE)  # A died: its lease ran out
        assert not await store.mark_alert(alert.id, "A", "delivered")
        assert await store.mark_alert(alert.id, "B", "retry")
        [again] = await store.pending_alerts()
        assert (again.id, again.attempts) == (alert.id, 2)
        assert await store.claim_alert(alert.id, "C", MINUTE)
        assert await store.mark_alert(alert.id, "C", "failed")
        [done] = await store.alerts(since=0)
        assert (done.status, done.attempts) == ("failed", 3)
        assert not await store.claim_alert(alert.id, "D", MINUTE)
        assert await store.pending_alerts() == []

    async def test_bot_waves_and_error_rates_are_judged_over_minutes_that_ended(
        self, store: AlertStore, clock: ContractClock
    ) -> None:
        assert isinstance(store, LogStore)
        store.configure_alerts(
            [
                AlertRule("bot_wave", threshold=3, window_ms=MINUTE),
                AlertRule("error_rate", threshold=0.5, window_ms=2 * MINUTE, min_requests=4),
            ]
        )
        if clock.now() % MINUTE > 55 * SECOND:  # the minute must not end while this runs
            await clock.advance(6 * SECOND)
        ended = clock.now() // MINUTE * MINUTE  # the start of this minute: the last one ended
        provider = f"p-{uuid.uuid4().hex[:8]}"
        bots = [
            BotEvent(ended - 1000 - i, f"fp-w{i}", "192.0.2.8", "x", "bot_useragent", "allowed")
            for i in range(4)
        ]
        rows = [ai_row(ended - 2 * SECOND, provider, i == 0, 5.0, 1, 0.0) for i in range(4)]
        await store.write_logs(LogBatch(id=uuid.uuid4().hex, ai_requests=rows, bot_events=bots))
        found = {(a.kind, a.subject): a.value for a in await store.alerts(since=0)}
        assert found == {("bot_wave", "all"): 4, ("error_rate", f"provider:{provider}"): 0.75}

    async def test_a_watched_limit_near_exhaustion_alerts(
        self, store: AlertStore, clock: ContractClock
    ) -> None:
        assert isinstance(store, LimitStore) and isinstance(store, LogStore)
        name, key = f"perKey-{uuid.uuid4().hex[:8]}", "key-1"
        config = FixedWindow(rate=10, period=HOUR, start=int(clock.now()))
        watched = WatchedLimit(name, config, key)
        rule = AlertRule("limit_exhaustion", threshold=0.8, window_ms=HOUR, limits=(watched,))
        store.configure_alerts([rule])
        for spent in (8, 1):
            for _ in range(spent):
                assert (await store.limit(name, config, key=key)).ok
            await store.write_logs(LogBatch(id=uuid.uuid4().hex))
        [alert] = await store.alerts(since=0)
        assert (alert.kind, alert.subject) == ("limit_exhaustion", f"limit:{name}:{key}")
        assert (alert.value, alert.threshold, alert.window_ms) == (0.9, 0.8, HOUR)


class AuditStoreContract(_Contract):
    """`AuditStore`: one entry per key change, in the same atomic step as the change (a write
    that fails leaves none, and no entry without its change), read back newest first, by time
    and by key, and never holding a raw key, its hash or its prefix."""

    async def test_each_change_writes_exactly_one_entry(
        self, store: AuditStore, clock: ContractClock
    ) -> None:
        start = clock.now()
        created = await store.create_api_key(new_key(start), actor=" ann@build-01 ")
        [entry] = await store.audit_entries()
        assert (entry.action, entry.record, entry.actor, entry.related) == (
            "key.created",
            created.id,
            "ann@build-01",
            None,
        )
        assert entry.timestamp == pytest.approx(start, abs=5_000)
        assert entry.changes == (
            AuditChange("kind", None, "embedding"),
            AuditChange("name", None, "indexer"),
            AuditChange("owner", None, "team-search"),
            AuditChange("scopes", None, ("embeddings",)),
            AuditChange("rate_limit", None, KeyRateLimit(50, MINUTE)),
            AuditChange("expires_at", None, start + 30 * 24 * HOUR),
            AuditChange("active", None, True),
        )
        await clock.advance(2_000)
        middle = clock.now() - 1_000
        revoked = await store.update_api_key(
            created.id, active=False, actor="bob", action="key.revoked"
        )
        assert revoked is not None and not revoked.active
        later = await store.update_api_key(created.id, expires_at=start + HOUR)
        assert later is not None and later.expires_at == start + HOUR
        again = await store.update_api_key(created.id, active=False)  # nothing differs
        assert again == later
        other = await store.create_api_key(
            NewApiKey("ai", "c" * 64, "cg_ai_x", "chat", None, (), None, start, None)
        )
        entries = await store.audit_entries()
        assert [(e.action, e.record, e.actor) for e in entries] == [
            ("key.created", other.id, UNKNOWN_ACTOR),
            ("key.updated", created.id, UNKNOWN_ACTOR),
            ("key.updated", created.id, UNKNOWN_ACTOR),
            ("key.revoked", created.id, "bob"),
            ("key.created", created.id, "ann@build-01"),
        ]
        assert [e.changes for e in entries[1:4]] == [
            (),
            (AuditChange("expires_at", start + 30 * 24 * HOUR, start + HOUR),),
            (AuditChange("active", True, False),),
        ]
        assert len({e.id for e in entries}) == 5
        assert [e.action for e in await store.audit_entries(record=created.id, limit=2)] == [
            "key.updated",
            "key.updated",
        ]
        assert [e.record for e in await store.audit_entries(since=middle)] == [
            other.id,
            created.id,
            created.id,
            created.id,
        ]
        assert await store.audit_entries(record="no-such-key") == []
        assert len(await store.audit_entries(since=middle, record=created.id)) == 3

    async def test_a_change_that_fails_leaves_no_entry(
        self, store: AuditStore, clock: ContractClock
    ) -> None:
        now = clock.now()
        assert await store.update_api_key("no-such-key", active=False, actor="ops") is None
        for actor in ("", "  ", "x" * 201, "tab\there", "me " + generate_key("ai")):
            with pytest.raises(ConfigurationError, match="actor"):
                await store.create_api_key(new_key(now), actor=actor)
        assert await store.list_api_keys() == []
        assert await store.audit_entries() == []
        created = await store.create_api_key(new_key(now))
        with pytest.raises(ConfigurationError, match="actor"):
            await store.update_api_key(created.id, active=False, actor="")
        assert (await store.find_api_key("a" * 64)) == created
        assert [e.action for e in await store.audit_entries()] == ["key.created"]

    async def test_every_entry_has_its_change_and_none_holds_a_key(
        self, store: AuditStore, clock: ContractClock
    ) -> None:
        keys = ApiKeys(store, clock=clock.now, actor="ops@admin")
        first = await keys.create("billing", owner="team-a", scopes=["chat"], actor="ann@ci")
        second = await keys.rotate(first.record.id, grace=HOUR)
        await keys.revoke(second.record.id, actor="bob@laptop")
        entries = await store.audit_entries()
        assert [(e.action, e.record, e.actor, e.related) for e in entries] == [
            ("key.revoked", second.record.id, "bob@laptop", None),
            ("key.rotated", first.record.id, "ops@admin", second.record.id),
            ("key.created", second.record.id, "ops@admin", first.record.id),
            ("key.created", first.record.id, "ann@ci", None),
        ]
        [rotated] = entries[1].changes
        assert rotated.field == "expires_at" and rotated.after is not None
        # Every entry's change happened: each key is in the state its newest entry ends
        # with, and every key has its entries (none was changed without one).
        records = {r.id: r for r in await store.list_api_keys()}
        newest: dict[str, AuditEntry] = {}
        for entry in entries:
            newest.setdefault(entry.record, entry)
        assert set(newest) == set(records)
        for key_id, entry in newest.items():
            for change in entry.changes:
                assert getattr(records[key_id], change.field) == change.after
        text = repr(entries)
        for created in (first, second):
            assert created.key not in text
            assert created.record.key_hash not in text
            assert created.record.prefix not in text


__all__ = [
    "AlertStoreContract",
    "AnalyticsStoreContract",
    "AuditStoreContract",
    "BotStoreContract",
    "ContractClock",
    "DashboardStoreContract",
    "KeyStoreContract",
    "LimitStoreContract",
    "LogStoreContract",
    "ShiftedClock",
    "StoreContract",
]
