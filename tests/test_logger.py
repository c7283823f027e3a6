"""LogWriter and RequestLoggerMiddleware: batches, retries in order, shutdown flush, overflow."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Scope

from convex_guard import MemoryStore, StoreError
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.keys import NO_KEY
from convex_guard.middleware.apikeys import ApiKeyMiddleware, KeyRoute
from convex_guard.middleware.context import guard_context
from convex_guard.middleware.logger import RequestLoggerMiddleware, report_usage
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.stores.base import AIRequestLog, AuthFailure, LogBatch, Store
from convex_guard.stores.keys import ApiKeys

from .conftest import serve


def row(i: int, provider: str = "openai") -> AIRequestLog:
    return AIRequestLog(
        timestamp=float(i),
        provider=provider,
        model="m",
        fingerprint="f",
        ip="1.2.3.4",
        success=True,
        latency_ms=1.0,
    )


class FlakyStore(MemoryStore):
    """Refuses `fail` writes; with `lose_answers`, it writes first and then raises anyway."""

    def __init__(self, fail: int, *, lose_answers: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.lose_answers = lose_answers
        self.calls: list[str] = []

    async def write_logs(self, batch: LogBatch) -> None:
        self.calls.append(batch.id)
        if self.fail > 0:
            self.fail -= 1
            if self.lose_answers:
                await super().write_logs(batch)
            raise StoreError("store is down")
        await super().write_logs(batch)


@pytest.mark.parametrize("lose_answers", [False, True])
async def test_rows_arrive_once_and_in_order_across_an_outage(
    lose_answers: bool, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(fail=6, lose_answers=lose_answers)
    writer = LogWriter(store, batch_size=7, interval=0.01, max_backoff=0.02)
    await writer.start()
    for i in range(50):
        writer.add(row(i))
        if i % 5 == 0:
            await asyncio.sleep(0.005)
    await writer.close()
    assert [r.timestamp for r in store.ai_logs] == [float(i) for i in range(50)]
    # Retries reuse the batch id: the failed calls are repeats of the batch that then landed.
    failed, landed = store.calls[:6], store.calls[6:]
    assert len(set(failed)) == 1 and landed[0] == failed[0]
    assert len(set(landed)) == len(landed)
    assert writer.dropped == 0 and writer.buffered == 0
    assert "store refused a batch" in caplog.text


async def test_batches_respect_size_and_interval() -> None:
    store = FlakyStore(fail=0)
    writer = LogWriter(store, batch_size=10, interval=0.05)
    await writer.start()
    for i in range(25):
        writer.add(row(i))
    await asyncio.sleep(0.2)
    assert len(store.ai_logs) == 25  # the last 5 went out on the interval
    assert len(store.calls) == 3
    await writer.close()


async def test_overflow_is_counted_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore(fail=10**9)  # down for good
    writer = LogWriter(store, batch_size=10, max_buffer=30, shutdown_timeout=0.2)
    for i in range(45):
        writer.add(row(i))
    assert writer.dropped == 15
    assert writer.buffered == 30
    assert "Log buffer full" in caplog.text
    assert caplog.text.count("Log buffer full") == 1  # throttled, not one line per row
    await writer.close()  # the store never recovers: bounded, and the loss is counted
    assert writer.dropped == 45 and writer.buffered == 0
    assert "rows lost" in caplog.text


async def test_key_usage_is_summed_per_key() -> None:
    store = MemoryStore(clock=lambda: 0.0)
    created = await ApiKeys(store, clock=lambda: 0.0).create("k")
    writer = LogWriter(store)
    for when in (5.0, 9.0, 7.0):
        writer.record_key_usage(created.record.id, when)
    writer.add(AuthFailure(key_hash=NO_KEY, timestamp=1.0))
    assert writer.buffered == 2
    await writer.flush()
    record = await store.find_api_key(created.record.key_hash)
    assert record is not None and record.request_count == 3 and record.last_used == 9.0
    assert writer.batches_written == 1


def test_shared_writer_per_store_and_bad_options() -> None:
    store = MemoryStore()
    assert LogWriter.for_store(store) is LogWriter.for_store(store)
    assert LogWriter.for_store(store) is not LogWriter.for_store(MemoryStore())
    with pytest.raises(ConfigurationError):
        LogWriter(store, batch_size=0)
    with pytest.raises(ConfigurationError):
        LogWriter(store, batch_size=10, max_buffer=5)
    with pytest.raises(ConfigurationError):
        LogWriter(store, interval=0)


# -- the middleware through uvicorn --------------------------------------------------------------
async def chat(request: Request) -> JSONResponse:
    report_usage(request, model="gpt-4o-mini", tokens=42, cost=0.0021)
    return JSONResponse({"ok": True})


async def embed(request: Request) -> JSONResponse:
    report_usage(request.scope, model="nomic-embed", tokens=30, items=3)
    return JSONResponse({"ok": True})


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("app bug")


async def missing(request: Request) -> PlainTextResponse:
    return PlainTextResponse("no", status_code=404)


async def rejected(request: Request) -> PlainTextResponse:
    guard_context(request.scope).rejected = "rate_limited:ipAIRequests"
    return PlainTextResponse("slow down", status_code=429)


def make_app(store: Store, writer: LogWriter | None = None, **options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route("/api/ai/{provider}/chat", chat, methods=["POST"]),
            Route("/api/ai/{provider}/boom", boom),
            Route("/api/ai/{provider}/missing", missing),
            Route("/api/ai/{provider}/limited", rejected),
            Route("/api/embeddings", embed, methods=["POST"]),
            Route("/health", missing),
        ],
    )
    app.add_middleware(RequestLoggerMiddleware, store=store, writer=writer, **options)
    return app


def test_every_request_is_logged_with_its_outcome() -> None:
    store = MemoryStore()
    writer = LogWriter(store, interval=60)  # only the shutdown flush writes
    started = time.time() * 1000
    with serve(make_app(store, writer)) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/api/ai/openai/chat").status_code == 200
        assert c.get("/api/ai/groq/boom", headers={"Connection": "close"}).status_code == 500
        assert c.get("/api/ai/groq/missing").status_code == 404
        assert c.get("/api/ai/ollama/limited").status_code == 429
        assert c.post("/api/embeddings").status_code == 200
        assert c.get("/health").status_code == 404  # not an AI route: not logged
        assert store.ai_logs == []  # nothing written before the flush
    logs = store.ai_logs
    assert [(r.provider, r.success, r.error) for r in logs] == [
        ("openai", True, None),
        ("groq", False, "RuntimeError"),
        ("groq", False, "http_404"),
        ("ollama", False, "rate_limited:ipAIRequests"),
    ]
    first = logs[0]
    assert (first.model, first.tokens_used, first.cost, first.ip) == (
        "gpt-4o-mini",
        42,
        0.0021,
        "127.0.0.1",
    )
    assert all(r.latency_ms >= 0 for r in logs)
    # Every field lands in its own column (rows are built positionally on the hot path).
    ended = time.time() * 1000
    assert all(started <= r.timestamp <= ended for r in logs)
    assert all(r.latency_ms < ended - started for r in logs)
    assert first.fingerprint == "" and first.user_id is None  # no fingerprint middleware here
    assert logs[1].model == "unknown" and logs[1].tokens_used is None
    (embedding,) = store.embedding_logs
    assert (embedding.batch_size, embedding.tokens_used, embedding.model) == (3, 30, "nomic-embed")
    assert embedding.api_key_hash == NO_KEY and len(embedding.request_id) == 32
    assert embedding.success and embedding.error is None
    assert started <= embedding.timestamp <= ended and 0 <= embedding.latency_ms < ended - started


def test_shutdown_flushes_everything_through_the_lifespan() -> None:
    store = MemoryStore()
    writer = LogWriter(store, batch_size=7, interval=60)
    with serve(make_app(store, writer)) as server, httpx.Client(base_url=server.url) as c:
        for _ in range(30):
            c.post("/api/ai/openai/chat")
        # Full batches went out while serving; the remainder waits for shutdown.
        assert len(store.ai_logs) in (21, 28)
    assert len(store.ai_logs) == 30
    assert writer.buffered == 0


def test_shutdown_flush_with_an_app_without_lifespan_support() -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http", "no lifespan here"
        await PlainTextResponse("ok")(scope, receive, send)

    store = MemoryStore()
    writer = LogWriter(store, interval=60)
    app = RequestLoggerMiddleware(bare, store=store, writer=writer)
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        for _ in range(3):
            assert c.get("/api/ai/openai/x").status_code == 200
    assert len(store.ai_logs) == 3


def test_the_apps_own_lifespan_still_runs() -> None:
    seen: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        seen.append("startup")
        yield
        seen.append("shutdown")

    store = MemoryStore()
    app = Starlette(routes=[Route("/api/ai/{p}/chat", chat, methods=["POST"])], lifespan=lifespan)
    app.add_middleware(RequestLoggerMiddleware, store=store)
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        c.post("/api/ai/openai/chat")
    assert seen == ["startup", "shutdown"]
    assert len(store.ai_logs) == 1


def test_outage_during_serving_then_recovery_lands_every_row_once_in_order() -> None:
    store = FlakyStore(fail=5, lose_answers=True)
    writer = LogWriter(store, batch_size=4, interval=0.02, max_backoff=0.05)
    with serve(make_app(store, writer)) as server, httpx.Client(base_url=server.url) as c:
        for i in range(20):
            c.post("/api/ai/openai/chat", headers={"x-n": str(i)})
    timestamps = [r.timestamp for r in store.ai_logs]
    assert len(timestamps) == 20
    assert timestamps == sorted(timestamps)


def test_rejections_by_the_key_middleware_are_logged_with_the_key_hash() -> None:
    store = MemoryStore()
    keys = ApiKeys(store)
    created = asyncio.run(keys.create("emb", kind="embedding"))
    inner = Starlette(routes=[Route("/api/embeddings", embed, methods=["POST"])])
    app = RequestLoggerMiddleware(
        ApiKeyMiddleware(
            inner, store=store, routes=[KeyRoute("/api/embeddings", kind="embedding")]
        ),
        store=store,
    )
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        auth = {"Authorization": f"Bearer {created.key}"}
        assert c.post("/api/embeddings", headers=auth).status_code == 200
        assert c.post("/api/embeddings").status_code == 401
    ok, refused = store.embedding_logs
    assert ok.api_key_hash == created.record.key_hash and ok.success
    assert refused.api_key_hash == NO_KEY and refused.error == "api_key_missing"
    # The middlewares shared one writer: auth failure and key usage landed too.
    assert len(store.auth_failures) == 1
    record = asyncio.run(store.find_api_key(created.record.key_hash))
    assert record is not None and record.request_count == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda s: report_usage(s, tokens=-1),
        lambda s: report_usage(s, items=-1),
        lambda s: report_usage(s, cost=float("nan")),
    ],
)
def test_report_usage_rejects_bad_values(call: Callable[[dict[str, Any]], None]) -> None:
    with pytest.raises(ValueError):
        call({"type": "http"})


def test_custom_provider_resolver(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()

    def provider(scope: Any) -> str | None:
        return "custom" if scope["path"].startswith("/v1/") else None

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/v1/chat", hello), Route("/api/ai/openai/chat", hello)])
    app.add_middleware(RequestLoggerMiddleware, store=store, provider=provider)
    with (
        caplog.at_level(logging.WARNING),
        serve(app) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        c.get("/v1/chat")
        c.get("/api/ai/openai/chat")
    assert [r.provider for r in store.ai_logs] == ["custom"]


def test_the_default_resolver_is_read_per_route_and_one_of_your_own_per_request() -> None:
    """Logged or not, and as which provider, is kept per route where the path alone says it
    (the default resolver); a resolver of your own sees each request's scope."""

    def scope(path: str, provider: bytes) -> dict[str, Any]:
        return {"type": "http", "method": "GET", "path": path, "headers": [(b"x-p", provider)]}

    def logged(logger: RequestLoggerMiddleware, request: dict[str, Any]) -> str | None:
        ctx = guard_context(request)
        logger.before(request, None, ctx)  # type: ignore[arg-type]
        return None if ctx.log_entry is None else (ctx.log_entry.provider or "embedding")

    default = RequestLoggerMiddleware(None, store=MemoryStore())  # type: ignore[arg-type]
    assert logged(default, scope("/api/ai/openai/chat", b"")) == "openai"
    assert logged(default, scope("/api/ai/groq/chat", b"")) == "groq"
    assert logged(default, scope("/api/embeddings", b"")) == "embedding"
    assert logged(default, scope("/elsewhere", b"")) is None
    assert logged(default, scope("/api/ai/openai/chat", b"")) == "openai"  # as kept

    def from_header(request: Scope) -> str | None:
        return dict(request["headers"]).get(b"x-p", b"").decode() or None

    own = RequestLoggerMiddleware(
        None,  # type: ignore[arg-type]
        store=MemoryStore(),
        provider=from_header,
        providers=["a", "b"],
    )
    assert logged(own, scope("/v1/chat", b"a")) == "a"
    assert logged(own, scope("/v1/chat", b"b")) == "b"
    assert logged(own, scope("/v1/chat", b"")) is None
    assert own.applies_to(("GET", "/v1/chat")) and not default.applies_to(("GET", "/x"))
