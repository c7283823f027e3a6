"""GuardMiddleware: the whole stack from one setting, the example gateway, and order checks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from examples.gateway import create_app
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from convex_guard import (
    HOUR,
    ApiKeyMiddleware,
    BotCheck,
    BotDetectionMiddleware,
    CheckResult,
    ConfigurationError,
    ConvexStore,
    FingerprintMiddleware,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    KeyRoute,
    LimitRequest,
    MemoryStore,
    RateLimitMiddleware,
    RequestLoggerMiddleware,
    ResilientStore,
    Rule,
    report_usage,
)
from convex_guard.middleware.guard import GuardRunner

from .conftest import serve
from .e2e_checks import BROWSER, CHAT, GPTBOT, check_logs, create_key, exercise, settings_for


class CountingStore(MemoryStore):
    """Counts every store call a request makes (log batches excepted: they are not per request)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        self.calls.append("check")
        return await super().check(limits, bot=bot)

    async def limit(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("limit")
        return await super().limit(*args, **kwargs)

    async def find_api_key(self, key_hash: str) -> Any:
        self.calls.append("find_api_key")
        return await super().find_api_key(key_hash)

    async def count_bot_events(self, fingerprint: str, since: float) -> int:
        self.calls.append("count_bot_events")
        return await super().count_bot_events(fingerprint, since)


# -- the example gateway, end to end -------------------------------------------------------------


def test_gateway_end_to_end_under_uvicorn() -> None:
    store = MemoryStore()
    key = create_key(store)
    app = create_app(settings_for(store), upstream=None)
    with serve(app, proxy_headers=False) as server:
        exercise(server.url, key)
    # Stopping the server ran the lifespan shutdown, which flushed the shared writer.
    check_logs(store, key, bad_json="invalid_body:json")


def test_starlette_app_with_guard_middleware() -> None:
    async def chat(request: Request) -> JSONResponse:
        report_usage(request, model="m1", tokens=7)
        return JSONResponse({"ok": True})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    store = MemoryStore()
    app = Starlette(
        routes=[
            Route("/api/ai/{provider}/chat", chat, methods=["POST"]),
            Route("/api/embeddings", chat, methods=["POST"]),
            Route("/health", health),
        ],
        middleware=[Middleware(GuardMiddleware, settings=settings_for(store))],
    )
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        ok = c.post("/api/ai/groq/chat", json=CHAT, headers={"user-agent": BROWSER})
        assert ok.status_code == 200 and '"groqRequests";r=299;' in ok.headers["RateLimit"]
        assert c.post("/api/ai/groq/chat", headers={"user-agent": GPTBOT}).status_code == 403
        codes = [c.post("/api/ai/perplexity/chat").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        assert c.post("/api/embeddings").status_code == 401
        assert c.get("/health", headers={"user-agent": GPTBOT}).status_code == 200
    rows = store.ai_logs
    assert [(r.provider, r.model, r.tokens_used) for r in rows[:1]] == [("groq", "m1", 7)]
    limited = "rate_limited:perplexityRequests"
    assert [r.error for r in rows] == [None, "bot_blocked", None, None, None, limited]
    assert [r.error for r in store.embedding_logs] == ["api_key_missing"]


def test_fastapi_keyword_options_and_defaults() -> None:
    from fastapi import FastAPI

    store = MemoryStore()
    app = FastAPI()
    app.add_middleware(GuardMiddleware, store=store, exempt_paths=["/health", "/metrics"])

    @app.post("/api/ai/{provider}/chat")
    async def chat(provider: str) -> dict[str, str]:
        return {"provider": provider}

    @app.get("/metrics")
    async def metrics() -> dict[str, str]:
        return {"ok": "yes"}

    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        ok = c.post("/api/ai/ollama/chat")
        # The preset's limits: ollama 1000 a minute (fixed window), user limit skipped (anonymous).
        assert '"ollamaRequests";q=1000;w=60' in ok.headers["RateLimit-Policy"]
        assert "userAIRequests" not in ok.headers["RateLimit-Policy"]
        assert c.get("/metrics", headers={"user-agent": GPTBOT}).status_code == 200


# -- one round trip --------------------------------------------------------------------------------


def test_whole_stack_costs_one_round_trip() -> None:
    store = CountingStore()
    app = create_app(settings_for(store), upstream=None)
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        for agent in (BROWSER, "Googlebot/2.1 (+http://www.google.com/bot.html)", GPTBOT):
            before = len(store.calls)
            c.post("/api/ai/openai/chat", json=CHAT, headers={"user-agent": agent})
            assert store.calls[before:] == ["check"], agent
        before = len(store.calls)
        assert c.get("/health").status_code == 200
        assert store.calls[before:] == []


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_the_writer_is_shared_and_flushed_at_shutdown() -> None:
    store = MemoryStore()
    inner = Starlette(routes=[Route("/api/ai/{p}/chat", health, methods=["POST"])])
    guard = GuardMiddleware(inner, settings=GuardSettings(store=store, writer_interval=60))
    single = guard.guard.app
    assert isinstance(single, GuardRunner)
    stack = logger_mw = single.stacked
    assert isinstance(logger_mw, RequestLoggerMiddleware)
    layers: list[Any] = []
    layer: Any = stack
    while hasattr(layer, "app"):
        layers.append(layer)
        layer = layer.app
    assert [type(x).__name__ for x in layers] == [
        "RequestLoggerMiddleware",
        "FingerprintMiddleware",
        "ApiKeyMiddleware",
        "BotDetectionMiddleware",
        "RateLimitMiddleware",
        "RequestValidationMiddleware",
        "_Answering",  # validation's wrapper of the app: a streamed body's 413
    ]
    assert layers[2].writer is logger_mw.writer is guard.writer is layers[5].writer
    assert layers[3].defer is True
    # HTTP requests take the same middlewares' steps in one loop; lifespan goes down the stack.
    assert list(single.steps) == layers[:-1]
    with serve(guard, proxy_headers=False) as server:
        httpx.post(server.url + "/api/ai/openai/chat")
        # A 60 s interval: nothing is written until shutdown.
        assert store.ai_logs == []
    assert len(store.ai_logs) == 1


# -- settings --------------------------------------------------------------------------------------


def test_settings_validation() -> None:
    # Not raised: kept, to refuse the start-up (tests/test_startup.py).
    failed = GuardMiddleware(PlainTextResponse("x"), stor=MemoryStore())
    assert "Unknown GuardMiddleware option" in str(failed.error)
    with pytest.raises(ConfigurationError, match=r"Unknown convex-guard setting.*'rule'"):
        GuardSettings.from_mapping({"rule": []})
    with pytest.raises(ConfigurationError, match="timeout"):
        GuardSettings(timeout=0)
    with pytest.raises(ConfigurationError, match="store"):
        GuardSettings(store="redis")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        GuardSettings(trusted_proxies="10.0.0.1")
    assert GuardSettings.from_mapping({"timeout": 1.0}).timeout == 1.0


def test_store_from_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("CONVEX_SELF_HOSTED_URL", "CONVEX_URL"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING):
        memory = GuardMiddleware(PlainTextResponse("x"))
    assert isinstance(memory.store, MemoryStore)
    warnings = [r.getMessage() for r in caplog.records if "in-memory store" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "per process" in warnings[0]

    monkeypatch.setenv("CONVEX_SELF_HOSTED_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", "secret-admin-key")
    convex = GuardMiddleware(PlainTextResponse("x"))
    # The deployment comes wrapped: bounded calls, a circuit breaker, local limits in an outage.
    assert isinstance(convex.store, ResilientStore)
    assert isinstance(convex.store.primary, ConvexStore)
    assert "secret-admin-key" not in repr(convex.store)
    asyncio.run(convex.store.close())


# -- order checks at start-up ----------------------------------------------------------------------


async def run_lifespan(app: ASGIApp) -> list[Message]:
    """Drive an app's lifespan startup (and shutdown, if it started) like a server would."""
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            await incoming.put({"type": "lifespan.shutdown"})

    await incoming.put({"type": "lifespan.startup"})
    with contextlib.suppress(ConfigurationError):
        await app({"type": "lifespan", "state": {}}, incoming.get, send)
    return sent


# A middleware class and its options.
Layer = tuple[Callable[..., ASGIApp], dict[str, Any]]


def stacked(*layers: Layer) -> ASGIApp:
    """Starlette with `layers` listed outermost first."""
    return Starlette(routes=[], middleware=[Middleware(cls, **kw) for cls, kw in layers])


STORE = MemoryStore()
KEYED_RULE = Rule("perKey", FixedWindow(rate=10, period=HOUR), key="api_key", path="/api")
FP_RULE = Rule("perFp", FixedWindow(rate=10, period=HOUR), key="fingerprint", path="/api")
KEYS: Layer = (ApiKeyMiddleware, {"store": STORE, "routes": [KeyRoute("/api")]})
FP: Layer = (FingerprintMiddleware, {})
BOT: Layer = (BotDetectionMiddleware, {"store": STORE})


@pytest.mark.parametrize(
    ("layers", "needle"),
    [
        ([BOT, FP], "BotDetectionMiddleware escalates per fingerprint"),
        ([(RateLimitMiddleware, {"store": STORE, "rules": [KEYED_RULE]}), KEYS], "'api_key'"),
        ([(RateLimitMiddleware, {"store": STORE, "rules": [FP_RULE]})], "add Fingerprint"),
        ([FP, (BotDetectionMiddleware, {"store": STORE, "defer": True})], "defer=True"),
    ],
)
def test_an_order_that_cannot_work_fails_startup(layers: list[Layer], needle: str) -> None:
    sent = asyncio.run(run_lifespan(stacked(*layers)))
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert needle in sent[0]["message"]
    assert "outside" in sent[0]["message"] or "inside" in sent[0]["message"]


@pytest.mark.parametrize(
    "layers",
    [
        [FP, BOT],
        [KEYS, (RateLimitMiddleware, {"store": STORE, "rules": [KEYED_RULE]})],
        [FP, (RateLimitMiddleware, {"store": STORE, "rules": [FP_RULE]})],
        [
            FP,
            (BotDetectionMiddleware, {"store": STORE, "defer": True}),
            (RateLimitMiddleware, {"store": STORE, "rules": [FP_RULE]}),
        ],
    ],
)
def test_a_working_order_starts(layers: list[Layer]) -> None:
    sent = asyncio.run(run_lifespan(stacked(*layers)))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_uvicorn_refuses_to_start_a_wrong_order() -> None:
    app = stacked(BOT, FP)  # fingerprint inside the bot check: too late
    with pytest.raises(RuntimeError, match="did not start"), serve(app):
        pass


def test_guard_middleware_starts_cleanly() -> None:
    sent = asyncio.run(run_lifespan(GuardMiddleware(Starlette(), store=MemoryStore())))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_parts_can_be_turned_off() -> None:
    guard = GuardMiddleware(
        Starlette(),
        store=MemoryStore(),
        rules=(),
        key_routes=(),
        bot_detection=False,
        body_rules=(),
    )
    layers = []
    layer: Any = guard.guard.app.stacked
    while hasattr(layer, "writer") or hasattr(layer, "trusted"):
        layers.append(type(layer).__name__)
        layer = layer.app
    assert layers == ["RequestLoggerMiddleware", "FingerprintMiddleware"]
    sent = asyncio.run(run_lifespan(guard))
    assert sent[0]["type"] == "lifespan.startup.complete"


def test_bot_detection_without_rules_decides_on_its_own() -> None:
    store = CountingStore()
    guard = GuardMiddleware(Starlette(), store=store, rules=())
    bot = guard.guard.bots
    assert isinstance(bot, BotDetectionMiddleware) and bot.defer is False
    with serve(guard, proxy_headers=False) as server:
        blocked = httpx.post(server.url + "/api/ai/openai/chat", headers={"user-agent": GPTBOT})
    assert blocked.status_code == 403 and store.calls == ["check"]
