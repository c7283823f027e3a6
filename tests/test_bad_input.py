"""Bad input through the whole stack: whatever bytes a client sends, the guarded example app
never answers 500, convex-guard never logs a traceback, and what it stores stays bounded."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from examples.gateway import create_app
from hypothesis import HealthCheck, given, settings
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
from .fault_tools import BROWSER

#: The longest string the guard may store from a client (`_headers.MAX_STORED`), with room
#: for a prefix the guard adds itself.
MAX_STORED = 512
STORED_SLACK = 64

NAMES = [
    b"user-agent",
    b"x-forwarded-for",
    b"forwarded",
    b"x-real-ip",
    b"authorization",
    b"x-api-key",
    b"accept-language",
    b"accept-encoding",
    b"content-type",
    b"content-length",
    b"host",
    b"cookie",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT"]
PATHS = ["/api/ai/openai/chat", "/api/ai/perplexity/chat", "/api/embeddings", "/health", "/"]

header_value = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=2000, max_size=20_000),  # huge
    st.sampled_from(
        [
            b"Bearer",
            b"Bearer ",
            b"Bearer  cg_" + b"\xff" * 40,
            b"Basic Zm9vOmJhcg==",
            b"bearer cg_live_" + b"A" * 5000,
            b"\xc3\x28\xa0\xa1 GPTBot \xe2\x82",
            b'for="[::1]:80";proto=https, for=unknown, for=_hidden',
            b"999.999.1.1, ::ffff:1.2.3.4, fe80::1%eth0, , ,",
            b"Mozilla/5.0 (compatible; Googlebot/2.1)",
            b"\x00\r\n\t",
        ]
    ),
)
headers_strategy = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=40).map(bytes.lower)),
        header_value,
    ),
    max_size=12,
)
path_strategy = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(PATHS).map(lambda p: p + "/" * 3 + "%00../" * 10),
    st.text(max_size=300).map(lambda t: "/" + t),
    st.text(min_size=5000, max_size=20_000, alphabet="/a%.\u00e9\ud7ff").map(lambda t: "/" + t),
)
method_strategy = st.one_of(st.sampled_from(METHODS), st.text(min_size=1, max_size=50))
client_strategy = st.one_of(
    st.none(),
    st.just("missing"),
    st.tuples(
        st.sampled_from(["127.0.0.1", "::1", "2001:db8::1", "garbage", "", "1.2.3.4.5"]),
        st.integers(0, 65535),
    ),
)
#: A server's `--root-path` or a Mount's prefix; the path the client asked for follows it.
root_path_strategy = st.one_of(
    st.sampled_from(["", "/gw", "/v1", "/gw/v1", "/api"]),
    st.text(max_size=20).map(lambda t: "/" + t),
)
body_strategy = st.one_of(
    st.just(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()),
    st.binary(max_size=200),
)


def guarded_app() -> tuple[Any, MemoryStore]:
    store = MemoryStore()
    rules = [
        Rule("tiny", TokenBucket(rate=2, period=MINUTE, capacity=2), key="ip", path="/api/ai"),
        Rule("fp", TokenBucket(rate=5, period=MINUTE), key="fingerprint", path="/api/ai"),
    ]
    settings_ = GuardSettings(store=store, rules=rules, writer_interval=0.05)
    return create_app(settings_, upstream=None), store


def guard_of(app: Any) -> GuardMiddleware:
    """The example app's GuardMiddleware (Starlette builds the stack on the first call)."""
    node = app.middleware_stack
    while node is not None and not isinstance(node, GuardMiddleware):
        node = getattr(node, "app", None)
    assert isinstance(node, GuardMiddleware)
    return node


async def call(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    client: object,
    body: bytes,
    root_path: str = "",
) -> tuple[int, list[Message]]:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode("utf-8", "surrogatepass"),
        "root_path": root_path,
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    if client != "missing":
        scope["client"] = client
    sent: list[Message] = []
    chunks = [body]

    async def receive() -> Message:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        await asyncio.sleep(3600)  # the client never disconnects during the call
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return starts[0]["status"], sent


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
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
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
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
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
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": root_path + path,
        "raw_path": (root_path + path).encode("utf-8", "surrogatepass"),
        "root_path": root_path,
        "query_string": b"",
        "headers": headers,
        "server": ("127.0.0.1", 8000),
        "subprotocols": [],
        "state": {},
    }
    if client != "missing":
        scope["client"] = client
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
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
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
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def run() -> list[int]:
        statuses = []
        for path, ua in ((huge_path, huge_bot), ("/api/ai/openai/chat", huge_bot)):
            status, _ = await call(app, "POST", path, [(b"user-agent", ua)], ("::1", 1), chat)
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
