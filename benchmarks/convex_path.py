"""The guard on ConvexStore (loopback Convex test server) beside MemoryStore, in one run.

Run: `.venv/bin/python -m benchmarks.convex_path` (after `make install`). Serves the same
guarded app under uvicorn twice, once per store, and loads each in interleaved rounds with
concurrent clients; prints requests/s, the ratio to MemoryStore, store round trips per request
on the hot path and log rows per batch mutation. The test server runs the real `convex/`
functions under convex-test in one Node process, so absolute Convex figures are a floor, not
what a real backend does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tests.convex_server.launch import running_server

from convex_guard import (
    HOUR,
    BotDetectionMiddleware,
    ConvexStore,
    FingerprintMiddleware,
    FixedWindow,
    MemoryStore,
    RateLimitMiddleware,
    RequestLoggerMiddleware,
    Rule,
    Store,
    report_usage,
)
from convex_guard.stores.base import LogBatch

HUGE = 10**9
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


class CountingConvexStore(ConvexStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()
        self.rows = 0

    async def _call(
        self, kind: Literal["query", "mutation"], path: str, args: Mapping[str, Any]
    ) -> Any:
        self.calls[path] += 1
        if path == "logs:writeBatch":
            self.rows += len(args["aiRequests"])
        return await super()._call(kind, path, args)


class CountingMemoryStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.rows = 0

    async def check(self, *args: Any, **kwargs: Any) -> Any:
        self.calls["guard:check"] += 1
        return await super().check(*args, **kwargs)

    async def write_logs(self, batch: LogBatch) -> None:
        self.calls["logs:writeBatch"] += 1
        self.rows += len(batch.ai_requests)
        await super().write_logs(batch)


async def chat(request: Request) -> JSONResponse:
    report_usage(request, model="bench-model", tokens=12, cost=0.0001)
    return JSONResponse({"reply": "hello"})


def guarded_app(store: Store) -> Starlette:
    rules = [
        Rule("globalAIRequests", FixedWindow(rate=HUGE, period=HOUR), path="/api/ai"),
        Rule("ipAIRequests", FixedWindow(rate=HUGE, period=HOUR), key="ip", path="/api/ai"),
        Rule("openaiRequests", FixedWindow(rate=HUGE, period=HOUR), path="/api/ai/openai"),
    ]
    return Starlette(
        routes=[Route("/api/ai/{provider}/chat", chat, methods=["GET", "POST"])],
        middleware=[
            Middleware(RequestLoggerMiddleware, store=store),
            Middleware(FingerprintMiddleware),
            Middleware(BotDetectionMiddleware, store=store, defer=True),
            Middleware(RateLimitMiddleware, store=store, rules=rules, timeout=5),
        ],
    )


@contextlib.contextmanager
def serve(app: Starlette) -> Iterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def load(url: str, seconds: int, connections: int) -> tuple[float, int]:
    """wrk against the app: (requests/s, requests answered)."""
    out = subprocess.run(
        [
            *("wrk", "-t1", f"-c{connections}", f"-d{seconds}s"),
            *("-H", f"User-Agent: {BROWSER}", url + "/api/ai/openai/chat"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk output unexpected:\n{out}")
    return float(rate.group(1)), int(total.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench` installs it (apt-get install wrk)")

    with running_server() as convex:
        memory = CountingMemoryStore()
        remote = CountingConvexStore(convex.url, convex.admin_key, timeout=10)
        rates: dict[str, list[float]] = {"MemoryStore": [], "ConvexStore": []}
        answered = {"MemoryStore": 0, "ConvexStore": 0}
        with serve(guarded_app(memory)) as memory_url, serve(guarded_app(remote)) as convex_url:
            for _ in range(args.rounds):
                for name, url in (("MemoryStore", memory_url), ("ConvexStore", convex_url)):
                    rate, count = load(url, args.seconds, args.connections)
                    rates[name].append(rate)
                    answered[name] += count
        # The servers have stopped: their log writers flushed every buffered row.
        ratios = [c / m for m, c in zip(rates["MemoryStore"], rates["ConvexStore"], strict=True)]

    print(
        f"{args.rounds} interleaved rounds of {args.seconds} s per store, wrk -t1 "
        f"-c{args.connections}; uvicorn in this process, the test server in Node\n"
    )
    print(
        "| store | requests/s (median) | ratio to MemoryStore | round trips/request | rows/batch |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, store in (("MemoryStore", memory), ("ConvexStore", remote)):
        batches = store.calls["logs:writeBatch"]
        ratio = 1.0 if name == "MemoryStore" else statistics.median(ratios)
        trips = store.calls["guard:check"] / max(store.rows, 1)
        print(
            f"| {name} | {statistics.median(rates[name]):,.0f} | {ratio:.2f}x | "
            f"{trips:.2f} | {store.rows / max(batches, 1):.1f} |"
        )
    other = {k: v for k, v in remote.calls.items() if k not in ("guard:check", "logs:writeBatch")}
    print(
        f"\nRound trips are store calls per request served (one log row each); wrk does not count"
        f" requests still in flight when it stops, the server does. Convex: {remote.rows} rows "
        f"for {answered['ConvexStore']} answers counted by wrk; other calls: {dict(other)}"
    )


if __name__ == "__main__":
    main()
