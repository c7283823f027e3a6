"""Load: `CONVEX_GUARD_LOAD_REQUESTS` requests (default 5,000; the issue's full run is 20,000)
from 64 concurrent clients against the guarded gateway in its own uvicorn process on
ConvexStore (the loopback Convex server). The global limit admits exactly what a fixed window
allows, and every request has exactly one log row."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import httpx
import pytest

from .conftest import ConvexTestServer
from .fault_tools import BROWSER, UNKNOWN_MODEL, chat, start_uvicorn

REQUESTS = int(os.environ.get("CONVEX_GUARD_LOAD_REQUESTS", "5000"))
CLIENTS = 64
#: What the window admits: well below the request count, so both answers are exercised.
LIMIT = REQUESTS * 3 // 5


async def drive(url: str) -> tuple[Counter[int], dict[str, int], float]:
    """Every client sends its share one request after another; status per model."""
    by_model: dict[str, int] = {}
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    started = time.monotonic()
    # A new connection per request: with keep-alive, about 1 request in 2,000 failed with a
    # ReadError on a reused connection after a 429 (uvicorn + httpx, not the guard's answer;
    # see the issue note). The guard's behaviour under load is what this test measures.
    headers = {"user-agent": BROWSER, "connection": "close"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=60, limits=limits
    ) as client:

        async def one_client(c: int) -> None:
            for n in range(c, REQUESTS, CLIENTS):
                model = f"c{c:02d}-{n:06d}"
                r = await client.post("/api/ai/openai/chat", json=chat(model))
                by_model[model] = r.status_code

        await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
    return Counter(by_model.values()), by_model, time.monotonic() - started


@pytest.mark.slow
def test_load_admits_exactly_the_limit_and_logs_every_request(
    convex_server: ConvexTestServer,
) -> None:
    convex_server.reset()
    env = {
        **os.environ,
        "CONVEX_SELF_HOSTED_URL": convex_server.url,
        "CONVEX_SELF_HOSTED_ADMIN_KEY": convex_server.admin_key,
        "LOAD_LIMIT": str(LIMIT),
        # The window starts now: it cannot roll over during the run.
        "LOAD_WINDOW_START": str(int(time.time() * 1000)),
    }
    process, url = start_uvicorn("tests.load_app:app", env, "--log-level", "warning")
    try:
        statuses, by_model, seconds = asyncio.run(drive(url))
        process.send_signal(signal.SIGTERM)  # flushes the last rows
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    print(f"\n{REQUESTS} requests, {CLIENTS} clients: {seconds:.1f} s, {REQUESTS / seconds:.0f}/s")
    assert "Traceback" not in output, output
    assert len(by_model) == REQUESTS
    assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}, statuses

    rows = convex_server.rows("aiRequestLogs")
    assert len(rows) == REQUESTS, (len(rows), REQUESTS)
    logged = Counter(str(r["model"]) for r in rows)
    admitted = {m for m, s in by_model.items() if s == 200}
    assert {m for m in logged if m != UNKNOWN_MODEL} == admitted
    assert all(logged[m] == 1 for m in admitted), "one row per admitted request"
    limited = [r for r in rows if r.get("error") == "rate_limited:loadGlobal"]
    assert len(limited) == logged[UNKNOWN_MODEL] == REQUESTS - LIMIT
