"""One contract for every store: the same inputs give the same decisions and the same rows.

Runs against MemoryStore and against ConvexStore on the loopback Convex test server (the real
`convex/` functions under convex-test, over Convex's real HTTP API). Set CONVEX_SELF_HOSTED_URL
and CONVEX_SELF_HOSTED_ADMIN_KEY to also run it against a real self-hosted deployment
(`-m convex_live`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from convex_guard import (
    HOUR,
    MINUTE,
    FixedWindow,
    LimitRequest,
    LimitResult,
    MemoryStore,
    Store,
    StoreConflictError,
    TokenBucket,
)
from convex_guard.stores.base import (
    AIRequestLog,
    AuthFailure,
    BotCheck,
    BotEvent,
    EmbeddingRequestLog,
    KeyRateLimit,
    KeyUsage,
    LogBatch,
    NewApiKey,
)
from convex_guard.stores.convex import ConvexStore

from .conftest import ConvexTestServer


@dataclass
class Harness:
    store: Store
    now: Callable[[], float]
    advance: Callable[[float], None]


def wall_ms() -> float:
    return time.time() * 1000.0


@pytest.fixture(params=["memory", "convex"])
async def harness(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Harness]:
    if request.param == "memory":
        offset = [0.0]
        store = MemoryStore(clock=lambda: wall_ms() + offset[0])

        def advance(ms: float) -> None:
            offset[0] += ms

        yield Harness(store, lambda: wall_ms() + offset[0], advance)
        return
    server: ConvexTestServer = request.getfixturevalue("convex_server")
    server.reset()
    shift = [0.0]

    def advance_convex(ms: float) -> None:
        shift[0] += ms
        server.shift_clock(shift[0])

    convex = ConvexStore(server.url, server.admin_key, timeout=10)
    try:
        yield Harness(convex, lambda: wall_ms() + shift[0], advance_convex)
    finally:
        await convex.close()


live = pytest.mark.skipif(
    not (
        os.environ.get("CONVEX_SELF_HOSTED_URL") and os.environ.get("CONVEX_SELF_HOSTED_ADMIN_KEY")
    ),
    reason="set CONVEX_SELF_HOSTED_URL and CONVEX_SELF_HOSTED_ADMIN_KEY to run against a real "
    "self-hosted deployment",
)


@pytest.mark.convex_live
@live
async def test_live_deployment_answers_the_hot_path() -> None:
    store = ConvexStore.from_env()
    try:
        name = f"live-{uuid.uuid4().hex}"
        config = FixedWindow(rate=2, period=HOUR, start=0)
        results = [await store.limit(name, config, key="k") for _ in range(3)]
        assert [r.ok for r in results] == [True, True, False]
        await store.reset(name, key="k")
    finally:
        await store.close()


# -- limits --------------------------------------------------------------------------------


async def test_fixed_window_admits_rate_then_denies(harness: Harness) -> None:
    config = FixedWindow(rate=3, period=HOUR, start=0)
    results = [await harness.store.limit("ip", config, key="1.2.3.4") for _ in range(4)]
    assert [r.ok for r in results] == [True, True, True, False]
    assert [r.remaining for r in results[:3]] == [2, 1, 0]
    denied = results[3]
    next_window = (harness.now() // HOUR + 1) * HOUR
    assert denied.retry_after is not None
    assert denied.retry_after == pytest.approx(next_window - harness.now(), abs=2_000)
    # Another key is unaffected.
    assert (await harness.store.limit("ip", config, key="5.6.7.8")).ok


async def test_token_bucket_retry_after_and_refill(harness: Harness) -> None:
    config = TokenBucket(rate=10, period=HOUR, capacity=10)
    for _ in range(10):
        assert (await harness.store.limit("user", config, key="ann")).ok
    denied = await harness.store.limit("user", config, key="ann")
    assert not denied.ok
    assert denied.retry_after == pytest.approx(HOUR / 10, abs=1_000)
    harness.advance(HOUR / 10 + 1_000)
    assert (await harness.store.limit("user", config, key="ann")).ok


async def test_count_and_reserve(harness: Harness) -> None:
    config = TokenBucket(rate=10, period=MINUTE, capacity=10, max_reserved=5)
    assert (await harness.store.limit("t", config, count=8)).ok
    reserved = await harness.store.limit("t", config, count=5, reserve=True)
    assert reserved.ok and reserved.retry_after == pytest.approx(3 * 6_000, abs=500)
    too_far = await harness.store.limit("t", config, count=3, reserve=True)
    assert not too_far.ok


async def test_check_is_all_or_nothing(harness: Harness) -> None:
    roomy = FixedWindow(rate=10, period=HOUR, start=0)
    tight = FixedWindow(rate=1, period=HOUR, start=0)
    first = await harness.store.check(
        [LimitRequest("a", roomy, "k"), LimitRequest("b", tight, "k")]
    )
    assert first.ok and [r.ok for r in first.results] == [True, True]
    second = await harness.store.check(
        [LimitRequest("a", roomy, "k"), LimitRequest("b", tight, "k")]
    )
    assert not second.ok
    assert [r.ok for r in second.results] == [True, False]
    # The denied call consumed nothing from "a".
    assert (await harness.store.peek("a", roomy, key="k")).remaining == 9


async def test_reset_and_peek(harness: Harness) -> None:
    config = FixedWindow(rate=2, period=HOUR, start=0)
    assert (await harness.store.peek("p", config, key="k")).remaining == 2
    await harness.store.limit("p", config, key="k")
    await harness.store.limit("p", config, key="k")
    assert (await harness.store.peek("p", config, key="k")).remaining == 0
    assert not (await harness.store.limit("p", config, key="k")).ok
    await harness.store.reset("p", key="k")
    assert (await harness.store.peek("p", config, key="k")).remaining == 2


@pytest.mark.slow
async def test_concurrent_calls_admit_exactly_the_limit(harness: Harness) -> None:
    # 100 concurrent calls on one key are one hot document on Convex: the backend may answer
    # some of them 503 after its retries (StoreConflictError), never admit one twice. Every
    # call that was answered is admitted while the limit lasts, the rest refused.
    config = FixedWindow(rate=30, period=HOUR, start=0)
    results = await asyncio.gather(
        *(harness.store.limit("burst", config, key="k") for _ in range(100)),
        return_exceptions=True,
    )
    answered = [r for r in results if isinstance(r, LimitResult)]
    failed = [r for r in results if not isinstance(r, LimitResult)]
    assert all(isinstance(e, StoreConflictError) for e in failed), failed
    if isinstance(harness.store, MemoryStore):
        assert not failed
    assert sum(r.ok for r in answered) == min(30, len(answered))


# -- bots ------------------------------------------------------------------------------------


async def test_bot_escalation_and_events(harness: Harness) -> None:
    config = FixedWindow(rate=100, period=HOUR, start=0)
    bot = BotCheck("fp-1", "203.0.113.9", "python-requests/2.32", "bot_useragent", "allowed")
    actions = []
    for _ in range(12):
        outcome = await harness.store.check([LimitRequest("ip", config, "203.0.113.9")], bot=bot)
        assert outcome.bot is not None
        actions.append(outcome.bot.action)
        assert outcome.ok == (outcome.bot.action == "allowed")
    assert actions == ["allowed"] * 5 + ["challenged"] * 5 + ["blocked"] * 2
    assert (await harness.store.peek("ip", config, key="203.0.113.9")).remaining == 95
    since = harness.now() - MINUTE
    events = await harness.store.bot_events(since=since, limit=5)
    assert len(events) == 5
    assert events[0].action == "blocked"  # newest first
    assert events[0].metadata is not None and events[0].metadata["previousAttempts"] == 11
    assert await harness.store.count_bot_events("fp-1", since) == 12
    assert await harness.store.count_bot_events("other", since) == 0


async def test_rotating_fingerprints_from_one_client_key_still_escalate(harness: Harness) -> None:
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
        outcome = await harness.store.check([], bot=bot)
        assert outcome.bot is not None
        actions.append(outcome.bot.action)
    assert actions == ["allowed"] * 5 + ["challenged"] * 5 + ["blocked"] * 2
    # The fingerprint's own history still counts when the client key's is shorter.
    moved = BotCheck("fp-rotated-3", "192.0.2.1", "curl/8", "bot_useragent", "allowed")
    outcome = await harness.store.check([], bot=moved)
    assert outcome.bot is not None and outcome.bot.previous_events == 1
    # Events written in a batch with a client key count towards it too.
    now = harness.now()
    batch_client = f"198.51.100.{uuid.uuid4().int % 250}"
    await harness.store.write_logs(
        LogBatch(
            id=uuid.uuid4().hex,
            bot_events=[
                BotEvent(
                    now - i,
                    f"fp-b{i}",
                    batch_client,
                    "x",
                    "rate_limit",
                    "blocked",
                    None,
                    batch_client,
                )
                for i in range(6)
            ],
        )
    )
    late = BotCheck(
        "fp-new", batch_client, "curl/8", "bot_useragent", "allowed", client_key=batch_client
    )
    outcome = await harness.store.check([], bot=late)
    assert outcome.bot is not None and outcome.bot.action == "challenged"
    assert outcome.bot.previous_events == 6
    newest = (await harness.store.bot_events(since=now - MINUTE, limit=1))[0]
    assert (newest.fingerprint, newest.client_key) == ("fp-new", batch_client)


async def test_bot_limit_exhaustion_challenges(harness: Harness) -> None:
    suspicious = LimitRequest("suspiciousBehavior", FixedWindow(rate=2, period=HOUR, start=0), "fp")
    bot = BotCheck("fp", "ip", "curl/8", "bot_useragent", "allowed", limit=suspicious)
    actions = []
    for _ in range(3):
        outcome = await harness.store.check([], bot=bot)
        assert outcome.bot is not None
        actions.append(outcome.bot.action)
    assert actions == ["allowed", "allowed", "challenged"]
    events = await harness.store.bot_events(since=harness.now() - MINUTE)
    assert [e.action for e in events] == ["challenged", "allowed", "allowed"]


async def test_policy_block_is_never_softened(harness: Harness) -> None:
    bot = BotCheck("fp", "ip", "GPTBot/1.2", "ai_scraper", "blocked")
    outcome = await harness.store.check(
        [LimitRequest("x", FixedWindow(rate=1, period=HOUR))], bot=bot
    )
    assert not outcome.ok and outcome.bot is not None and outcome.bot.action == "blocked"


# -- API keys --------------------------------------------------------------------------------


async def test_api_key_lifecycle(harness: Harness) -> None:
    now = harness.now()
    created = await harness.store.create_api_key(
        NewApiKey(
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
    )
    assert created.active and created.request_count == 0 and created.last_used is None
    assert created.rate_limit == KeyRateLimit(50, MINUTE)
    found = await harness.store.find_api_key("a" * 64)
    assert found == created
    assert await harness.store.find_api_key("b" * 64) is None
    await harness.store.create_api_key(
        NewApiKey("ai", "c" * 64, "cg_ai_x", "chat", None, (), None, now, None)
    )
    assert {k.name for k in await harness.store.list_api_keys()} == {"indexer", "chat"}
    assert [k.name for k in await harness.store.list_api_keys(kind="ai")] == ["chat"]
    assert [k.name for k in await harness.store.list_api_keys(owner="team-search")] == ["indexer"]
    revoked = await harness.store.update_api_key(created.id, active=False)
    assert revoked is not None and not revoked.active
    await harness.store.write_logs(
        LogBatch(id="usage-1", key_usage=[KeyUsage(created.id, now + 5, 7)])
    )
    used = await harness.store.find_api_key("a" * 64)
    assert used is not None and used.request_count == 7 and used.last_used == now + 5


# -- logs and analytics -----------------------------------------------------------------------


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


async def test_provider_stats_from_batches(harness: Harness) -> None:
    base = (harness.now() // HOUR - 2) * HOUR + 30_000  # inside an old minute, mid-minute
    rows = [
        ai_row(base, "openai", True, 100, 10, 0.5),
        ai_row(base + 61_000, "openai", False, 300, 0, 0.0),
        ai_row(base + 5 * MINUTE, "openai", True, 200, 20, 1.5),
        ai_row(base + 10 * MINUTE, "groq", True, 50, 5, 0.1),
    ]
    await harness.store.write_logs(LogBatch(id="b1", ai_requests=rows))
    # The same batch again (a retry after a lost answer) lands once.
    await harness.store.write_logs(LogBatch(id="b1", ai_requests=rows))
    stats = await harness.store.provider_stats("openai", base - 1, base + HOUR)
    assert stats.total_requests == 3
    assert stats.success_rate == pytest.approx(2 / 3)
    assert stats.average_latency == pytest.approx(200)
    assert stats.total_tokens == 30
    assert stats.total_cost == pytest.approx(2.0)
    narrow = await harness.store.provider_stats("openai", base + 60_000, base + 2 * MINUTE)
    assert narrow.total_requests == 1 and narrow.success_rate == 0
    empty = await harness.store.provider_stats("perplexity", base, base + HOUR)
    assert (empty.total_requests, empty.success_rate, empty.average_latency) == (0, 0.0, 0.0)
    assert (empty.total_tokens, empty.total_cost) == (0, 0.0)


async def test_embedding_usage_auth_failures_and_bot_event_rows(harness: Harness) -> None:
    now = harness.now()
    await harness.store.write_logs(
        LogBatch(
            id="b2",
            embedding_requests=[
                EmbeddingRequestLog("r1", "h" * 64, now, 4, 12.5, 40, True, "bge-small"),
                EmbeddingRequestLog("r2", "h" * 64, now + 1, 2, 8.0, 0, False, "bge-small", "oops"),
                EmbeddingRequestLog("r3", "z" * 64, now + 2, 9, 8.0, 90, True, "bge-small"),
            ],
            auth_failures=[
                AuthFailure("x" * 64, now, "203.0.113.1", "curl/8"),
                AuthFailure("x" * 64, now + 1, None, None),
            ],
            bot_events=[
                BotEvent(now, "fp-9", "203.0.113.1", "curl/8", "rate_limit", "blocked", None)
            ],
        )
    )
    usage = await harness.store.embedding_usage("h" * 64, now - 1, now + 10)
    assert (usage.total_requests, usage.successful_requests) == (2, 1)
    assert (usage.total_tokens, usage.total_items) == (40, 6)
    assert await harness.store.count_auth_failures("x" * 64, now - 1) == 2
    assert await harness.store.count_auth_failures("x" * 64, now + 1) == 1
    events = await harness.store.bot_events(since=now - 1)
    assert [(e.fingerprint, e.detection_type, e.action) for e in events] == [
        ("fp-9", "rate_limit", "blocked")
    ]
