"""The log writer keeps batches large under load: rows arriving during a write wait their turn."""

from __future__ import annotations

import asyncio

from convex_guard import AIRequestLog, LogBatch, LogWriter, MemoryStore


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
