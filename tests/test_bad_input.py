"""Bad input through the whole stack: whatever bytes a client sends, the guarded example app
never answers 500, convex-guard never logs a traceback, and what it stores stays bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
from examples.gateway import create_app
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from convex_guard import (
    MINUTE,
    ApiKeys,
    GuardMiddleware,
    GuardSettings,
    MemoryStore,
    Rule,
    TokenBucket,
)

from .conftest import serve
from .fault_tools import BROWSER, raw_reply
from .strategies import (
    CHAT_BODY,
    asgi_scope,
    body_strategy,
    call,
    client_strategy,
    guard_of,
    headers_strategy,
    method_strategy,
    on_one_app,
    path_strategy,
    root_path_strategy,
)

#: The longest string the guard may store from a client (`core.headers.MAX_STORED`), with
#: room for a prefix the guard adds itself.
MAX_STORED = 512
STORED_SLACK = 64


def guarded_app() -> tuple[Any, MemoryStore]:
    store = MemoryStore()
    rules = [
        Rule("tiny", TokenBucket(rate=2, period=MINUTE, capacity=2), key="ip", path="/api/ai"),
        Rule("fp", TokenBucket(rate=5, period=MINUTE), key="fingerprint", path="/api/ai"),
    ]
    settings_ = GuardSettings(store=store, rules=rules, writer_interval=0.05)
    return create_app(settings_, upstream=None), store


def guard_problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.exc_info is not None or r.levelno >= logging.ERROR
    ]


def check_stored(store: MemoryStore) -> None:
    limit = MAX_STORED + STORED_SLACK
    for row in store.ai_logs:
        for value in (row.provider, row.model, row.fingerprint, row.ip, row.error, row.user_id):
            assert value is None or len(value) <= limit, row
    for failure in store.auth_failures:
        assert len(failure.user_agent or "") <= limit and len(failure.ip or "") <= limit
    for event in asyncio.run(store.bot_events(since=-math.inf, limit=10_000)):
        assert len(event.user_agent) <= limit and len(event.ip) <= limit
        assert len(event.fingerprint) <= limit
        for meta in (event.metadata or {}).values():
            assert not isinstance(meta, str) or len(meta) <= limit


@pytest.fixture(scope="module")
def loop_and_app() -> Iterator[tuple[asyncio.Runner, Any, MemoryStore]]:
    """One event loop and one guarded app for every example, as under a real server."""
    app, store = guarded_app()
    with asyncio.Runner() as runner:
        yield runner, app, store


@pytest.mark.slow
@on_one_app(300)
@given(
    method=method_strategy,
    path=path_strategy,
    headers=headers_strategy,
    client=client_strategy,
    body=body_strategy,
    root_path=root_path_strategy,
)
def test_arbitrary_requests_never_500(
    caplog: pytest.LogCaptureFixture,
    loop_and_app: tuple[asyncio.Runner, Any, MemoryStore],
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    client: object,
    body: bytes,
    root_path: str,
) -> None:
    """Any method (HEAD among them), path, headers and peer, at the root or under a prefix."""
    caplog.set_level(logging.WARNING)
    caplog.clear()
    runner, app, store = loop_and_app

    async def run() -> int:
        status, _ = await call(app, method, path, headers, client, body, root_path)
        await guard_of(app).writer.flush()
        return status

    status = runner.run(run())
    assert status < 500, (status, method, path[:80], headers[:3])
    assert not guard_problems(caplog)
    check_stored(store)


async def realtime(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


@pytest.fixture(scope="module")
def loop_and_ws_app() -> Iterator[tuple[asyncio.Runner, Any, MemoryStore]]:
    """The guarded gateway's settings around WebSocket routes under the guarded paths."""
    store = MemoryStore()
    rules = [
        Rule("tiny", TokenBucket(rate=2, period=MINUTE, capacity=2), key="ip", path="/api/ai"),
        Rule("fp", TokenBucket(rate=5, period=MINUTE), key="fingerprint", path="/api/ai"),
    ]
    routes = [WebSocketRoute(p, realtime) for p in ("/api/ai/{provider}/chat", "/api/embeddings")]
    app = GuardMiddleware(
        Starlette(routes=routes), GuardSettings(store=store, rules=rules, writer_interval=0.05)
    )
    with asyncio.Runner() as runner:
        yield runner, app, store


WS_FIRST = {"websocket.accept", "websocket.close", "websocket.http.response.start"}


@pytest.mark.slow
@on_one_app(200)
@given(
    path=path_strategy,
    headers=headers_strategy,
    client=client_strategy,
    root_path=root_path_strategy,
    extension=st.booleans(),
)
def test_arbitrary_websocket_handshakes_never_500(
    caplog: pytest.LogCaptureFixture,
    loop_and_ws_app: tuple[asyncio.Runner, Any, MemoryStore],
    path: str,
    headers: list[tuple[bytes, bytes]],
    client: object,
    root_path: str,
    extension: bool,
) -> None:
    """Any handshake is accepted, closed or answered below 500, before accept if refused:
    through the HTTP-denial extension only where the server offers it."""
    caplog.set_level(logging.WARNING)
    caplog.clear()
    runner, app, store = loop_and_ws_app
    scope = asgi_scope("websocket", path, headers, client, root_path)
    scope["subprotocols"] = []
    if extension:
        scope["extensions"] = {"websocket.http.response": {}}
    sent: list[Message] = []
    incoming: list[Message] = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        return incoming.pop() if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "websocket.accept":
            incoming.append({"type": "websocket.receive", "text": "ping"})

    async def run() -> None:
        await app(scope, receive, send)
        await app.writer.flush()

    runner.run(run())
    assert sent and sent[0]["type"] in WS_FIRST, sent[:2]
    if sent[0]["type"] == "websocket.http.response.start":
        assert extension and sent[0]["status"] < 500, sent[0]
        assert sent[1]["type"] == "websocket.http.response.body"
    elif sent[0]["type"] == "websocket.accept":
        assert sent[1] == {"type": "websocket.send", "text": "ping"}
    assert not guard_problems(caplog)
    check_stored(store)


def test_duplicated_and_oversized_credentials_are_clean_401s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    store = MemoryStore()
    key = asyncio.run(ApiKeys(store).create("t", kind="embedding")).key
    app = create_app(GuardSettings(store=store, writer_interval=0.05), upstream=None)
    embed = json.dumps({"input": ["a"]}).encode()
    cases: list[list[tuple[bytes, bytes]]] = [
        [(b"authorization", f"Bearer {key}".encode())] * 2,
        [(b"authorization", f"Bearer {key}".encode()), (b"x-api-key", b"cg_other")],
        [(b"authorization", b"Bearer " + key.encode() + b"\xff")],
        [(b"authorization", b"Bearer " + key.encode() * 100)],
        [(b"x-api-key", b"")],
        [(b"authorization", b"Bearer")],
        [(b"authorization", b"Token " + key.encode())],
    ]

    async def run() -> list[int]:
        out = []
        for headers in cases:
            status, sent = await call(
                app,
                "POST",
                "/api/embeddings",
                [(b"user-agent", BROWSER.encode()), *headers],
                ("203.0.113.9", 1),
                embed,
            )
            out.append(status)
            text = b"".join(m.get("body", b"") for m in sent)
            assert key.encode() not in text
        return out

    statuses = asyncio.run(run())
    assert statuses == [401] * len(cases), statuses
    assert not guard_problems(caplog)
    assert all(key not in r.getMessage() for r in caplog.records)


RAW_REQUESTS = [
    b"GET /api/ai/openai/chat HTTP/1.1\r\nHost: x\r\nUser-Agent: \xff\xfe\xfd"
    + b"\x80" * 4000
    + b"\r\n\r\n",
    b"POST /api/ai/openai/chat HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: ::::, 300.1.1.1, zz\r\n"
    b'Forwarded: for="garbage\r\nContent-Length: 2\r\n\r\n{}',
    b"POST /api/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xe2\x82\r\n"
    b"Authorization: Bearer cg_x\r\nContent-Length: 0\r\n\r\n",
    b"FOO /api/ai/openai/chat HTTP/1.1\r\nHost: x\r\nUser-Agent: GPTBot\r\n"
    b"User-Agent: Chrome\r\n\r\n",
    b"GET /" + b"a/" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/ai/%ff%fe/chat?x=%00 HTTP/1.1\r\nHost: x\r\nX-API-Key: " + b"k" * 3000 + b"\r\n\r\n",
]


def raw_status(port: int, request: bytes) -> int:
    data = raw_reply(port, request, until=b"\r\n", timeout=10)
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    return int(data.split()[1])


def test_raw_sockets_through_uvicorn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    app, store = guarded_app()
    with serve(app, proxy_headers=False) as server:
        statuses = [raw_status(server.port, request) for request in RAW_REQUESTS]
    assert all(s < 500 for s in statuses), statuses
    assert not guard_problems(caplog)
    check_stored(store)
    assert store.ai_logs, "the guarded requests were logged"


def test_huge_non_utf8_values_are_stored_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    app, store = guarded_app()
    huge_bot = b"GPTBot/1.2 " + b"\xff\xfe" * 20_000
    huge_path = "/api/ai/openai/chat/" + "\u00e9" * 30_000

    async def run() -> list[int]:
        statuses = []
        for path, ua in ((huge_path, huge_bot), ("/api/ai/openai/chat", huge_bot)):
            status, _ = await call(app, "POST", path, [(b"user-agent", ua)], ("::1", 1), CHAT_BODY)
            statuses.append(status)
        status, _ = await call(
            app,
            "POST",
            "/api/embeddings",
            [(b"user-agent", b"\x80" * 50_000), (b"x-forwarded-for", b"\xff" * 50_000)],
            None,
            b"{}",
        )
        statuses.append(status)
        await guard_of(app).writer.flush()
        return statuses

    with asyncio.Runner() as runner:
        assert runner.run(run()) == [403, 403, 401]
    events = asyncio.run(store.bot_events(since=-math.inf))
    assert len(events) == 2 and all(len(e.user_agent) <= MAX_STORED for e in events)
    assert len(store.ai_logs) == 2 and len(store.auth_failures) == 1
    assert store.auth_failures[0].ip == "unknown"  # no client in the scope
    check_stored(store)
    assert not guard_problems(caplog)
