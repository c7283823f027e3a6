"""Shared pieces of the fault, abuse and load tests: a recording ConvexStore, request bodies,
and counters of what a process holds open."""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from typing import Any

from convex_guard import ConvexStore, LogBatch

BROWSER = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
UNKNOWN_MODEL = "unknown"


def chat(model: str) -> dict[str, Any]:
    """A chat body whose `model` ends up in the request's log row: a unique id per request."""
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


class RecordingConvexStore(ConvexStore):
    """The real ConvexStore, counting calls and keeping every log batch the server accepted."""

    def __init__(self, url: str, admin_key: str, **options: Any) -> None:
        super().__init__(url, admin_key, **options)
        self.calls: Counter[str] = Counter()
        self.accepted: list[LogBatch] = []
        self._lock = threading.Lock()

    async def check(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["check"] += 1
        return await super().check(*args, **kwargs)

    async def write_logs(self, batch: LogBatch) -> None:
        self.calls["write_logs"] += 1
        await super().write_logs(batch)
        with self._lock:
            self.accepted.append(batch)

    def accepted_snapshot(self) -> list[LogBatch]:
        with self._lock:
            return list(self.accepted)


def open_fds() -> int:
    """File descriptors this process holds (sockets included)."""
    return len(os.listdir("/proc/self/fd"))


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed while listing
    return count


def tasks_in(loop: asyncio.AbstractEventLoop) -> int:
    """Tasks alive in `loop` (another thread's loop), counted on that loop."""
    future = asyncio.run_coroutine_threadsafe(_count_tasks(), loop)
    return future.result(timeout=10)


async def _count_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # not this one
