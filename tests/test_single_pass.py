"""GuardMiddleware runs HTTP requests and WebSocket handshakes through the middlewares' steps
in one pass; the same middlewares stacked must answer every request identically and store
the same rows, HEAD and GET, at the root or under a root_path.

Each example drives one sequence of requests (browsers, crawlers, scripts, keys good and bad,
limited and unlimited routes, two clients) through a guard's single pass and through its own
stack, each on its own store with the same frozen clock, and compares what the clients got
and what was stored, field by field (timings aside)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message
from starlette.websockets import WebSocket

from convex_guard import (
    HOUR,
    MINUTE,
    BotCategory,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    KeyRateLimit,
    MemoryStore,
    Rule,
    TokenBucket,
    generate_key,
    hash_key,
    report_usage,
)
from convex_guard.core.keys import ApiKeyKind, display_prefix
from convex_guard.middleware.botdetection import PolicyAction
from convex_guard.middleware.guard import exempt_matcher
from convex_guard.middleware.rules import FailPolicy, _path_matcher
from convex_guard.stores.base import NewApiKey

from .e2e_checks import BROWSER, GPTBOT
from .fault_tools import Switch

NOW = 1_750_000_000_000.0
PATHS = ("/api/ai/openai/chat", "/api/ai/perplexity/chat", "/api/embeddings", "/health", "/x")
AGENTS = (
    BROWSER,
    GPTBOT,
    "curl/8.5.0",
    "",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
)
CREDENTIALS = ("none", "good", "wrong", "malformed", "ai")
CLIENTS = ("203.0.113.7", "2001:db8::1", "198.51.100.2")

request_specs = st.tuples(
    st.sampled_from(PATHS),
    st.sampled_from(AGENTS),
    st.sampled_from(CREDENTIALS),
    st.sampled_from(CLIENTS),
    # WS: a WebSocket handshake, on a server offering the HTTP-denial extension or not.
    st.sampled_from(("GET", "POST", "HEAD", "WS", "WS-NOEXT")),
    st.sampled_from(("", "/gw", "/v1/api")),  # the root_path a server or a Mount sets
)


async def chat(request: Request) -> JSONResponse:
    report_usage(request, model="m1", tokens=5, cost=0.01)
    return JSONResponse({"ok": True})


async def embed(request: Request) -> JSONResponse:
    report_usage(request, model="e1", tokens=3, items=2)
    return JSONResponse({"data": []})


async def realtime(websocket: WebSocket) -> None:
    report_usage(websocket, model="rt1", tokens=1)
    await websocket.accept()
    await websocket.send_text("hi")
    await websocket.close()


def inner() -> Starlette:
    return Starlette(
        routes=[
            WebSocketRoute("/api/ai/{provider}/chat", realtime),
            WebSocketRoute("/api/embeddings", realtime),
            WebSocketRoute("/health", realtime),
            Route("/api/ai/{provider}/chat", chat, methods=["GET", "POST"]),
            Route("/api/embeddings", embed, methods=["GET", "POST"]),
            Route("/health", chat),
        ]
    )


def rules() -> list[Rule]:
    return [
        Rule("globalAI", FixedWindow(rate=40, period=HOUR), path="/api/ai"),
        Rule("ipAI", TokenBucket(rate=4, period=MINUTE, capacity=4), key="ip", path="/api/ai"),
        Rule("userAI", FixedWindow(rate=3, period=MINUTE), key="user", path="/api/ai"),
        Rule("perplexity", FixedWindow(rate=2, period=MINUTE), path="/api/ai/perplexity"),
        Rule("embeddings", FixedWindow(rate=3, period=MINUTE), path="/api/embeddings"),
    ]


KEYS = {"good": generate_key("embedding"), "ai": generate_key("ai")}
WRONG = generate_key("embedding")  # well formed, never stored


async def guarded() -> tuple[GuardMiddleware, MemoryStore]:
    """A guard on its own store holding the same two keys (the AI key with its own limit)."""
    store = MemoryStore(clock=lambda: NOW, random=lambda: 0.5)
    keys: list[tuple[str, ApiKeyKind, str, KeyRateLimit | None]] = [
        ("good", "embedding", "ann", None),
        ("ai", "ai", "bob", KeyRateLimit(requests=2, period=MINUTE)),
    ]
    for name, kind, owner, limit in keys:
        raw = KEYS[name]
        await store.create_api_key(
            NewApiKey(
                kind=kind,
                key_hash=hash_key(raw),
                prefix=display_prefix(raw),
                name=name,
                owner=owner,
                scopes=(),
                rate_limit=limit,
                created_at=NOW,
                expires_at=None,
            )
        )
    settings = GuardSettings(store=store, rules=rules(), writer_interval=60)
    return GuardMiddleware(inner(), settings=settings), store


def headers_for(agent: str, credentials: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"host", b"testserver"), (b"accept", b"*/*")]
    if agent:
        headers.append((b"user-agent", agent.encode()))
    token = {**KEYS, "wrong": WRONG}.get(credentials)
    if credentials == "malformed":
        headers.append((b"authorization", b"Bearer \xff\xfe"))
    elif token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    return headers


Spec = tuple[str, str, str, str, str, str]


async def call(app: ASGIApp, spec: Spec) -> Any:
    path, agent, credentials, client, method, root_path = spec
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": root_path + path,
        "raw_path": (root_path + path).encode(),
        "query_string": b"",
        "root_path": root_path,
        "headers": headers_for(agent, credentials),
        "client": (client, 40_000),
        "server": ("testserver", 80),
    }
    sent: list[Message] = []
    if method.startswith("WS"):
        del scope["method"]
        scope.update(type="websocket", scheme="ws", subprotocols=[])
        if method == "WS":
            scope["extensions"] = {"websocket.http.response": {}}
        incoming: list[Message] = [{"type": "websocket.connect"}]

        async def receive_ws() -> Message:
            return incoming.pop() if incoming else {"type": "websocket.disconnect", "code": 1000}

        async def send_ws(message: Message) -> None:
            sent.append({**message, "headers": sorted(message.get("headers", ()))})

        await app(scope, receive_ws, send_ws)
        return sent

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], sorted(start["headers"]), body


def stored(store: MemoryStore) -> dict[str, list[dict[str, Any]]]:
    timing = {"timestamp", "latency_ms", "request_id"}

    def rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k not in timing} for row in items]

    return {  # log rows are named tuples, bot events dataclasses
        "ai": rows([row._asdict() for row in store.ai_logs]),
        "embedding": rows([row._asdict() for row in store.embedding_logs]),
        "auth": rows([row._asdict() for row in store.auth_failures]),
        "bots": rows([dataclasses.asdict(event) for event in store._bot_events]),
    }


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_specs, min_size=1, max_size=40))
def test_single_pass_answers_and_stores_exactly_as_the_stack(
    specs: list[Spec],
) -> None:
    async def run() -> None:
        single, single_store = await guarded()
        stacked_guard, stacked_store = await guarded()
        stack = stacked_guard.guard.app.stacked
        for spec in specs:
            fused = await call(single, spec)
            if spec[0] == "/health":  # exempt: GuardMiddleware hands it to the app directly
                layered = await call(stacked_guard, spec)
            else:
                layered = await call(stack, spec)
            assert fused == layered, spec
        await single.writer.flush()
        await stacked_guard.writer.flush()
        assert stored(single_store) == stored(stacked_store)

    asyncio.run(run())


segments = st.sampled_from(["", "api", "health", "healthz", "metrics", "a", "x.y"])
paths = st.lists(segments, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))


@given(exempt=st.lists(paths, max_size=4), path=paths)
def test_the_exempt_check_is_the_path_matchers(exempt: list[str], path: str) -> None:
    """Exempt paths are matched in one set lookup and one `startswith`: as each rule's own
    segment-boundary matcher would say."""
    expected = any(_path_matcher(prefix)(path) for prefix in exempt)
    assert exempt_matcher(exempt)(path) is expected


# -- a failing store, and bot checks deferred or not ---------------------------------------------

#: Two categories challenged by policy, so the fail policy of a bot check has a refusal to give.
OUTAGE_POLICY: dict[BotCategory, PolicyAction] = {
    "search_engine": "challenge",
    "other_bot": "challenge",
}


async def switched(fail: FailPolicy) -> tuple[GuardMiddleware, Switch, MemoryStore]:
    """`guarded`'s store behind a switch that takes it down, every policy `fail`."""
    _, store = await guarded()
    switch = Switch(store)
    settings = GuardSettings(
        store=switch,
        rules=[dataclasses.replace(rule, fail=fail) for rule in rules()],
        bot_policy=OUTAGE_POLICY,
        fail=fail,
        writer_interval=60,
    )
    return GuardMiddleware(inner(), settings=settings), switch, store


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(("open", "closed")),
    st.lists(st.tuples(request_specs, st.booleans()), min_size=1, max_size=40),
)
def test_deferred_bot_checks_answer_as_checks_of_their_own_store_up_or_down(
    fail: FailPolicy, specs: list[tuple[Spec, bool]]
) -> None:
    """The single pass defers the bot check to the limiter's call; a stack whose bot middleware
    asks the store itself must answer alike, the store up or down (True: down for that
    request), fail open or closed, and store the same rows."""

    async def run() -> None:
        single, single_switch, single_store = await switched(fail)
        other, other_switch, other_store = await switched(fail)
        assert other.guard.bots is not None and other.guard.bots.defer
        other.guard.bots.defer = False  # the stack as built by hand: bots decided on their own
        stack = other.guard.stacked
        for spec, down in specs:
            single_switch.down = other_switch.down = down
            fused = await call(single, spec)
            layered = await call(other if spec[0] == "/health" else stack, spec)
            single_switch.down = other_switch.down = False
            assert fused == layered, (spec, down, fail)
        await single.writer.flush()
        await other.writer.flush()
        assert stored(single_store) == stored(other_store)

    asyncio.run(run())
