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

floor (`Floor` below): the cheapest pure-Python middleware doing the guard's work, the distance
to which is the guard's target. guard-1/guard-5 and floor-1/floor-5: the same with 1 and 5
rules (decisions) instead of 3, for the cost of each extra rule. guard-1m-clients: every
request from a client not seen before, out of 1,000,000 addresses (the worst case for address
and limit-state caches), beside guard-1-client (the same scaffolding, one address).
guard-8k-ua: an 8 kB user-agent on every request (its `suspicious` category allowed, so that
it takes the same path as guard's browser).
guard-closest: guard with `ratelimit_items="closest"`, the `RateLimit` fields carrying only the
policy nearest exhaustion (over uvicorn, fewer header bytes for the server to check).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import xxhash
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
    "floor",
    "guard",
    "guard-tokens",
    "floor-1",
    "floor-5",
    "guard-1",
    "guard-5",
    "guard-1-client",
    "guard-1m-clients",
    "guard-8k-ua",
    "guard-closest",
    "ratelimit",
    "asgi-ratelimit",
    "slowapi-asgi",
    "slowapi-basehttp",
)
#: One middleware each, for the per-request CPU table.
SINGLE = ("logger", "fingerprint", "apikeys", "botdetection", "ratelimit")
PATH = "/api/ai/openai/chat"
#: Distinct client addresses of `guard-1m-clients`, taken in turn.
CLIENTS = 1_000_000
LONG_AGENT_PREFIX = (
    b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/131.0.0.0 Safari/537.36"
)


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("Hello, world!")


def rules(count: int = 3) -> list[Rule]:
    """The first `count` (1 to 5) of five never-triggering rules on PATH: three by default."""
    window = FixedWindow(rate=NEVER, period=HOUR)
    return [
        Rule("globalAIRequests", window, path="/api/ai"),
        Rule("ipAIRequests", window, key="ip", path="/api/ai"),
        Rule("openaiRequests", window, path="/api/ai/openai"),
        Rule("fingerprintAIRequests", window, key="fingerprint", path="/api/ai"),
        Rule("ipOpenaiRequests", window, key="ip", path="/api/ai/openai"),
    ][:count]


def _routes() -> list[Route]:
    return [Route(PATH, hello, methods=["GET", "POST"])]


def bare() -> Starlette:
    return Starlette(routes=_routes())


def guard(count: int = 3, **options: Any) -> Starlette:
    from convex_guard import GuardMiddleware, GuardSettings

    settings = GuardSettings(store=MemoryStore(), rules=rules(count), **options)
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


class Floor:
    """The cheapest pure-Python middleware doing the guard's work: the guard's target.

    A plain loop over the headers picks five fields for an xxh3 fingerprint and the
    user-agent; the user-agent's verdict (the seed's bot pattern) is cached by its bytes;
    `decisions` fixed windows (global and per client address, alternately) are counted in
    dicts; the response gets `RateLimit-Policy` and `RateLimit` for all of them; one tuple per
    request goes to a bounded log. None of the guard's checks of bad input, its fail policies or
    its stores: this is a measuring stick, not a production path.
    """

    FIELDS: ClassVar[dict[bytes, int]] = {
        b"user-agent": 0,
        b"accept-language": 1,
        b"accept-encoding": 2,
        b"accept": 3,
        b"dnt": 4,
    }
    BOTS = re.compile(
        rb"bot|crawler|spider|scraper|headless|selenium|puppeteer|playwright|gptbot|"
        rb"claude-web|chatgpt|ccbot|anthropic-ai|perplexitybot",
        re.IGNORECASE,
    )

    def __init__(self, app: ASGIApp, decisions: int = 3) -> None:
        self.app = app
        # The guard's rule names, so that both send the same bytes (uvicorn checks each one).
        self.names = [rule.name for rule in rules(decisions)]
        self.per_client = [i % 2 == 1 for i in range(decisions)]
        self.windows: list[dict[str | None, tuple[int, int]]] = [{} for _ in range(decisions)]
        self.verdicts: dict[bytes, bool] = {}
        self.log: deque[tuple[float, str, str, str, int, float]] = deque(maxlen=100_000)
        policy = ", ".join(f'"{name}";q={NEVER};w=3600' for name in self.names)
        self.policy = (b"ratelimit-policy", policy.encode())
        self.template = ", ".join(f'"{name}";r=%d;t=%d' for name in self.names).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        values = [b"", b"", b"", b"", b""]
        for name, value in scope["headers"]:
            slot = self.FIELDS.get(name)
            if slot is not None:
                values[slot] = value
        fingerprint = xxhash.xxh3_64_hexdigest(b"\n".join(values))
        agent = values[0]
        bot = self.verdicts.get(agent)
        if bot is None:
            if len(self.verdicts) >= 4096:
                self.verdicts.clear()
            bot = self.verdicts[agent] = self.BOTS.search(agent) is not None
        if bot:
            await PlainTextResponse("Forbidden", status_code=403)(scope, receive, send)
            return
        client = scope["client"][0]
        now = time.time()
        window = int(now // 3600)
        numbers: list[int] = []
        for windows, per_client in zip(self.windows, self.per_client, strict=True):
            key = client if per_client else None
            start, used = windows.get(key, (window, 0))
            if start != window:
                used = 0
            windows[key] = (window, used + 1)
            numbers += [NEVER - used - 1, (window + 1) * 3600 - int(now)]
        fields = [self.policy, (b"ratelimit", self.template % tuple(numbers))]
        status = 500

        async def send_with_fields(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        await self.app(scope, receive, send_with_fields)
        self.log.append(
            (now, scope["path"], client, fingerprint, status, time.perf_counter() - started)
        )


def floor(decisions: int = 3) -> Starlette:
    return Starlette(routes=_routes(), middleware=[Middleware(Floor, decisions=decisions)])


def _distinct_clients(app: ASGIApp, clients: int = CLIENTS) -> ASGIApp:
    """`app`, with requests from `clients` addresses in turn (10.0.0.0, 10.0.0.1, ...).

    Benchmark scaffolding: the TCP peer is the same for every request a load client sends, so
    the address is set here, in the server process. Its own cost (a counter and a format) is
    counted with the variant's, and is the same with one client (`guard-1-client`, the
    1M-client row's reference).
    """
    counter = itertools.count()

    async def from_new_client(scope: Scope, receive: Receive, send: Send) -> None:
        number = next(counter) % clients + (10 << 24)
        address = f"{number >> 24}.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"
        scope["client"] = (address, 50_000)
        await app(scope, receive, send)

    return from_new_client


def _long_user_agent(app: ASGIApp) -> ASGIApp:
    """`app`, with every request's user-agent replaced by an 8 kB one (a browser's, padded).

    Set in the server process, so that the table measures what the guard does with it, not
    what the HTTP parser does (the same for every app).
    """
    agent = (LONG_AGENT_PREFIX + b" x" * 4096)[:8192]

    async def with_long_agent(scope: Scope, receive: Receive, send: Send) -> None:
        scope["headers"] = [
            (name, agent if name == b"user-agent" else value) for name, value in scope["headers"]
        ]
        await app(scope, receive, send)

    return with_long_agent


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
    "floor": floor,
    "floor-1": lambda: floor(1),
    "floor-5": lambda: floor(5),
    "guard": guard,
    "guard-tokens": guard_tokens,
    "guard-1": lambda: guard(1),
    "guard-5": lambda: guard(5),
    "guard-1m-clients": lambda: _distinct_clients(guard()),
    "guard-1-client": lambda: _distinct_clients(guard(), clients=1),
    # An agent that long is `suspicious` (only padding makes one so long): allowed here, so
    # that the row measures the same path as `guard`, with the long value carried through it.
    "guard-8k-ua": lambda: _long_user_agent(guard(bot_policy={"suspicious": "allow"})),
    # The `RateLimit` fields with only the policy closest to exhaustion: fewer bytes for the
    # server to check and send.
    "guard-closest": lambda: guard(ratelimit_items="closest"),
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
