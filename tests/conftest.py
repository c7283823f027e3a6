"""Shared fixtures: a real uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp

from .convex_server.launch import ConvexTestServer, running_server

# The store contract suite lives in the package: pytest rewrites only the asserts it is told of.
pytest.register_assert_rewrite("convex_guard.stores.testing")

__all__ = ["ConvexTestServer", "RunningServer", "convex_server", "serve"]


class RunningServer:
    """A started server: `url` and `port` on TCP; on a unix socket `uds` is its path, and
    `url` is for an `httpx.HTTPTransport(uds=server.uds)` client (port 0)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.uds: str | None = server.config.uds
        self.port: int
        if self.uds is not None:
            self.port = 0
            self.url = "http://localhost"
            return
        sockets = server.servers[0].sockets
        self.port = sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def serve(app: ASGIApp, **options: Any) -> Iterator[RunningServer]:
    """Run `app` under uvicorn in a thread (its own event loop) until the block ends.

    `serve(app, uds=path)` listens on that unix socket instead of a loopback port.
    """
    where: dict[str, Any] = {} if "uds" in options else {"host": "127.0.0.1", "port": 0}
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="auto",
        **where,
        **options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    running = RunningServer(server, thread)
    try:
        yield running
    finally:
        running.stop()


# -- the loopback Convex test server ------------------------------------------------------------


@pytest.fixture(scope="session")
def convex_server() -> Iterator[ConvexTestServer]:
    # OCC emulation on, with the backend's own numbers (4 retries, 100 ms-2 s backoff, 16
    # mutations at once, a 5 s queue), so every suite's writes are counted and conflict as they
    # would on a real deployment: a harness kinder than the backend would hide the hot
    # documents users meet. The strict server's own tests (convex_server/) vary the numbers.
    with running_server(occ=True) as server:
        yield server
