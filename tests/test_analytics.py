"""Analytics from the store, against figures computed by hand."""

from __future__ import annotations

import math

import pytest

from convex_guard import ApiKeyList, MemoryStore
from convex_guard.stores.base import (
    AIRequestLog,
    AuthFailure,
    BotEvent,
    EmbeddingRequestLog,
    LogBatch,
    ProviderStats,
)


def ai(
    ts: float, provider: str, ok: bool, latency: float, tokens: int | None, cost: float | None
) -> AIRequestLog:
    return AIRequestLog(
        timestamp=ts,
        provider=provider,
        model="m",
        fingerprint="f",
        ip="1.1.1.1",
        success=ok,
        latency_ms=latency,
        error=None if ok else "http_500",
        tokens_used=tokens,
        cost=cost,
    )


@pytest.fixture
async def store() -> MemoryStore:
    store = MemoryStore(clock=lambda: 10_000.0)
    await store.write_logs(
        LogBatch(
            id="b1",
            ai_requests=[
                ai(1_000, "openai", True, 100, 10, 0.5),
                ai(2_000, "openai", True, 200, 20, 0.25),
                ai(3_000, "openai", False, 600, None, None),
                ai(4_000, "openai", True, 300, 30, 0.25),
                ai(2_500, "groq", True, 50, 5, 0.0),
                ai(9_000, "openai", True, 1000, 100, 1.0),  # outside [1000, 4000]
            ],
            embedding_requests=[
                EmbeddingRequestLog("r1", "h1", 1_000, 3, 10.0, 30, True, "e"),
                EmbeddingRequestLog("r2", "h1", 2_000, 2, 10.0, 20, False, "e", "http_500"),
                EmbeddingRequestLog("r3", "h2", 2_000, 7, 10.0, 70, True, "e"),
            ],
            auth_failures=[
                AuthFailure("h1", 1_000),
                AuthFailure("h1", 5_000),
                AuthFailure("h2", 6_000),
            ],
            bot_events=[
                BotEvent(t, "fp", "2.2.2.2", "curl", "bot_useragent", "blocked")
                for t in (1_000.0, 3_000.0, 8_000.0)
            ],
        )
    )
    return store


async def test_provider_stats_hand_computed(store: MemoryStore) -> None:
    stats = await store.provider_stats("openai", 1_000, 4_000)
    assert stats.total_requests == 4
    assert stats.success_rate == pytest.approx(3 / 4)
    assert stats.average_latency == pytest.approx((100 + 200 + 600 + 300) / 4)  # 300
    assert stats.total_tokens == 60
    assert stats.total_cost == pytest.approx(1.0)
    groq = await store.provider_stats("groq", 0, 10_000)
    assert groq == ProviderStats(1, 1.0, 50.0, 5, 0.0)


@pytest.mark.parametrize(
    ("provider", "start", "end"), [("openai", 4_001, 8_999), ("nope", 0, 1e12)]
)
async def test_empty_range_is_zeros_not_nan(
    store: MemoryStore, provider: str, start: float, end: float
) -> None:
    stats = await store.provider_stats(provider, start, end)
    assert stats == ProviderStats(0, 0.0, 0.0, 0, 0.0)
    assert not any(math.isnan(v) for v in (stats.success_rate, stats.average_latency))


async def test_embedding_usage_auth_failures_and_bot_events(store: MemoryStore) -> None:
    usage = await store.embedding_usage("h1", 0, 10_000)
    assert (
        usage.total_requests,
        usage.successful_requests,
        usage.total_tokens,
        usage.total_items,
    ) == (
        2,
        1,
        50,
        5,
    )
    assert (await store.embedding_usage("h1", 1_500, 10_000)).total_requests == 1
    assert await store.count_auth_failures("h1", 0) == 2
    assert await store.count_auth_failures("h1", 2_000) == 1
    recent = await store.bot_events(since=2_000)
    assert [e.timestamp for e in recent] == [8_000.0, 3_000.0]  # most recent first
    assert [e.timestamp for e in await store.bot_events(since=0, limit=1)] == [8_000.0]


async def test_a_batch_written_twice_counts_once(store: MemoryStore) -> None:
    await store.write_logs(LogBatch(id="b1", ai_requests=[ai(1_500, "openai", True, 1, 1, 1)]))
    assert (await store.provider_stats("openai", 1_000, 4_000)).total_requests == 4


async def test_memory_store_flags_ranges_that_lost_rows_to_max_rows() -> None:
    """Past `max_rows` the oldest rows go: a range that reaches them is flagged, not silent."""
    store = MemoryStore(clock=lambda: 10_000.0, max_rows=3)
    await store.write_logs(
        LogBatch(id="a", ai_requests=[ai(t, "openai", True, 1, 1, 0.0) for t in (1_000, 2_000)])
    )
    whole = await store.provider_stats("openai", 0, 10_000)
    assert (whole.total_requests, whole.truncated) == (2, False)
    await store.write_logs(
        LogBatch(id="b", ai_requests=[ai(t, "openai", True, 1, 1, 0.0) for t in (3_000, 4_000)])
    )
    lost = await store.provider_stats("openai", 0, 10_000)
    assert (lost.total_requests, lost.truncated) == (3, True)  # the row at 1,000 was dropped
    kept = await store.provider_stats("openai", 1_001, 10_000)
    assert (kept.total_requests, kept.truncated) == (3, False)

    rows = [EmbeddingRequestLog(f"r{t}", "h", t, 1, 1.0, 1, True, "e") for t in (1, 2, 3, 4, 5)]
    await store.write_logs(LogBatch(id="c", embedding_requests=rows))
    usage = await store.embedding_usage("h", 0, 10)
    assert (usage.total_requests, usage.truncated) == (3, True)
    assert not (await store.embedding_usage("h", 3, 10)).truncated


async def test_memory_store_listing_is_never_truncated() -> None:
    store = MemoryStore()
    keys = await store.list_api_keys()
    assert isinstance(keys, ApiKeyList) and keys == [] and keys.truncated is False
