"""Shared pieces of the fault, abuse and load tests: a recording ConvexStore, request bodies,
raw bytes on a socket, and counters of what a process holds open."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from convex_guard import (
    CircuitBreaker,
    ConvexStore,
    GuardSettings,
    LogBatch,
    MemoryStore,
    ResilientStore,
    Rule,
    StoreError,
)
from convex_guard.stores.resilient import BreakerState

BROWSER = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
UNKNOWN_MODEL = "unknown"
ROOT = Path(__file__).resolve().parents[1]


def breaker_state(breaker: CircuitBreaker) -> BreakerState:
    """The breaker's state, read afresh: a type checker keeps `breaker.state` narrowed by an
    earlier assertion across the calls that change it."""
    return breaker.state


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_reply(port: int, request: bytes, *, until: bytes, timeout: float) -> bytes:
    """Sends `request` as it is on a new loopback connection (HTTP clients refuse to send most
    malformed requests) and reads the reply until `until` arrives or the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while until not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def start_uvicorn(
    app: str, env: dict[str, str], *options: str
) -> tuple[subprocess.Popen[str], str]:
    """`python -m uvicorn APP` in its own process on a free port, once it answers /health."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--no-access-log", *options],
        cwd=ROOT,
        env={**env, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {process.communicate()[0]}")
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("uvicorn did not start") from None
            time.sleep(0.1)


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


def resilient_settings(
    url: str, admin_key: str, rules: list[Rule], *, timeout: float, cooldown: float
) -> tuple[RecordingConvexStore, ResilientStore, GuardSettings]:
    """A recording ConvexStore behind a ResilientStore (falling back, its breaker opening after
    three failures), and the guard's settings over it: the same timeout, and a log writer that
    flushes every 50 ms and retries within 200 ms, so a row lost in a fault shows soon."""
    primary = RecordingConvexStore(url, admin_key)
    store = ResilientStore(
        primary, timeout=timeout, breaker=CircuitBreaker(threshold=3, cooldown=cooldown)
    )
    settings = GuardSettings(
        store=store,
        rules=rules,
        timeout=timeout,
        writer_interval=0.05,
        writer_max_backoff=0.2,
    )
    return primary, store, settings


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


class Switch:
    """A store over a MemoryStore that can be taken down (every call raises)."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.down = False
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.down:
                raise StoreError(f"{name}: connection refused")
            return await attr(*args, **kwargs)

        return call
