"""The example gateway's upstream forwarding, its failure mode, and the demo's key."""

from __future__ import annotations

import asyncio
import socket

import httpx
from examples.demo import create_demo_key, instructions
from examples.gateway import create_app
from examples.responder import Upstream, count_tokens, embed
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from convex_guard import ApiKeys, MemoryStore

from .conftest import serve
from .e2e_checks import BROWSER, CHAT, settings_for


def fake_upstream() -> Starlette:
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        assert request.headers["authorization"] == "Bearer upstream-secret"
        return JSONResponse(
            {
                "model": body["model"] + "-2025",
                "choices": [{"message": {"role": "assistant", "content": "from upstream"}}],
                "usage": {"total_tokens": 77},
            }
        )

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("not json", status_code=200)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/bad/chat/completions", broken, methods=["POST"]),
        ]
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_forwards_to_the_upstream_and_reports_its_usage() -> None:
    store = MemoryStore()
    with serve(fake_upstream()) as upstream:
        target = Upstream(upstream.url + "/v1", "upstream-secret", timeout=5)
        app = create_app(settings_for(store), upstream=target)
        with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
            ok = c.post("/api/ai/groq/chat", json=CHAT, headers={"user-agent": BROWSER})
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == "from upstream"
    (row,) = store.ai_logs
    assert (row.model, row.tokens_used, row.success) == ("gpt-4o-mini-2025", 77, True)
    assert "upstream-secret" not in repr(target)


def test_upstream_failures_are_clean_502_problems() -> None:
    store = MemoryStore()
    with serve(fake_upstream()) as upstream:
        targets = [
            Upstream(f"http://127.0.0.1:{closed_port()}", None, timeout=2),
            Upstream(upstream.url + "/bad", None, timeout=2),
        ]
        for target in targets:
            app = create_app(settings_for(store), upstream=target)
            with serve(app, proxy_headers=False) as server:
                failed = httpx.post(server.url + "/api/ai/openai/chat", json=CHAT)
            assert failed.status_code == 502
            assert failed.headers["content-type"] == "application/problem+json"
    assert [(r.success, r.error, r.model) for r in store.ai_logs] == [
        (False, "http_502", "gpt-4o-mini")
    ] * 2


def test_local_responder_is_deterministic() -> None:
    assert embed("hello") == embed("hello") != embed("hello!")
    assert abs(sum(v * v for v in embed("x")) - 1) < 1e-12 and len(embed("x")) == 64
    assert (
        count_tokens("Hello, world! It's 2 o'clock.") == 12
    )  # Hello , world ! It ' s 2 o ' clock .


def test_demo_key_works_in_the_same_store() -> None:
    store = MemoryStore()
    key = asyncio.run(create_demo_key(store))
    assert asyncio.run(ApiKeys(store).verify(key, kind="embedding")).ok
    text = instructions(key, port=8000)
    assert text.count("curl ") == 4 and key in text and "GPTBot/1.2" in text
    assert "/api/ai/perplexity/chat" in text
