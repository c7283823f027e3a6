"""No walking around the guard: under a root_path or a Mount, with HEAD, over a WebSocket.

Every check runs through a real uvicorn server with real clients (httpx, `websockets`). Also:
monitors on the usual probe paths are never escalated by default.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from examples.gateway import create_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from convex_guard import (
    MINUTE,
    ApiKeys,
    FingerprintMiddleware,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    KeyRoute,
    MemoryStore,
    RateLimitMiddleware,
    RequestLoggerMiddleware,
    Rule,
)
from convex_guard.middleware.apikeys import ApiKeyMiddleware
from convex_guard.middleware.botdetection import BotDetectionMiddleware
from convex_guard.middleware.context import route_of
from convex_guard.wsgi import GuardWSGIMiddleware

from .conftest import serve
from .e2e_checks import BROWSER, CHAT, EMBED, GPTBOT
from .wsgi_server import serve_wsgi

LIMIT = 3
#: The WebSocket implementations uvicorn ships with that are installed here (wsproto is not).
WS_IMPLEMENTATIONS = ("websockets", "websockets-sansio")


def gateway_settings(store: MemoryStore) -> GuardSettings:
    rules = [Rule("perplexity", FixedWindow(rate=LIMIT, period=MINUTE), path="/api/ai/perplexity")]
    return GuardSettings(store=store, rules=rules, writer_interval=0.05)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def check_gateway(base_url: str, store: MemoryStore) -> None:
    """The gateway's limits, keys and log behave as at the root of the server."""
    with httpx.Client(base_url=base_url, headers={"user-agent": BROWSER}, timeout=10) as c:
        codes = [c.post("/api/ai/perplexity/chat", json=CHAT).status_code for _ in range(LIMIT + 2)]
        assert codes == [200] * LIMIT + [429, 429], codes
        assert c.post("/api/embeddings", json=EMBED).status_code == 401
    wait_for(lambda: len(store.ai_logs) == LIMIT + 2 and len(store.embedding_logs) == 1)
    assert {row.provider for row in store.ai_logs} == {"perplexity"}
    assert [row.success for row in store.ai_logs] == [True] * LIMIT + [False, False]
    assert store.embedding_logs[0].error == "api_key_missing"


# -- 1. root_path and Mount --------------------------------------------------------------------


def test_the_gateway_under_a_root_path_is_guarded() -> None:
    """`uvicorn --root-path /gw`: the proxy strips /gw, uvicorn puts it back into the path."""
    store = MemoryStore()
    with serve(create_app(gateway_settings(store), upstream=None), root_path="/gw") as server:
        check_gateway(server.url, store)


def test_the_gateway_mounted_under_a_prefix_is_guarded() -> None:
    store = MemoryStore()
    outer = Starlette(routes=[Mount("/v1", app=create_app(gateway_settings(store), upstream=None))])
    with serve(outer) as server:
        check_gateway(server.url + "/v1", store)
        with httpx.Client(base_url=server.url) as c:  # the outer app's own 404s stay unguarded
            assert c.get("/api/ai/perplexity/chat").status_code == 404


def test_a_mount_under_a_root_path_is_guarded() -> None:
    store = MemoryStore()
    outer = Starlette(routes=[Mount("/v1", app=create_app(gateway_settings(store), upstream=None))])
    with serve(outer, root_path="/gw") as server:
        check_gateway(server.url + "/v1", store)


def wsgi_hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def test_a_mounted_wsgi_app_is_guarded_on_its_own_paths() -> None:
    """Mounted at /api, a WSGI app's PATH_INFO (its route) may itself begin with /api."""
    store = MemoryStore()
    guarded = GuardWSGIMiddleware(wsgi_hello, gateway_settings(store))
    outer = DispatcherMiddleware(wsgi_hello, {"/api": guarded})
    with serve_wsgi(outer) as url, httpx.Client(base_url=url, headers={"user-agent": BROWSER}) as c:
        codes = [c.post("/api/api/ai/perplexity/chat").status_code for _ in range(LIMIT + 1)]
        assert codes == [200] * LIMIT + [429], codes
        assert c.post("/api/api/embeddings").status_code == 401
        assert c.get("/api/health", headers={"user-agent": GPTBOT}).status_code == 200  # exempt
    guarded.close()
    assert {row.provider for row in store.ai_logs} == {"perplexity"}


# -- 3. HEAD is GET ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "route"),
    [
        ({"type": "http", "method": "HEAD", "path": "/x", "root_path": ""}, ("GET", "/x")),
        ({"type": "http", "method": "POST", "path": "/gw/x", "root_path": "/gw"}, ("POST", "/x")),
        ({"type": "http", "method": "GET", "path": "/gwx", "root_path": "/gw"}, ("GET", "/gwx")),
        ({"type": "http", "method": "GET", "path": "/x", "root_path": "/gw"}, ("GET", "/x")),
        ({"type": "websocket", "path": "/v1/api/ws", "root_path": "/v1"}, ("GET", "/api/ws")),
    ],
)
def test_the_route_is_starlettes(scope: dict[str, Any], route: tuple[str, str]) -> None:
    assert route_of(scope) == route


def test_a_rule_for_head_is_a_rule_for_get() -> None:
    rule = Rule("r", FixedWindow(rate=1, period=MINUTE), methods=["head"])
    assert rule.matches("/", "GET") and not rule.matches("/", "POST")
    assert KeyRoute("/k", methods=["HEAD", "POST"]).matches("/k", "GET")


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def head_app(store: MemoryStore) -> ASGIApp:
    app = Starlette(
        routes=[Route("/private", ok, methods=["GET"]), Route("/limited", ok, methods=["GET"])]
    )
    return GuardMiddleware(
        app,
        store=store,
        rules=[
            Rule(
                "limited", FixedWindow(rate=LIMIT, period=MINUTE), path="/limited", methods=["GET"]
            )
        ],
        key_routes=[KeyRoute("/private", methods=["GET"])],
    )


def test_head_is_limited_and_keyed_as_get() -> None:
    store = MemoryStore()
    with (
        serve(head_app(store)) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}) as c,
    ):
        codes = [c.head("/limited").status_code for _ in range(LIMIT + 2)]
        assert codes == [200] * LIMIT + [429, 429], codes
        assert c.get("/limited").status_code == 429  # HEAD and GET share one quota
        private = c.head("/private")
        assert private.status_code == 401
        assert private.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/private").status_code == 401


# -- 16. probes --------------------------------------------------------------------------------


def probe_app() -> ASGIApp:
    routes = [Route(p, ok) for p in ("/healthz", "/readyz", "/livez", "/metrics", "/ping")]
    return GuardMiddleware(Starlette(routes=routes), store=MemoryStore())


@pytest.mark.parametrize(
    ("agent", "path"),
    [
        ("kube-probe/1.29", "/healthz"),
        ("Prometheus/2.48.0", "/metrics"),
        ("ELB-HealthChecker/2.0", "/readyz"),
        ("kube-probe/1.29", "/livez"),
    ],
)
def test_monitors_on_probe_paths_are_never_escalated(agent: str, path: str) -> None:
    with (
        serve(probe_app()) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": agent}) as c,
    ):
        codes = [c.get(path).status_code for _ in range(30)]
    assert codes == [200] * 30, codes


def test_the_probe_paths_are_the_operators_to_change() -> None:
    app = GuardMiddleware(Starlette(routes=[Route("/healthz", ok)]), bot_probe_paths=[])
    with (
        serve(app) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": "kube-probe/1.29"}) as c,
    ):
        codes = [c.get("/healthz").status_code for _ in range(12)]
    assert codes[:5] == [200] * 5 and codes[-1] == 403, codes  # escalated, as any bot


def test_a_crawler_on_a_probe_path_is_still_a_crawler() -> None:
    with serve(probe_app()) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/metrics", headers={"user-agent": GPTBOT}).status_code == 403
        # A monitor off the probe paths is escalated as before.
        codes = [
            c.get("/nothing", headers={"user-agent": "kube-probe/1.29"}).status_code
            for _ in range(12)
        ]
        assert codes[-1] == 403, codes


# -- 2. WebSocket ------------------------------------------------------------------------------


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


def ws_routes() -> list[WebSocketRoute]:
    return [
        WebSocketRoute("/api/ai/openai/realtime", echo),
        WebSocketRoute("/api/ai/groq/realtime", echo),
        WebSocketRoute("/health", echo),
    ]


def ws_settings(store: MemoryStore) -> GuardSettings:
    return GuardSettings(
        store=store,
        rules=[
            Rule("groqWs", FixedWindow(rate=LIMIT, period=MINUTE), key="ip", path="/api/ai/groq")
        ],
        key_routes=[KeyRoute("/api/ai/openai", kind="ai", required=True)],
        writer_interval=0.05,
    )


def guarded_ws_app(store: MemoryStore, *, stacked: bool) -> ASGIApp:
    """The routes behind `GuardMiddleware`, or behind the five middlewares stacked by hand."""
    app = Starlette(routes=ws_routes())
    settings = ws_settings(store)
    if not stacked:
        return GuardMiddleware(app, settings=settings)
    assert settings.rules is not None
    inner: ASGIApp = RateLimitMiddleware(app, store=store, rules=settings.rules)
    inner = BotDetectionMiddleware(inner, store=store, defer=True)
    inner = ApiKeyMiddleware(inner, store=store, routes=settings.key_routes)
    inner = FingerprintMiddleware(inner)
    return RequestLoggerMiddleware(inner, store=store)


def refused(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    with (
        pytest.raises(InvalidStatus) as info,
        connect(url, additional_headers=headers, user_agent_header=None, open_timeout=5),
    ):
        pass
    response = info.value.response
    return response.status_code, dict(response.headers), bytes(response.body or b"")


@pytest.fixture(params=[(ws, stacked) for ws in WS_IMPLEMENTATIONS for stacked in (False, True)])
def ws_server(request: pytest.FixtureRequest) -> Any:
    ws, stacked = request.param
    store = MemoryStore()
    key = asyncio.run(ApiKeys(store).create("ws", kind="ai")).key
    with serve(guarded_ws_app(store, stacked=stacked), ws=ws) as server:
        yield server.url.replace("http://", "ws://"), store, key


def test_websocket_handshakes_are_guarded(ws_server: Any) -> None:
    base, store, key = ws_server
    # A crawler is refused before accept, with the HTTP refusal's status and problem body.
    status, headers, body = refused(f"{base}/api/ai/groq/realtime", **{"User-Agent": GPTBOT})
    assert status == 403
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["status"] == 403

    # A keyed route without a key: 401 with the Bearer challenge.
    status, headers, body = refused(f"{base}/api/ai/openai/realtime", **{"User-Agent": BROWSER})
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["status"] == 401

    # 3 handshakes a minute: the 4th is refused with 429 and Retry-After.
    for _ in range(LIMIT):
        with connect(
            f"{base}/api/ai/groq/realtime", user_agent_header=BROWSER, open_timeout=5
        ) as ws:
            assert ws.response is not None
            assert ws.response.headers["ratelimit-policy"] == '"groqWs";q=3;w=60'
            ws.send("hi")
            assert ws.recv(timeout=5) == "hi"
    status, headers, body = refused(f"{base}/api/ai/groq/realtime", **{"User-Agent": BROWSER})
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert json.loads(body)["violated-policies"] == ["groqWs"]

    # A browser with a valid key is accepted and echoes; the exempt path is not checked.
    with connect(
        f"{base}/api/ai/openai/realtime",
        user_agent_header=BROWSER,
        additional_headers={"Authorization": f"Bearer {key}"},
        open_timeout=5,
    ) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    with connect(f"{base}/health", user_agent_header=GPTBOT, open_timeout=5) as ws:
        ws.send("up")
        assert ws.recv(timeout=5) == "up"

    # One row per handshake, refused or accepted; an accepted one logged once, when it closes.
    wait_for(lambda: len(store.ai_logs) == 7)
    rows = sorted(store.ai_logs, key=lambda row: row.timestamp)
    assert [(r.provider, r.success, r.error) for r in rows] == [
        ("groq", False, "bot_blocked"),
        ("openai", False, "api_key_missing"),
        ("groq", True, None),
        ("groq", True, None),
        ("groq", True, None),
        ("groq", False, "rate_limited:groqWs"),
        ("openai", True, None),
    ]


# -- 2. WebSocket, on a server without the websocket.http.response extension -------------------


async def handshake(app: ASGIApp, path: str, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("203.0.113.5", 5000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "state": {},
    }
    sent: list[Message] = []
    incoming: list[Message] = [{"type": "websocket.connect"}]

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "websocket.accept":
            incoming.append({"type": "websocket.receive", "text": "ping"})

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("stacked", [False, True])
async def test_without_the_extension_a_refusal_is_a_close_frame(stacked: bool) -> None:
    store = MemoryStore()
    key = (await ApiKeys(store).create("ws", kind="ai")).key
    app = guarded_ws_app(store, stacked=stacked)
    browser = [(b"user-agent", BROWSER.encode())]

    sent = await handshake(app, "/api/ai/groq/realtime", [(b"user-agent", GPTBOT.encode())])
    assert sent == [
        {"type": "websocket.close", "code": 1008, "reason": "Automated access is not allowed"}
    ]
    sent = await handshake(app, "/api/ai/openai/realtime", browser)
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1008)]
    for _ in range(LIMIT):
        sent = await handshake(app, "/api/ai/groq/realtime", browser)
        assert [m["type"] for m in sent][:2] == ["websocket.accept", "websocket.send"]
    sent = await handshake(app, "/api/ai/groq/realtime", browser)
    assert [(m["type"], m.get("code")) for m in sent] == [("websocket.close", 1013)]
    keyed = [*browser, (b"authorization", f"Bearer {key}".encode())]
    sent = await handshake(app, "/api/ai/openai/realtime", keyed)
    assert sent[0]["type"] == "websocket.accept" and sent[1] == {
        "type": "websocket.send",
        "text": "ping",
    }
