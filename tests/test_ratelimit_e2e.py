"""RateLimitMiddleware end to end: a real uvicorn server and a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from convex_guard import (
    HOUR,
    MINUTE,
    CheckResult,
    FixedWindow,
    LimitRequest,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    Store,
    StoreError,
    TokenBucket,
)
from convex_guard.core.problem import QUOTA_EXCEEDED
from convex_guard.middleware.rules import FailPolicy

from .conftest import serve


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def echo_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("open")
    await websocket.close()


def make_app(store: Store, rules: Sequence[Rule], timeout: float = 0.5) -> Starlette:
    app = Starlette(
        routes=[
            Route("/api/ai/{provider}/chat", hello, methods=["GET", "POST"]),
            Route("/health", hello),
            WebSocketRoute("/ws", echo_ws),
        ]
    )
    app.add_middleware(
        RateLimitMiddleware,
        store=store,
        rules=rules,
        timeout=timeout,
    )
    return app


def test_limit_then_429_with_ietf_headers_and_problem_body() -> None:
    store = MemoryStore()
    rules = [
        Rule("ipAIRequests", FixedWindow(rate=3, period=HOUR), key="ip", path="/api/ai"),
        Rule(
            "perUser",
            TokenBucket(rate=100, period=HOUR),
            key=lambda r: r.headers.get("x-user"),
            path="/api/ai",
        ),
    ]
    with serve(make_app(store, rules)) as server, httpx.Client(base_url=server.url) as client:
        for expected_remaining in (2, 1, 0):
            response = client.post("/api/ai/openai/chat", headers={"x-user": "ann"})
            assert response.status_code == 200
            assert response.headers["RateLimit-Policy"] == (
                '"ipAIRequests";q=3;w=3600, "perUser";q=100;w=3600'
            )
            ip_item = response.headers["RateLimit"].split(", ")[0]
            assert ip_item.startswith(f'"ipAIRequests";r={expected_remaining};t=')
            assert 0 < int(ip_item.rsplit("t=", 1)[1]) <= 3600
        denied = client.post("/api/ai/openai/chat", headers={"x-user": "ann"})
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        retry = int(denied.headers["Retry-After"])
        assert 1 <= retry <= 3600
        assert denied.headers["RateLimit"].startswith('"ipAIRequests";r=0;t=')
        body = denied.json()
        assert body["type"] == QUOTA_EXCEEDED
        assert body["status"] == 429
        assert body["violated-policies"] == ["ipAIRequests"]
        # The denied request consumed nothing from the user's other quota.
        assert client.get("/health").status_code == 200
        assert "RateLimit" not in client.get("/health").headers  # unlimited route
    user_state = asyncio.run(store.peek("perUser", rules[1].config, key="ann"))
    assert user_state.remaining == pytest.approx(97, abs=0.1)


def test_a_different_key_is_unaffected() -> None:
    store = MemoryStore()
    rules = [Rule("perUser", FixedWindow(rate=1, period=HOUR), key=lambda r: r.headers["x-user"])]
    with serve(make_app(store, rules)) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/health", headers={"x-user": "a"}).status_code == 200
        assert client.get("/health", headers={"x-user": "a"}).status_code == 429
        assert client.get("/health", headers={"x-user": "b"}).status_code == 200


def test_websocket_handshakes_are_limited_and_lifespan_passes_through() -> None:
    store = MemoryStore()
    rules = [Rule("everything", FixedWindow(rate=1, period=HOUR))]
    with serve(make_app(store, rules)) as server:  # the lifespan passes to the app
        import websockets.exceptions as ws_errors
        import websockets.sync.client as ws_client

        with ws_client.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            assert ws.recv() == "open"
        for _ in range(2):  # a handshake is a request: the limit of 1 applies to it
            with pytest.raises(ws_errors.InvalidStatus) as refused:
                ws_client.connect(f"ws://127.0.0.1:{server.port}/ws")
            assert refused.value.response.status_code == 429


class BrokenStore(MemoryStore):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    async def check(self, limits: Sequence[LimitRequest], *, bot: object = None) -> CheckResult:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        raise StoreError("store is down")


@pytest.mark.parametrize("mode", ["raise", "hang"])
@pytest.mark.parametrize("fail", ["open", "closed"])
def test_store_failure_follows_fail_policy_within_timeout(
    mode: str, fail: FailPolicy, caplog: pytest.LogCaptureFixture
) -> None:
    rules = [Rule("r", FixedWindow(rate=5, period=HOUR), path="/api", fail=fail)]
    app = make_app(BrokenStore(mode), rules, timeout=0.2)
    with (
        caplog.at_level(logging.WARNING, logger="convex_guard"),
        serve(app) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        started = time.monotonic()
        response = client.post("/api/ai/openai/chat")
        elapsed = time.monotonic() - started
    # Bounded by the timeout (plus generous slack for a loaded machine), never a hang.
    assert elapsed < 2.0
    if fail == "open":
        assert response.status_code == 200 and response.text == "hello"
    else:
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["Retry-After"] == "1"
    assert "Rate-limit store unavailable" in caplog.text


def test_failing_key_function_is_logged_and_follows_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(request: Request) -> str:
        raise RuntimeError("bug in app")

    rules = [
        Rule("open", FixedWindow(rate=5, period=HOUR), key=broken),
        Rule("closed", FixedWindow(rate=5, period=HOUR), key=broken, path="/api", fail="closed"),
    ]
    with serve(make_app(MemoryStore(), rules)) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200
        assert c.post("/api/ai/x/chat").status_code == 503
    assert "key or cost function failed" in caplog.text


@pytest.mark.slow
def test_concurrent_requests_admit_exactly_the_limit() -> None:
    store = MemoryStore()
    rules = [Rule("burst", FixedWindow(rate=50, period=HOUR), path="/api")]

    async def fire(url: str) -> list[int]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/api/ai/openai/chat") for _ in range(200))
            )
        return [r.status_code for r in responses]

    with serve(make_app(store, rules)) as server:
        codes = asyncio.run(fire(server.url))
    assert codes.count(200) == 50
    assert codes.count(429) == 150


def test_cost_function_over_capacity_is_a_clean_429() -> None:
    rules = [
        Rule(
            "tokens",
            TokenBucket(rate=10, period=MINUTE),
            count=lambda r: float(r.headers.get("x-cost", "1")),
        )
    ]
    with serve(make_app(MemoryStore(), rules)) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/health", headers={"x-cost": "4"}).status_code == 200
        too_big = c.get("/health", headers={"x-cost": "11"})
        assert too_big.status_code == 429
        assert json.loads(too_big.text)["violated-policies"] == ["tokens"]
        # 4 of 10 used: 6 remain.
        assert c.get("/health", headers={"x-cost": "6"}).status_code == 200
        assert c.get("/health", headers={"x-cost": "1"}).status_code == 429
