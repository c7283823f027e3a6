"""Convex at scale: several app instances sharing one Convex deployment under concurrent load.

Run: `.venv/bin/python -m benchmarks.convex_scale [--instances 1 2 4] [--requests 8000]` (after
`make install`; `make bench` runs it for 1, 2 and 4 instances). Starts the loopback Convex test
server, `--instances` uvicorn processes of the example gateway on `ConvexStore`
(`benchmarks/scale_app.py`), and 64 concurrent clients spread over the instances as a load
balancer would, from 200 client addresses (X-Forwarded-For through a trusted proxy), on the
openai and perplexity chat routes. The global limit is a twentieth of the requests, below what
the two providers' limits admit, so it runs out mid-run. Each run is made twice: with the test
server emulating the backend's optimistic concurrency (a transaction that read a document
written since it started is retried, then answered 503) and without, so the cost of conflicts
shows as a ratio.

It prints requests/s, Convex round trips per request, conflicts, 503s and failed requests, each
limit's admitted requests against what the limit allows over the run, and ends with one line
(`Run.summary`) for the last run with OCC on:

    convex scale: hottest document W writes/request, C conflicts, F failed,
    admitted A of limit L (bound B)

(one line in the output). W is the most writes any one document took, per request served
(the table also gives it per admitted request: a denied request writes nothing); A, L and B are
the global limit's admitted requests, its limit, and the bound the local leases
keep: the limit plus instances x the largest block a lease takes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from tests.convex_server.launch import ConvexTestServer, running_server
from tests.fault_tools import BROWSER, chat, start_uvicorn

from convex_guard import HOUR, FixedWindow, preset_rules
from convex_guard.core.leases import largest_block

CLIENTS = 64
ADDRESSES = 200
ROUTES = ("openai", "perplexity")


@dataclass
class Run:
    """What one run saw, from the clients and from the test server's counters."""

    instances: int
    requests: int
    occ: bool
    seconds: float
    statuses: dict[str, Counter[int]]  # by route
    failed: int  # 5xx answers and requests that got no answer
    calls: int  # Convex function calls (queries and mutations) the instances made
    conflicts: int
    occ_failures: int
    hottest: int  # writes of the most written document
    hottest_name: str
    global_limit: int
    bound: float

    @property
    def admitted(self) -> int:
        return sum(counts[200] for counts in self.statuses.values())

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def writes_per_request(self) -> float:
        return self.hottest / self.requests

    def summary(self) -> str:
        return (
            f"convex scale: hottest document {self.writes_per_request:.3f} writes/request, "
            f"{self.conflicts} conflicts, {self.failed} failed, admitted {self.admitted} of "
            f"limit {self.global_limit} (bound {self.bound:g})"
        )


def _address(n: int) -> str:
    # TEST-NET-2 addresses, written into a header only: no traffic goes to them.
    return f"198.51.100.{n % ADDRESSES}"


async def _drive(urls: list[str], requests: int) -> tuple[dict[str, Counter[int]], int, float]:
    statuses: dict[str, Counter[int]] = {route: Counter() for route in ROUTES}
    failed = 0
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    # A new connection per request, as the load test does: uvicorn and httpx sometimes drop a
    # reused connection after a 429, which is not what this measures.
    headers = {"user-agent": BROWSER, "connection": "close"}
    started = time.monotonic()
    async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as client:

        async def one_client(c: int) -> None:
            nonlocal failed
            for n in range(c, requests, CLIENTS):
                route = ROUTES[n % len(ROUTES)]
                url = f"{urls[n % len(urls)]}/api/ai/{route}/chat"
                try:
                    answer = await client.post(
                        url, json=chat(f"m{n}"), headers={"x-forwarded-for": _address(n)}
                    )
                except httpx.TransportError:
                    failed += 1
                    continue
                statuses[route][answer.status_code] += 1
                if answer.status_code >= 500:
                    failed += 1

        await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))
    return statuses, failed, time.monotonic() - started


@contextlib.contextmanager
def _instances(
    convex: ConvexTestServer, count: int, global_limit: int
) -> Iterator[list[tuple[subprocess.Popen[str], str]]]:
    env = {
        **os.environ,
        "CONVEX_SELF_HOSTED_URL": convex.url,
        "CONVEX_SELF_HOSTED_ADMIN_KEY": convex.admin_key,
        "SCALE_GLOBAL_LIMIT": str(global_limit),
        "SCALE_WINDOW_START": str(int(time.time() * 1000)),
    }
    started: list[tuple[subprocess.Popen[str], str]] = []
    try:
        for _ in range(count):
            started.append(start_uvicorn("benchmarks.scale_app:app", env, "--log-level", "warning"))
        yield started
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # the log writer flushes on shutdown
        for process, _ in started:
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()


def _server_figures(counters: Mapping[str, Any]) -> tuple[int, int, int, int, str]:
    """(calls, conflicts, 503s, writes of the hottest document, its name) from the counters."""
    totals = counters["totals"]
    documents = counters["documents"]
    hottest = max(documents, key=lambda d: d["writes"], default=None)
    name = "-"
    if hottest is not None:
        table = hottest["table"]
        name = f"{hottest['component']}/{table}" if hottest.get("component") else table
    return (
        int(totals["mutations"]) + int(totals["queries"]),
        int(totals["conflicts"]),
        int(totals["occFailures"]),
        int(hottest["writes"]) if hottest else 0,
        name,
    )


def run(instances: int, requests: int, *, occ: bool = True) -> Run:
    """One run: a fresh test server, `instances` app processes, `requests` requests."""
    global_limit = max(10, requests // 20)
    with running_server(occ=occ) as convex:
        with _instances(convex, instances, global_limit) as started:
            urls = [url for _, url in started]
            statuses, failed, seconds = asyncio.run(_drive(urls, requests))
        calls, conflicts, occ_failures, hottest, name = _server_figures(convex.counters())
    block = largest_block(FixedWindow(rate=global_limit, period=HOUR, start=0))
    return Run(
        instances,
        requests,
        occ,
        seconds,
        statuses,
        failed,
        calls,
        conflicts,
        occ_failures,
        hottest,
        name,
        global_limit,
        global_limit + instances * block,
    )


def _allowed(route: str, seconds: float) -> float:
    """What a provider's limit admits over a run of `seconds` (its capacity plus the refill)."""
    config = next(r.config for r in preset_rules() if r.name == f"{route}Requests")
    return config.max + config.rate * seconds * 1000 / config.period


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=8000)
    args = parser.parse_args(argv)

    print(
        f"{CLIENTS} clients, {ADDRESSES} client addresses, routes {', '.join(ROUTES)}; "
        f"{args.requests} requests per run; the global limit is a twentieth of them\n"
    )
    print(
        "| instances | OCC | requests/s | ratio to OCC off | round trips/request | conflicts "
        "| 503s | failed | hottest document (writes/request, /admitted) "
        "| global admitted / limit (bound) "
        "| openai admitted / allowed | perplexity admitted / allowed |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    last: Run | None = None
    for instances in args.instances:
        off = run(instances, args.requests, occ=False)
        on = run(instances, args.requests, occ=True)
        for result in (off, on):
            ratio = result.rate / off.rate
            providers = " | ".join(
                f"{result.statuses[r][200]} / {_allowed(r, result.seconds):.0f}" for r in ROUTES
            )
            print(
                f"| {instances} | {'on' if result.occ else 'off'} | {result.rate:,.0f} | "
                f"{ratio:.2f}x | {result.calls / result.requests:.2f} | {result.conflicts} | "
                f"{result.occ_failures} | {result.failed} | {result.hottest_name} "
                f"({result.writes_per_request:.3f}, "
                f"{result.hottest / max(result.admitted, 1):.2f}) | {result.admitted} / "
                f"{result.global_limit} ({result.bound:g}) | {providers} |"
            )
        last = on
    assert last is not None
    print()
    print(last.summary())


if __name__ == "__main__":
    main()
