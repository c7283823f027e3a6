"""Convex round trips per request with token settlements and without, in one run.

Run: `.venv/bin/python -m benchmarks.convex_settlement`. Serves the same chat route under
uvicorn on ConvexStore (the loopback Convex test server: the real `convex/` functions under
convex-test) twice: limited by requests (a per-client and a global rule), and limited by
tokens (the same two rules counting tokens, which reserve an estimate and settle on the usage
the app reports). Each is sent the same requests over a few keep-alive connections; the table
gives the store calls per request by function. The target: settling costs no call of its
own, so the token-limited route makes no more round trips than the request-limited one (the
settlements ride in the log writer's batches).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tests.convex_server.launch import running_server

from benchmarks.convex_path import serve
from convex_guard import (
    HOUR,
    ConvexStore,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    Rule,
    report_usage,
)
from convex_guard.core.limits import MINUTE

HUGE = 10**9
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
PATH = "/api/ai/openai/chat/completions"
CHAT = {
    "model": "gpt-4o-mini",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
}


class CountingConvexStore(ConvexStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[str] = Counter()
        self.settlements = 0

    async def _call(
        self, kind: Literal["query", "mutation"], path: str, args: Mapping[str, Any]
    ) -> Any:
        self.calls[path] += 1
        if path == "logs:writeBatch":
            self.settlements += len(args.get("settlements", ()))
        return await super()._call(kind, path, args)


async def chat(request: Request) -> JSONResponse:
    await request.body()
    report_usage(request, model="gpt-4o-mini", tokens=40, cost=0.0001)
    return JSONResponse({"reply": "hello"})


def rules(unit: Literal["requests", "tokens"]) -> list[Rule]:
    limit = FixedWindow(rate=HUGE, period=HOUR)
    return [
        Rule("ipAI", limit, key="ip", path="/api/ai", unit=unit),
        Rule("globalAI", FixedWindow(rate=HUGE, period=MINUTE), path="/api/ai", unit=unit),
    ]


def app(store: ConvexStore, unit: Literal["requests", "tokens"]) -> Starlette:
    settings = GuardSettings(
        store=store,
        rules=rules(unit),
        bot_detection=False,
        key_routes=(),
        store_fallback=False,
        timeout=10,
    )
    served = Starlette(routes=[Route(PATH, chat, methods=["POST"])])
    served.add_middleware(GuardMiddleware, settings=settings)
    return served


async def load(url: str, requests: int, connections: int) -> int:
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        queue = iter(range(requests))
        ok = 0

        async def worker() -> None:
            nonlocal ok
            for _ in queue:
                answer = await client.post(PATH, json=CHAT, headers={"User-Agent": BROWSER})
                ok += answer.status_code == 200

        await asyncio.gather(*(worker() for _ in range(connections)))
        return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args(argv)

    lines = [
        f"{args.requests} chat requests per route over {args.connections} connections; "
        "uvicorn in this process, the loopback Convex test server in Node",
        "",
        "| route limited by | answered | guard:check / request | logs:writeBatch / request "
        "| all calls / request | settlements written |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with running_server() as convex:
        for unit in ("requests", "tokens"):
            store = CountingConvexStore(convex.url, convex.admin_key, timeout=10)
            with serve(app(store, unit)) as url:
                answered = asyncio.run(load(url, args.requests, args.connections))
            n = max(answered, 1)
            calls = store.calls
            lines.append(
                f"| {unit} | {answered} | {calls['guard:check'] / n:.3f} | "
                f"{calls['logs:writeBatch'] / n:.3f} | {sum(calls.values()) / n:.3f} | "
                f"{store.settlements} |"
            )
    lines += [
        "",
        "Every request is logged (its row rides in the writer's batches either way). The "
        "per-client rule makes one guard:check per request on both routes; the global token "
        "rule is decided in that same mutation (settled limits are exact, never leased).",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
