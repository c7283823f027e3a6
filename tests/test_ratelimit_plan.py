"""The rate limiter's fast path (a route's compiled plan, decided by one synchronous call of
the MemoryStore's decision core) held equal to its general path (`store.check`), and the
one-item `RateLimit` field through a real request."""

from __future__ import annotations

import inspect
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from convex_guard import (
    MINUTE,
    SECOND,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
)
from convex_guard.core.limits import LimitConfig
from convex_guard.middleware.context import GuardContext, route_of
from convex_guard.middleware.rules import RateLimitItems

from .conftest import serve

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


class GeneralPath(MemoryStore):
    """The same store, not a `MemoryStore` by type: the limiter takes its general path."""


class Clock:
    def __init__(self) -> None:
        self.now = 5_000_000.0

    def __call__(self) -> float:
        return self.now


_configs: st.SearchStrategy[LimitConfig] = st.one_of(
    st.builds(
        TokenBucket,
        rate=st.integers(1, 4),
        period=st.sampled_from([SECOND, 10 * SECOND, MINUTE]),
        capacity=st.sampled_from([None, 2, 6]),
    ),
    st.builds(
        FixedWindow,
        rate=st.integers(1, 4),
        period=st.sampled_from([SECOND, 10 * SECOND, MINUTE]),
        start=st.sampled_from([None, 0]),
    ),
)


@st.composite
def _rules(draw: st.DrawFn) -> list[Rule]:
    rules = []
    for i in range(draw(st.integers(1, 4))):
        config = draw(_configs)
        count = draw(st.sampled_from([1.0, 2.0])) if config.max >= 2 else 1.0
        rules.append(
            Rule(
                f"r{i}",
                config,
                key=draw(st.sampled_from(["global", "ip", "user", "api_key", "fingerprint"])),
                path=draw(st.sampled_from([None, "/a"])),
                methods=draw(st.sampled_from([None, ("GET",), ("POST",)])),
                count=count,
                shadow=draw(st.booleans()),
            )
        )
    return rules


_requests = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 250, 999, 1_000, 5_000, 61_000]),  # ms elapsed before
        st.sampled_from(["/a", "/b"]),
        st.sampled_from(["198.51.100.1", "198.51.100.2"]),
        st.sampled_from([None, "u1", "u2"]),  # user
        st.sampled_from([None, "k1"]),  # API key id
        st.sampled_from([None, "f1", "f2"]),  # fingerprint
        # How the request comes: its method (HEAD is routed as GET, a WebSocket handshake is
        # a GET), and the prefix it is mounted under (served with that root_path).
        st.sampled_from(["GET", "HEAD", "POST", "websocket"]),
        st.sampled_from(["", "/gateway"]),
    ),
    min_size=1,
    max_size=30,
)


async def no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _decide(limiter: RateLimitMiddleware, step: tuple[Any, ...]) -> tuple[Any, ...]:
    """One request through `limiter.before`: everything it answered and left in the context."""
    _, path, ip, user, api_key, fingerprint, method, prefix = step
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": prefix + path,
        "root_path": prefix,
        "headers": [],
        "client": (ip, 4000),
    }
    if method == "websocket":
        scope["type"] = "websocket"
        del scope["method"]
    ctx = GuardContext(
        route_of(scope), client_key=ip, user_id=user, api_key_id=api_key, fingerprint=fingerprint
    )
    answer: Any = limiter.before(scope, no_body, ctx)
    if inspect.iscoroutine(answer):
        answer = await answer
    refusal = None
    if answer is not None:
        assert isinstance(answer, Response)
        refusal = (answer.status_code, answer.headers.raw, bytes(answer.body))
    return refusal, ctx.response_headers, ctx.rejected, ctx.shadow, dict(ctx.limits)


@settings(max_examples=150, deadline=None)
@given(rules=_rules(), steps=_requests, closest=st.booleans())
async def test_the_fast_path_decides_and_answers_as_the_general_path(
    rules: list[Rule], steps: list[tuple[Any, ...]], closest: bool
) -> None:
    """Over random rule sets (every key kind, both algorithms, counts, shadow rules) and
    request sequences (time passing, anonymous callers, other paths and methods, HEAD and
    WebSocket scopes, a mounted prefix with its root_path): the same admissions and
    refusals, the same `RateLimit` numbers and fields, the same context."""
    clock = Clock()
    items: RateLimitItems = "closest" if closest else "all"
    fast = RateLimitMiddleware(
        None,  # type: ignore[arg-type]
        store=MemoryStore(clock=clock, random=lambda: 0.25),
        rules=rules,
        ratelimit_items=items,
    )
    general = RateLimitMiddleware(
        None,  # type: ignore[arg-type]
        store=GeneralPath(clock=clock, random=lambda: 0.25),
        rules=rules,
        ratelimit_items=items,
    )
    assert fast._memory is not None and general._memory is None
    for step in steps:
        clock.now += step[0]
        assert await _decide(fast, step) == await _decide(general, step)


async def test_an_admitted_request_on_the_fast_path_awaits_nothing() -> None:
    """Decided in the call: `before` answers None itself, no decision to await."""
    limiter = RateLimitMiddleware(
        None,  # type: ignore[arg-type]
        store=MemoryStore(clock=lambda: 30_000.0),
        rules=[
            Rule("all", FixedWindow(rate=5, period=MINUTE, start=0)),
            Rule("mine", TokenBucket(rate=2, period=MINUTE), key="user"),
        ],
    )
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("::1", 1)}
    ctx = GuardContext(route_of(scope), client_key="::1")
    assert limiter.before(scope, no_body, ctx) is None  # anonymous: "mine" does not apply
    assert ctx.response_headers == [
        (b"ratelimit-policy", b'"all";q=5;w=60'),
        (b"ratelimit", b'"all";r=4;t=30'),
    ]
    assert list(ctx.limits) == ["all"] and ctx.limits["all"].remaining == 4


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def test_closest_to_exhaustion_through_the_whole_guard() -> None:
    """`GuardSettings(ratelimit_items="closest")` over uvicorn: each admitted response names
    the one policy with the least left, which moves as the quotas are spent; a rule whose key
    the caller lacks (no user) is left out."""
    settings = GuardSettings(
        store=MemoryStore(),
        rules=[
            Rule("perIp", FixedWindow(rate=4, period=MINUTE, start=0), key="ip"),
            Rule("global", TokenBucket(rate=100, period=MINUTE)),
            Rule("perUser", TokenBucket(rate=1, period=MINUTE), key="user"),
        ],
        ratelimit_items="closest",
    )
    app = Starlette(
        routes=[Route("/x", hello)], middleware=[Middleware(GuardMiddleware, settings=settings)]
    )
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        seen = []
        for _ in range(5):
            response = client.get("/x", headers={"user-agent": BROWSER})
            seen.append(response)
        for used, response in enumerate(seen[:4], start=1):
            assert response.status_code == 200
            assert response.headers["ratelimit-policy"] == '"perIp";q=4;w=60'
            assert response.headers["ratelimit"].startswith(f'"perIp";r={4 - used};t=')
        denied = seen[4]
        assert denied.status_code == 429
        assert denied.headers["ratelimit"].startswith('"perIp";r=0;')
