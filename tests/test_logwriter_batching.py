"""The log writer keeps batches large under load: rows arriving during a write wait their turn."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from convex_guard import (
    MINUTE,
    AIRequestLog,
    ApiKeys,
    AuthFailure,
    ConvexStore,
    LogBatch,
    LogWriter,
    MemoryStore,
    hash_key,
)

from .conftest import ConvexTestServer


class SlowStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    async def write_logs(self, batch: LogBatch) -> None:
        await asyncio.sleep(0.05)  # a store round trip
        self.batch_sizes.append(len(batch.ai_requests))
        await super().write_logs(batch)


def row(i: int) -> AIRequestLog:
    return AIRequestLog(float(i), "openai", "m", "fp", "ip", True, 1.0)


async def test_batches_do_not_shrink_to_the_store_latency() -> None:
    store = SlowStore()
    writer = LogWriter(store, batch_size=50, interval=0.2)
    await writer.start()
    for i in range(600):  # ~1,000 rows/s for 0.6 s: 50 arrive during every write
        writer.add(row(i))
        if i % 10 == 9:
            await asyncio.sleep(0.01)
    await writer.close()
    assert sum(store.batch_sizes) == 600
    assert [r.timestamp for r in store.ai_logs] == [float(i) for i in range(600)]  # in order
    # Every batch but the last of each timer flush is full: no trickle of tiny batches.
    assert sum(size == 50 for size in store.batch_sizes) >= 10
    assert len(store.batch_sizes) <= 15


async def _uses_across_a_minute_counted_in_each(store: MemoryStore | ConvexStore) -> None:
    """One flush holding uses on both sides of a minute's end counts each in its own minute."""
    created = await ApiKeys(store).create("minute-edge")
    writer = LogWriter(store, interval=3600)
    edge = (time.time() * 1000 // MINUTE - 10) * MINUTE  # a minute's start, ten minutes ago
    for when in (edge - 2, edge - 1, edge + 1):
        writer.record_key_usage(created.record.id, when)
    await writer.close()  # one flush, one batch
    before = await store.dashboard(edge - MINUTE, edge, MINUTE)
    after = await store.dashboard(edge, edge + MINUTE, MINUTE)
    assert [(k.id, k.requests) for k in before.top_keys] == [(created.record.id, 2)]
    assert [(k.id, k.requests) for k in after.top_keys] == [(created.record.id, 1)]
    found = await store.find_api_key(hash_key(created.key))
    assert found is not None and found.request_count == 3


async def test_key_uses_across_a_minute_are_counted_in_each_on_memory() -> None:
    await _uses_across_a_minute_counted_in_each(MemoryStore())


async def test_key_uses_across_a_minute_are_counted_in_each_on_convex(
    convex_server: ConvexTestServer,
) -> None:
    convex_server.reset()
    store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
    try:
        await _uses_across_a_minute_counted_in_each(store)
    finally:
        await store.close()


class Recording(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[LogBatch] = []

    async def write_logs(self, batch: LogBatch) -> None:
        self.batches.append(batch)
        await super().write_logs(batch)


@settings(max_examples=50, deadline=None)
@given(
    kinds=st.lists(st.booleans(), max_size=40),
    batch_size=st.integers(min_value=1, max_value=8),
    flush_every=st.integers(min_value=1, max_value=12),
)
def test_every_row_is_written_once_in_order_whether_a_batch_holds_other_rows_or_not(
    kinds: list[bool], batch_size: int, flush_every: int
) -> None:
    """Request rows alone make a batch as a slice of the buffer; other rows among them are
    sorted into their kinds: either way each row is written once, each kind in order."""

    async def run() -> Recording:
        store = Recording()
        writer = LogWriter(store, batch_size=batch_size, interval=3600)
        for i, is_request in enumerate(kinds):
            writer.add(row(i) if is_request else AuthFailure("h", float(i)))
            if i % flush_every == flush_every - 1:
                await writer.flush()
        await writer.close()
        return store

    store = asyncio.run(run())
    requests = [float(i) for i, is_request in enumerate(kinds) if is_request]
    failures = [float(i) for i, is_request in enumerate(kinds) if not is_request]
    batches = store.batches
    assert [r.timestamp for b in batches for r in b.ai_requests] == requests
    assert [f.timestamp for b in batches for f in b.auth_failures] == failures
    assert all(len(b.ai_requests) + len(b.auth_failures) <= batch_size for b in batches)
