"""Microseconds of CPU each middleware adds per request, driving the ASGI app directly.

Run: `.venv/bin/python -m benchmarks.cpu`. No network and no server: each variant of
benchmarks/apps.py answers the same browser request in a loop, variants interleaved over
rounds; the table gives the median time per request and the median per-round difference from
the bare app, so a regression in one middleware shows at a glance.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

from benchmarks.apps import FACTORIES, PATH, SINGLE

BROWSER = (
    b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36"
)
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "path": PATH,
    "raw_path": PATH.encode(),
    "query_string": b"",
    "root_path": "",
    "scheme": "http",
    "server": ("127.0.0.1", 8000),
    "client": ("203.0.113.7", 50_000),
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", BROWSER),
        (b"accept", b"*/*"),
        (b"accept-language", b"en-US,en;q=0.9"),
        (b"accept-encoding", b"gzip, deflate, br"),
    ],
}


async def per_request_us(app: Any, requests: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    started = time.perf_counter()
    for i in range(requests):
        await app(dict(SCOPE), receive, send)
        if i % 64 == 63:
            await asyncio.sleep(0)  # let the log writer's flusher run, as a server's loop would
    return (time.perf_counter() - started) / requests * 1e6


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3_000)
    args = parser.parse_args(argv)
    variants = ["bare", *SINGLE, "guard"]
    apps = {name: FACTORIES[name]() for name in variants}

    async def run() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {name: [] for name in variants}
        for app in apps.values():
            await per_request_us(app, 200)  # warm caches and lazy starts
        for _ in range(args.rounds):
            for name, app in apps.items():
                gc.collect()
                times[name].append(await per_request_us(app, args.requests))
        return times

    times = asyncio.run(run())
    bare = times["bare"]

    def added(name: str) -> float:
        return statistics.median(t - b for t, b in zip(times[name], bare, strict=True))

    lines = [
        f"{args.rounds} interleaved rounds of {args.requests} requests per variant, in-process",
        "",
        "| variant | µs/request (median) | µs added to bare |",
        "|---|---:|---:|",
    ]
    for name in variants:
        extra = added(name)
        if name == "botdetection":
            extra -= added("fingerprint")  # measured behind a fingerprint middleware
        lines.append(f"| {name} | {statistics.median(times[name]):.1f} | {extra:+.1f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
