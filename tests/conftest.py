"""Shared fixtures: a real uvicorn server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp


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

ROOT = Path(__file__).resolve().parents[1]
TSX = ROOT / "convex" / "node_modules" / ".bin" / "tsx"
SERVER = ROOT / "tests" / "convex_server" / "server.ts"


class ConvexTestServer:
    """The Node loopback server running `convex/` under convex-test (tests only)."""

    def __init__(self, process: subprocess.Popen[str], port: int, admin_key: str) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_key = admin_key

    def _admin(self, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        response = httpx.post(
            self.url + path,
            json=body or {},
            headers={"Authorization": f"Convex {self.admin_key}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        """A fresh, empty deployment (and the real clock again)."""
        self._admin("/_test/reset")
        self._admin("/_test/time", {"offsetMs": 0})

    def shift_clock(self, offset_ms: float) -> float:
        """Move the functions' `Date.now()` by `offset_ms` from the wall clock; returns now."""
        return float(self._admin("/_test/time", {"offsetMs": offset_ms})["now"])  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def convex_server() -> Iterator[ConvexTestServer]:
    if not TSX.exists():
        raise RuntimeError("convex/node_modules is missing: run `make test` (it runs npm ci)")
    admin_key = "test-admin-" + secrets.token_hex(16)
    env = {**os.environ, "CONVEX_SELF_HOSTED_ADMIN_KEY": admin_key}
    process = subprocess.Popen(
        [str(TSX), str(SERVER), "--port", "0"],
        cwd=ROOT / "convex",
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"Convex test server did not start: {line!r}")
    server = ConvexTestServer(process, int(line.split()[-1]), admin_key)
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(server.url + "/version", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("Convex test server never answered /version")
        time.sleep(0.05)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
