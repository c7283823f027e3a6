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
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import httpx
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
from convex_guard._store import LogBatch

HUGE = 10**9


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
        routes=[Route("/api/ai/{provider}/chat", chat, methods=["POST"])],
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


async def load(url: str, requests: int, concurrency: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                response = await client.post("/api/ai/openai/chat", json={"q": "hi"})
                assert response.status_code == 200, response.text

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)

    with running_server() as convex:
        memory = CountingMemoryStore()
        remote = CountingConvexStore(convex.url, convex.admin_key, timeout=10)
        rates: dict[str, list[float]] = {"MemoryStore": [], "ConvexStore": []}
        with serve(guarded_app(memory)) as memory_url, serve(guarded_app(remote)) as convex_url:
            for _ in range(args.rounds):
                for name, url in (("MemoryStore", memory_url), ("ConvexStore", convex_url)):
                    rates[name].append(asyncio.run(load(url, args.requests, args.concurrency)))
        # The servers have stopped: their log writers flushed every buffered row.
        total = args.rounds * args.requests
        ratios = [c / m for m, c in zip(rates["MemoryStore"], rates["ConvexStore"], strict=True)]

    print(
        f"{args.rounds} interleaved rounds of {args.requests} requests, "
        f"{args.concurrency} concurrent clients\n"
    )
    print(
        "| store | requests/s (median) | ratio to MemoryStore | round trips/request | rows/batch |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, store in (("MemoryStore", memory), ("ConvexStore", remote)):
        batches = store.calls["logs:writeBatch"]
        ratio = 1.0 if name == "MemoryStore" else statistics.median(ratios)
        print(
            f"| {name} | {statistics.median(rates[name]):,.0f} | {ratio:.2f}x | "
            f"{store.calls['guard:check'] / total:.2f} | {store.rows / max(batches, 1):.1f} |"
        )
    other = {k: v for k, v in remote.calls.items() if k not in ("guard:check", "logs:writeBatch")}
    print(f"\nConvex rows logged: {remote.rows} of {total}; other Convex calls: {dict(other)}")


if __name__ == "__main__":
    main()
