"""Shared fixtures: a real uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import ASGIApp

from .convex_server.launch import ConvexTestServer, running_server

__all__ = ["ConvexTestServer", "RunningServer", "convex_server", "serve"]


class RunningServer:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        sockets = server.servers[0].sockets
        self.port: int = sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def serve(app: ASGIApp, **options: object) -> Iterator[RunningServer]:
    """Run `app` under uvicorn in a thread (its own event loop) until the block ends."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="auto",
        **options,  # type: ignore[arg-type]
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
    # OCC on, as on the backend, with its retry count and concurrency cap; the backoff
    # scaled down 20x (the backend's 100-2000 ms) so that a test whose mutations conflict
    # stays fast while keeping the same shape (exponential, jittered). The queue timeout
    # stays the backend's 5 s: on a loaded 2-core machine a shorter one would turn a slow
    # test run into spurious 429s.
    with running_server(occ=True, occ_retries=4, occ_backoff_ms=(5, 50)) as server:
        yield server
