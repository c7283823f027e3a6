"""Request validation: body size while it streams (413), media types (415), JSON shape (400)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from convex_guard import HOUR, MINUTE, ConvexStore, GuardMiddleware, LogBatch, MemoryStore
from convex_guard.core.bodycheck import BodyProblem, check_json, declared_length
from convex_guard.core.errors import ConfigurationError
from convex_guard.middleware.context import STATE_KEY, GuardContext
from convex_guard.middleware.validation import (
    BodyRule,
    RequestValidationMiddleware,
    default_body_rules,
)
from convex_guard.stores.base import REFUSAL_REASONS, refusal_reason
from convex_guard.stores.testing import ai_row

from .conftest import serve

LIMIT = 64 * 1024
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
RULES = (
    BodyRule("/json", max_bytes=LIMIT, max_depth=8),
    BodyRule("/upload", max_bytes=LIMIT, content_types=("application/octet-stream",), json=False),
)


# -- the JSON check -----------------------------------------------------------------------------


def reference(body: bytes, depth: int) -> bool:
    """What `check_json` must say: strict JSON (no NaN), UTF-8, nested at most `depth`."""

    def nesting(value: Any) -> int:
        if isinstance(value, list):
            return 1 + max((nesting(v) for v in value), default=0)
        if isinstance(value, dict):
            return 1 + max((nesting(v) for v in value.values()), default=0)
        return 0

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        value = json.loads(body.decode("utf-8"), parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return nesting(value) <= depth


def accepted(body: bytes, depth: int = 8) -> bool:
    try:
        check_json(body, depth)
    except BodyProblem:
        return False
    return True


@pytest.mark.parametrize(
    "body",
    [
        b"[]", b"{}", b'{"a":[1,{"b":null}],"c":"x"}', b'"\\u00e9"', b"-0.5e-3", b"[0,]",
        b'["]', b'{"a":1,}', b"01", b"[1 2]", b"{1:2}", b'"\\q"', b'"\x01"', b"NaN",
        b"[Infinity]", b"", b" ", b"\xef\xbb\xbf[]", b"[\xff]", b'{"a":[]}{}', b'["a\\"]"]',
        b"[" * 9 + b"]" * 9, b"[" * 8 + b"]" * 8, b"[" * 100_000, b'"' + b'\\"' * 5000,
    ],
)  # fmt: skip
def test_the_json_check_agrees_with_a_strict_parser(body: bytes) -> None:
    assert accepted(body) == reference(body, 8)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(value=json_values, indent=st.sampled_from([None, 1]), cut=st.integers(0, 40))
def test_the_json_check_on_json_and_on_its_damaged_copies(
    value: Any, indent: int | None, cut: int
) -> None:
    body = json.dumps(value, indent=indent, ensure_ascii=False).encode()
    assert accepted(body, 6) == reference(body, 6)
    damaged = body[: len(body) - cut] if cut < len(body) else body[1:]
    assert accepted(damaged, 6) == reference(damaged, 6)


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=64) | st.text('[]{}",:\\ 0a', max_size=40).map(str.encode))
def test_the_json_check_on_arbitrary_bytes(body: bytes) -> None:
    assert accepted(body, 4) == reference(body, 4)


def test_a_hostile_json_body_costs_no_more_than_its_size() -> None:
    # A megabyte of each shape an attacker would pick: each answered in a few milliseconds.
    hostile = [
        b"[" + b"[]," * 350_000 + b"[]]",  # a list per 3 bytes: refused by density
        b"[" * 1_000_000,  # unbalanced
        b"[" + (b"[" * 30 + b"]" * 30 + b",") * 17_000 + b"0]",  # deep and wide
        b'"' + b'\\"' * 500_000,  # an unterminated string of escapes
    ]
    for body in hostile:
        started = time.perf_counter()
        assert not accepted(body, 32)
        assert time.perf_counter() - started < 0.5, body[:40]


def test_declared_length() -> None:
    assert declared_length([]) is None
    assert declared_length([b"12"]) == 12
    assert declared_length([b"12", b"12, 12"]) == 12
    for bad in ([b"-1"], [b"1 2"], [b"12", b"13"], [b"+5"], [b"1" * 21], [b""]):
        with pytest.raises(BodyProblem):
            declared_length(bad)


def test_rules_are_checked_at_construction() -> None:
    for bad in (
        {"max_bytes": -1},
        {"max_bytes": 1.5},
        {"max_depth": 0},
        {"content_types": "application/json"},
        {"content_types": ("json",)},
        {"content_types": ()},
        {"methods": "POST"},
    ):
        with pytest.raises(ConfigurationError):
            BodyRule("/x", **bad)
    with pytest.raises(ConfigurationError):
        BodyRule("x")
    with pytest.raises(ConfigurationError):
        RequestValidationMiddleware(echo_app(), rules=())
    assert isinstance(
        GuardMiddleware(echo_app(), store=MemoryStore(), body_rules=RULES[0]).error,
        ConfigurationError,
    )
    assert [r.max_bytes for r in default_body_rules()][:2] == [8 * 2**20] * 2


# -- in-process: arbitrary bodies, chunkings and declared lengths -------------------------------


def echo_app() -> Starlette:
    async def whole(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    async def streamed(request: Request) -> Response:
        parts = [chunk async for chunk in request.stream()]
        return Response(b"".join(parts), media_type="application/octet-stream")

    async def get(request: Request) -> Response:
        return PlainTextResponse("got")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("open")
        await websocket.close()

    return Starlette(
        routes=[
            Route("/json", whole, methods=["POST"]),
            Route("/json", get, methods=["GET"]),
            Route("/upload", streamed, methods=["POST"]),
            Route("/elsewhere", whole, methods=["POST"]),
            WebSocketRoute("/json", ws),
        ]
    )


class Client:
    """One in-process request: `pulled` is what the guard and app took from the client."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.pulled = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.chunks:
            chunk = self.chunks.pop(0)
            self.pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, self.sent
        return int(starts[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def http_scope(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("203.0.113.9", 40000),
        "server": ("testserver", 80),
    }


STANDALONE = RequestValidationMiddleware(echo_app(), rules=RULES)
#: The same checks as one step of the whole guard (its runner hands the app the meter).
GUARDED = GuardMiddleware(
    echo_app(), store=MemoryStore(), rules=(), key_routes=(), bot_detection=False, body_rules=RULES
)


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points)] or [b""]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip
@given(
    size=st.sampled_from([0, 1, 100, LIMIT - 1, LIMIT, LIMIT + 1, 3 * LIMIT]),
    seed=st.binary(min_size=1, max_size=16),
    as_json=st.booleans(),
    cuts=st.lists(st.integers(0, 4 * LIMIT), max_size=6),
    declared=st.sampled_from(["correct", "small", "large", "absent", "zero"]),
    route=st.sampled_from(["/json", "/upload"]),
    guard=st.sampled_from([STANDALONE, GUARDED]),
)
def test_any_body_chunking_and_declared_length(
    size: int,
    seed: bytes,
    as_json: bool,
    cuts: list[int],
    declared: str,
    route: str,
    guard: Any,
) -> None:
    if as_json and size >= 2:
        body = b'"' + (seed * size)[: size - 2].replace(b'"', b"a").replace(b"\\", b"b") + b'"'
    else:
        body = (seed * size)[:size]
    chunks = chunked(body, cuts)
    length = {"correct": len(body), "small": max(0, len(body) - 7), "large": len(body) + 7}
    length["zero"] = 0  # declared empty, whatever comes
    headers = [
        (
            b"content-type",
            b"application/octet-stream" if route == "/upload" else b"application/json",
        )
    ]
    if declared != "absent":
        headers.append((b"content-length", str(length[declared]).encode()))
    client = Client(chunks)
    scope = http_scope(route, headers)
    asyncio.run(guard(scope, client.receive, client.send))

    status = client.status
    ctx: GuardContext = scope["state"][STATE_KEY]
    assert status != 500
    largest = max(len(c) for c in chunks)
    # Never more than the limit and the chunk that passed it; nothing when declared too large.
    assert client.pulled <= LIMIT + largest
    assert ctx.body is None or len(ctx.body) <= LIMIT
    if declared != "absent" and length[declared] > LIMIT:
        assert status == 413 and client.pulled == 0
    if status == 200:
        assert client.body == body  # byte for byte
        assert len(body) <= LIMIT and ctx.rejected is None
    else:
        assert ctx.rejected is not None and ctx.rejected.startswith("invalid_body:")
        if len(body) > LIMIT:
            assert status == 413
    if (
        declared == "correct"
        and len(body) <= LIMIT
        and (route == "/upload" or reference(body, 8) or not body)
    ):
        assert status == 200


def test_get_head_websocket_and_unmatched_routes_pass() -> None:
    for method in ("GET", "HEAD"):
        client = Client([b""])
        asyncio.run(STANDALONE(http_scope("/json", [], method), client.receive, client.send))
        assert client.status == 200
    client = Client([b"not json"])
    asyncio.run(STANDALONE(http_scope("/elsewhere", []), client.receive, client.send))
    assert client.status == 200 and client.body == b"not json"

    sent: list[Message] = []
    incoming = [{"type": "websocket.connect"}]

    async def ws_receive() -> Message:
        return incoming.pop() if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def ws_send(message: Message) -> None:
        sent.append(message)

    scope = {**http_scope("/json", []), "type": "websocket", "scheme": "ws", "subprotocols": []}
    del scope["method"]
    asyncio.run(STANDALONE(scope, ws_receive, ws_send))
    assert [m["type"] for m in sent][:2] == ["websocket.accept", "websocket.send"]


def test_refusals_before_reading_anything() -> None:
    cases = [
        ([(b"content-length", b"999999999")], 413, "invalid_body:too_large"),
        ([(b"content-length", b"5"), (b"content-length", b"6")], 400, "invalid_body:length"),
        ([(b"content-type", b"text/plain"), (b"content-length", b"2")], 415, "invalid_body:"
         "content_type"),
    ]  # fmt: skip
    for headers, status, rejected in cases:
        client = Client([b"{}"])
        scope = http_scope("/json", headers)
        asyncio.run(STANDALONE(scope, client.receive, client.send))
        assert (client.status, scope["state"][STATE_KEY].rejected) == (status, rejected)
        assert client.pulled == 0
        start = next(m for m in client.sent if m["type"] == "http.response.start")
        assert (b"connection", b"close") in start["headers"]
        assert (b"content-type", b"application/problem+json") in start["headers"]
    problem_body = json.loads(client.body)
    assert problem_body["accepted-types"] == ["application/json"]
    assert (b"accept-post", b"application/json") in start["headers"]


def test_the_overflow_latch_answers_413_whatever_the_app_does_next() -> None:
    """The app reading a streamed body past the limit: told the client went, its answer to
    that (a 400 of its own, as FastAPI sends) dropped, and the client gets the 413."""
    seen: list[int] = []

    async def own_answer(scope: Scope, receive: Receive, send: Send) -> None:
        got = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            got += len(message["body"])
        seen.append(got)
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"error parsing the body"})

    async def started_first(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.body", "body": b"partial"})

    headers = [(b"content-type", b"application/octet-stream")]
    chunks = [b"x" * 1000] * (LIMIT // 1000 + 5)
    guard = RequestValidationMiddleware(own_answer, rules=RULES)
    client = Client(chunks)
    asyncio.run(guard(http_scope("/upload", headers), client.receive, client.send))
    assert client.status == 413 and json.loads(client.body)["max-bytes"] == LIMIT
    assert seen == [LIMIT // 1000 * 1000]  # all but the chunk that passed the limit
    assert client.pulled == seen[0] + 1000

    # A response the app started first is the app's: it ends it, the request log says why.
    client = Client(chunks)
    scope = http_scope("/upload", headers)
    asyncio.run(
        RequestValidationMiddleware(started_first, rules=RULES)(scope, client.receive, client.send)
    )
    assert client.status == 200 and client.body == b"partial"
    assert scope["state"][STATE_KEY].rejected == "invalid_body:too_large"


# -- a real server and a real client ------------------------------------------------------------


class Source:
    """A request body of `total` bytes, made as the client sends it: `sent` is how much was."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total = total
        self.chunk = b"x" * chunk
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            self.sent += len(self.chunk)
            yield self.chunk


HUGE = 300 * 1024 * 1024


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[str, MemoryStore]]:
    store = MemoryStore()
    guard = GuardMiddleware(
        echo_app(),
        store=store,
        rules=(),
        key_routes=(),
        bot_detection=False,  # refusals escalate: tested on a server of their own
        ai_path="/",
        providers=["json", "upload", "elsewhere"],
        writer_interval=0.05,
        body_rules=RULES,
    )

    async def mounting(scope: Scope, receive: Receive, send: Send) -> None:
        """The guarded app also mounted under `/mounted`, as a `Mount` would hand it on."""
        if scope["type"] != "lifespan" and scope["path"].startswith("/mounted/"):
            scope = {**scope, "root_path": "/mounted"}
        await guard(scope, receive, send)

    with serve(mounting) as server:
        yield server.url, store


def test_a_300_mb_body_is_refused_without_being_read(guarded: tuple[str, MemoryStore]) -> None:
    url, _ = guarded
    with httpx.Client(base_url=url, timeout=30, headers={"user-agent": BROWSER}) as client:
        for path, kind, declare in (
            ("/json", "application/json", True),  # declared: refused before reading
            ("/json", "application/json", False),  # chunked: JSON read stops past the limit
            ("/upload", "application/octet-stream", False),  # chunked, streamed to the app
            ("/upload", "application/octet-stream", True),
        ):
            source = Source(HUGE)
            headers = {"content-type": kind}
            if declare:
                headers["content-length"] = str(HUGE)
            response = client.post(path, content=iter(source), headers=headers)
            assert response.status_code == 413, (path, declare, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["max-bytes"] == LIMIT
            # What the kernel's socket buffers hold, at most: not the 300 MB.
            assert source.sent < 32 * 1024 * 1024, (path, declare, source.sent)
        assert client.get("/json").text == "got"  # the server serves on


def test_valid_bodies_reach_the_app_byte_for_byte(guarded: tuple[str, MemoryStore]) -> None:
    url, _ = guarded
    body = json.dumps({"messages": [{"content": "é" * 5_000}]}).encode()
    raw = bytes(range(256)) * 200
    with httpx.Client(base_url=url, timeout=10, headers={"user-agent": BROWSER}) as client:
        sent = client.post("/json", content=body, headers={"content-type": "application/json"})
        streamed = client.post(
            "/upload", content=iter([raw[:1000], raw[1000:]]),
            headers={"content-type": "application/octet-stream"},
        )  # fmt: skip
        mounted = client.post(
            "/mounted/json", content=body, headers={"content-type": "application/json"}
        )
        deep = client.post("/json", content=b"[" * 9 + b"]" * 9)
        broken = client.post(
            "/mounted/json", content=b'{"a":', headers={"content-type": "application/json"}
        )
        wrong = client.post("/upload", content=b"x", headers={"content-type": "text/plain"})
        head = client.head("/json")
    assert sent.status_code == 200 and sent.content == body
    assert streamed.status_code == 200 and streamed.content == raw
    assert mounted.status_code == 200 and mounted.content == body  # matched without root_path
    assert deep.status_code == 400 and "nested more than 8" in deep.json()["detail"]
    assert (
        broken.status_code == 400 and broken.json()["detail"] == "The body is not well-formed JSON."
    )
    assert wrong.status_code == 415 and wrong.headers["accept-post"] == "application/octet-stream"
    assert head.status_code == 200


def test_a_websocket_on_a_validated_path_is_not_checked(guarded: tuple[str, MemoryStore]) -> None:
    from websockets.sync.client import connect

    url, _ = guarded
    with connect(url.replace("http", "ws") + "/json") as ws:
        assert ws.recv() == "open"


def raw_request(url: str, head: bytes, body: bytes, *, close: bool = False) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + body)
        if close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if close is False and b"\r\n\r\n" in answer:
                    break
        except TimeoutError:
            pass
        return answer


def test_a_content_length_lie_never_gets_a_500(guarded: tuple[str, MemoryStore]) -> None:
    url, _ = guarded
    head = (
        b"POST /json HTTP/1.1\r\nhost: x\r\nuser-agent: test\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
    )
    # Declares more than it sends, then goes: the request ends as a disconnect, nothing sent.
    assert raw_request(url, head % 1000, b'{"a":1}', close=True) == b""
    # Declares less than it sends: the body is the declared bytes, not JSON: 400.
    answer = raw_request(url, head % 5, b'{"a":1}' + b"x" * 100_000)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert b"500" not in answer.split(b"\r\n")[0]
    # A client that waits for `100 Continue` before sending never has to send at all.
    expecting = head.replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n")
    answer = raw_request(url, expecting % HUGE, b"")
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
    with httpx.Client(base_url=url) as client:
        assert client.post("/json", json={"a": 1}).status_code == 200


def test_refusals_are_logged_recorded_and_escalate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="convex_guard")
    store = MemoryStore()
    app = GuardMiddleware(
        echo_app(), store=store, rules=(), key_routes=(), ai_path="/", providers=["upload", "json"],
        writer_interval=0.02, body_rules=RULES, bot_verify=False,
    )  # fmt: skip
    googlebot = {"user-agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        # A search engine is recorded, not refused (the default policy): its first visit passes
        # (from loopback it would be a spoofed Googlebot, so address checks are off here).
        assert client.get("/json", headers=googlebot).status_code == 200
        for n in range(5):
            refused = client.post(
                "/upload",
                content=b"x",
                headers={"content-type": "text/plain", "user-agent": f"browser {n}"},
            )
            assert refused.status_code == 415
        time.sleep(0.3)  # the writer's interval
        # Five refusals and the visit: the client's sixth flagged request is challenged.
        challenged = client.get("/json", headers=googlebot)
    assert challenged.status_code == 429
    assert challenged.json()["type"].endswith("#abnormal-usage-detected")
    recorded = asyncio.run(store.bot_events(since=0))
    events = [e for e in recorded if e.detection_type == "suspicious_pattern"]
    assert len(events) == 5
    assert {(e.action, e.client_key) for e in events} == {("blocked", "127.0.0.1")}
    assert events[0].metadata == {"check": "invalid_body:content_type", "path": "/upload"}
    rows = [row for row in store.ai_logs if row.error == "invalid_body:content_type"]
    assert len(rows) == 5 and not any(row.success for row in rows)
    lines = [r.getMessage() for r in caplog.records if "Request body refused" in r.getMessage()]
    assert len(lines) == 5
    assert lines[0] == "Request body refused (content_type, 415): POST /upload from 127.0.0.1"


# -- the example gateway -------------------------------------------------------------------------


def test_the_gateway_refuses_a_huge_body_and_answers_valid_ones_as_before() -> None:
    from examples.gateway import create_app

    from .e2e_checks import CHAT, create_key, settings_for

    store = MemoryStore()
    key = create_key(store)
    checked = create_app(settings_for(store), upstream=None)
    unchecked = create_app(settings_for(MemoryStore(), body_rules=()), upstream=None)
    headers = {"user-agent": BROWSER, "content-type": "application/json"}
    answers = []
    for app in (checked, unchecked):
        with (
            serve(app, proxy_headers=False) as server,
            httpx.Client(base_url=server.url, headers=headers, timeout=30) as client,
        ):
            answers.append(client.post("/api/ai/openai/chat", json=CHAT).json())
            if app is checked:
                for declare in (True, False):
                    source = Source(HUGE)
                    extra = {"content-length": str(HUGE)} if declare else {}
                    huge = client.post("/api/ai/openai/chat", content=iter(source), headers=extra)
                    assert huge.status_code == 413 and huge.json()["max-bytes"] == 2**20
                    assert source.sent < 32 * 1024 * 1024
                # Embeddings: the key first, then 8 MiB.
                big = Source(9 * 2**20)
                over = client.post(
                    "/api/embeddings",
                    content=iter(big),
                    headers={"authorization": f"Bearer {key}"},
                )
                assert over.status_code == 413 and over.json()["max-bytes"] == 8 * 2**20
                plain = client.post(
                    "/api/ai/openai/chat",
                    content=json.dumps(CHAT),
                    headers={"content-type": "text/plain"},
                )
                assert plain.status_code == 415
    assert answers[0] == answers[1]  # a valid request's answer is the same


# -- the request log's reasons --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "convex"])
def test_validation_refusals_are_a_reason_of_their_own(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Both stores classify a row's `invalid_body:` error alike: the dashboard's `body`."""
    store: MemoryStore | ConvexStore
    if kind == "convex":
        server = request.getfixturevalue("convex_server")
        server.reset()
        store = ConvexStore(server.url, server.admin_key, timeout=10)
    else:
        store = MemoryStore()
    assert refusal_reason("invalid_body:json") == "body"

    async def run() -> dict[str, int]:
        hour = (time.time() * 1000 // HOUR - 2) * HOUR
        errors = ("invalid_body:too_large", "invalid_body:json", "rate_limited:ipAIRequests")
        rows = [
            ai_row(hour + 1_000 + n, "openai", False, 5, 0, 0.0)._replace(error=error)
            for n, error in enumerate(errors)
        ]
        try:
            await store.write_logs(LogBatch(id=uuid.uuid4().hex, ai_requests=rows))
            snap = await store.dashboard(hour, hour + MINUTE, MINUTE)
        finally:
            await store.close()
        return {reason: snap.refusals.get(reason, 0) for reason in REFUSAL_REASONS}

    assert asyncio.run(run()) == {"limit": 1, "bot": 0, "key": 0, "budget": 0, "body": 2}


def test_under_a_wsgi_server_the_headers_are_checked() -> None:
    """Behind the WSGI bridge the guard sees headers only: the declared size and the type are
    refused as under ASGI, with no hop-by-hop field (wsgiref refuses a response with one)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from convex_guard.wsgi import GuardWSGIMiddleware

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [("content-type", "application/octet-stream")])
        return [body]

    guarded = GuardWSGIMiddleware(
        app, store=MemoryStore(), rules=(), key_routes=(), bot_detection=False, body_rules=RULES
    )
    server = make_server("127.0.0.1", 0, guarded, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    json_type = {"content-type": "application/json"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=10) as c:
            ok = c.post("/json", content=b'{"a": 1}', headers=json_type)
            big = c.post("/json", content=b"1" * (LIMIT + 1), headers=json_type)
            wrong = c.post("/upload", content=b"x", headers={"content-type": "text/plain"})
    finally:
        server.shutdown()
        server.server_close()
        guarded.close()
    assert (ok.status_code, ok.content) == (200, b'{"a": 1}')
    assert big.status_code == 413 and big.json()["max-bytes"] == LIMIT
    assert wrong.status_code == 415
