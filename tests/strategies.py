"""What a hostile client sends, as hypothesis strategies, and the in-process ASGI call that
sends it: no server and no socket, so hundreds of examples run against one app in seconds.
The bad-input, abuse and outage tests draw on the same inputs."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.types import Message

from convex_guard import GuardMiddleware

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
#: A well-formed chat request's body.
CHAT_BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
body_strategy = st.one_of(st.just(CHAT_BODY), st.binary(max_size=200))


def on_one_app(max_examples: int) -> settings:
    """Settings for examples that share one app and event loop (a module-scoped fixture, as
    under a real server): a whole stack per example is slow, and the fixture is not reset
    between examples on purpose."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def guard_of(app: Any) -> GuardMiddleware:
    """The example app's GuardMiddleware (Starlette builds the stack on the first call)."""
    node = app.middleware_stack
    while node is not None and not isinstance(node, GuardMiddleware):
        node = getattr(node, "app", None)
    assert isinstance(node, GuardMiddleware)
    return node


def asgi_scope(
    kind: Literal["http", "websocket"],
    path: str,
    headers: list[tuple[bytes, bytes]],
    client: object,
    root_path: str = "",
) -> dict[str, Any]:
    """The scope a server builds for what a client sent: `path` as it arrived (it may hold
    lone surrogates), under `root_path`; `client` the peer, `None` when the server knows
    none, or "missing" for a server that leaves the key out."""
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3" if kind == "http" else "2.4"},
        "http_version": "1.1",
        "scheme": "http" if kind == "http" else "ws",
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
    return scope


async def call(
    app: Any,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    client: object,
    body: bytes,
    root_path: str = "",
) -> tuple[int, list[Message]]:
    scope = asgi_scope("http", path, headers, client, root_path)
    scope["method"] = method
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
