"""Graceful shutdown: SIGTERM to a real uvicorn process serving the guarded gateway on
ConvexStore, mid-load, flushes every buffered row before the process exits."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest

from .conftest import ConvexTestServer
from .fault_tools import BROWSER, chat, start_uvicorn

WORKERS = 8


@pytest.mark.slow
def test_sigterm_mid_load_flushes_every_row(convex_server: ConvexTestServer) -> None:
    convex_server.reset()
    env = {
        **os.environ,
        "CONVEX_SELF_HOSTED_URL": convex_server.url,
        "CONVEX_SELF_HOSTED_ADMIN_KEY": convex_server.admin_key,
    }
    process, url = start_uvicorn("tests.shutdown_app:app", env)
    try:
        answered: list[str] = []
        attempted: list[str] = []
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def load(worker: int) -> None:
            with httpx.Client(base_url=url, headers={"user-agent": BROWSER}, timeout=10) as c:
                for n in range(100_000):
                    model = f"w{worker}-{n:06d}"
                    with lock:
                        attempted.append(model)
                    try:
                        r = c.post("/api/ai/openai/chat", json=chat(model))
                    except httpx.TransportError:
                        return  # the server has stopped accepting requests
                    with lock:
                        answered.append(model)
                        statuses[r.status_code] += 1

        threads = [threading.Thread(target=load, args=(w,)) for w in range(WORKERS)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        with lock:
            before_term = len(answered)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        for thread in threads:
            thread.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # uvicorn re-raises the signal once it has shut down cleanly.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output, output
    assert before_term > 50, "the load was running when SIGTERM came"
    assert set(statuses) == {200}, statuses
    assert "Traceback" not in output, output
    rows = [str(r["model"]) for r in convex_server.rows("aiRequestLogs")]
    counts = Counter(rows)
    assert not [m for m, c in counts.items() if c > 1], "a row written twice"
    missing = [m for m in answered if m not in counts]
    assert not missing, f"{len(missing)} answered requests have no row: {missing[:5]}"
    assert set(rows) <= set(attempted)
    # Rows flushed at shutdown, not earlier: the writer held them all (60 s interval).
    batches = convex_server.rows("logBatches")
    assert len(batches) == 1, len(batches)
