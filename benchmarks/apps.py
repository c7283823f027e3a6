"""The hello-world apps the HTTP benchmarks serve, one per variant (`VARIANT` env var).

`uvicorn --factory benchmarks.apps:make` builds the variant named by `VARIANT`:
bare, guard (the full stack on MemoryStore: logger, fingerprint, bot detection, three limit
rules that never trigger), ratelimit (RateLimitMiddleware alone, the same three rules),
slowapi-asgi (SlowAPIASGIMiddleware, one in-memory limit), slowapi-basehttp (SlowAPIMiddleware),
asgi-ratelimit (asgi-ratelimit's middleware, ONE per-client rule on its memory backend: the
reference point against which the issue set its target, measured here on this machine).
guard-tokens: the guard's stack with a per-client token limit beside the three request
rules, on a chat-completions request (each GET becomes a POST with a small JSON body on the way
in) whose app reports its usage: body read and replayed, estimate, reservation and settlement.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convex_guard import HOUR, FixedWindow, MemoryStore, Rule

NEVER = 10**9  # limits that never trigger: we measure the cost of deciding, not of denying
VARIANTS = (
    "bare",
    "guard",
    "guard-tokens",
    "ratelimit",
    "asgi-ratelimit",
    "slowapi-asgi",
    "slowapi-basehttp",
)
#: One middleware each, for the per-request CPU table.
SINGLE = ("logger", "fingerprint", "apikeys", "botdetection", "ratelimit")
PATH = "/api/ai/openai/chat"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello, world!")


def rules() -> list[Rule]:
    return [
        Rule("globalAIRequests", FixedWindow(rate=NEVER, period=HOUR), path="/api/ai"),
        Rule("ipAIRequests", FixedWindow(rate=NEVER, period=HOUR), key="ip", path="/api/ai"),
        Rule("openaiRequests", FixedWindow(rate=NEVER, period=HOUR), path="/api/ai/openai"),
    ]


def _routes() -> list[Route]:
    return [Route(PATH, hello, methods=["GET", "POST"])]


def bare() -> Starlette:
    return Starlette(routes=_routes())


def guard() -> Starlette:
    from convex_guard import GuardMiddleware, GuardSettings

    settings = GuardSettings(store=MemoryStore(), rules=rules())
    return Starlette(routes=_routes(), middleware=[Middleware(GuardMiddleware, settings=settings)])


CHAT = json.dumps(
    {
        "model": "gpt-4o-mini",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    }
).encode()


async def chat(request: Request) -> PlainTextResponse:
    from convex_guard import report_usage

    await request.body()  # the guard's replay
    report_usage(request, model="gpt-4o-mini", tokens=42)
    return PlainTextResponse("Hello, world!")


def _as_chat(app: ASGIApp) -> ASGIApp:
    """Every request as a chat-completions POST with `CHAT` as its body."""

    async def chat_request(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def body() -> Message:
            return {"type": "http.request", "body": CHAT, "more_body": False}

        await app({**scope, "method": "POST"}, body, send)

    return chat_request


def guard_tokens() -> ASGIApp:
    from convex_guard import GuardMiddleware, GuardSettings

    tokens = Rule(
        "ipTokens", FixedWindow(rate=NEVER, period=HOUR), key="ip", unit="tokens", path="/api/ai"
    )
    settings = GuardSettings(store=MemoryStore(), rules=[*rules(), tokens])
    app = Starlette(
        routes=[Route(PATH, chat, methods=["POST"])],
        middleware=[Middleware(GuardMiddleware, settings=settings)],
    )
    return _as_chat(app)


def ratelimit() -> Starlette:
    from convex_guard import RateLimitMiddleware

    return Starlette(
        routes=_routes(),
        middleware=[Middleware(RateLimitMiddleware, store=MemoryStore(), rules=rules())],
    )


def logger() -> Starlette:
    from convex_guard import RequestLoggerMiddleware

    return Starlette(
        routes=_routes(), middleware=[Middleware(RequestLoggerMiddleware, store=MemoryStore())]
    )


def fingerprint() -> Starlette:
    from convex_guard import FingerprintMiddleware

    return Starlette(routes=_routes(), middleware=[Middleware(FingerprintMiddleware)])


def apikeys() -> Starlette:
    from convex_guard import ApiKeyMiddleware, KeyRoute

    routes = [KeyRoute("/api/ai", required=False)]  # anonymous callers pass, as on the gateway
    return Starlette(
        routes=_routes(),
        middleware=[Middleware(ApiKeyMiddleware, store=MemoryStore(), routes=routes)],
    )


def botdetection() -> Starlette:
    from convex_guard import BotDetectionMiddleware, FingerprintMiddleware

    # Bot detection needs a fingerprint: the fingerprint's own cost is subtracted in the table.
    return Starlette(
        routes=_routes(),
        middleware=[
            Middleware(FingerprintMiddleware),
            Middleware(BotDetectionMiddleware, store=MemoryStore()),
        ],
    )


def _slowapi(asgi: bool) -> Starlette:
    from slowapi import Limiter, _rate_limit_exceeded_handler
    from slowapi.errors import RateLimitExceeded
    from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
    from slowapi.util import get_remote_address

    limiter = Limiter(key_func=get_remote_address, default_limits=[f"{NEVER}/hour"])
    middleware = SlowAPIASGIMiddleware if asgi else SlowAPIMiddleware
    app = Starlette(routes=_routes(), middleware=[Middleware(middleware)])
    app.state.limiter = limiter
    # slowapi types its handler for RateLimitExceeded only, Starlette for any exception.
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def _asgi_ratelimit() -> Starlette:
    from ratelimit import RateLimitMiddleware as AsgiRateLimit
    from ratelimit import Rule as AsgiRule
    from ratelimit.backends.simple import MemoryBackend

    async def by_peer(scope: Scope) -> tuple[str, str]:
        client = scope.get("client")
        return (client[0] if client else "unknown"), "default"

    return Starlette(
        routes=_routes(),
        middleware=[
            Middleware(
                AsgiRateLimit,
                authenticate=by_peer,
                backend=MemoryBackend(),  # type: ignore[no-untyped-call]  # asgi-ratelimit: no hints
                config={r"^/api/ai": [AsgiRule(hour=NEVER)]},
            )
        ],
    )


FACTORIES: dict[str, Callable[[], ASGIApp]] = {
    "asgi-ratelimit": _asgi_ratelimit,
    "bare": bare,
    "guard": guard,
    "guard-tokens": guard_tokens,
    "ratelimit": ratelimit,
    "logger": logger,
    "fingerprint": fingerprint,
    "apikeys": apikeys,
    "botdetection": botdetection,
    "slowapi-asgi": lambda: _slowapi(asgi=True),
    "slowapi-basehttp": lambda: _slowapi(asgi=False),
}


def make() -> ASGIApp:
    return FACTORIES[os.environ.get("VARIANT", "bare")]()
