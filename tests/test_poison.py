"""Numbers and strings from the app, the upstream and the client: none stops the request log,
grows it without bound, forges a log line, or costs a traceback."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from examples.gateway import create_app
from examples.responder import Upstream
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from convex_guard import (
    ApiKeys,
    ConvexStore,
    GuardMiddleware,
    GuardSettings,
    MemoryStore,
    ResilientStore,
    StoreError,
    StoreUnavailableError,
)
from convex_guard.core.logs import printable
from convex_guard.middleware.context import guard_context
from convex_guard.middleware.logger import RequestLoggerMiddleware, report_usage
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.stores.base import AIRequestLog, LogBatch
from convex_guard.stores.convex import _ai_log

from .conftest import ConvexTestServer, serve
from .e2e_checks import BROWSER, CHAT, settings_for


def ai_row(i: float, *, tokens: Any = None, cost: Any = None) -> AIRequestLog:
    return AIRequestLog(
        timestamp=float(i),
        provider="openai",
        model="m",
        fingerprint="f",
        ip="127.0.0.1",
        success=True,
        latency_ms=1.0,
        tokens_used=tokens,
        cost=cost,
    )


@contextmanager
def captured(*names: str, level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Every record of the named loggers (uvicorn's do not reach the root logger)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level)
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
    try:
        yield records
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(old)


# -- item 7: numbers the app reports -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "values"),
    [
        ("tokens", {"tokens": 10**400}),
        ("tokens", {"tokens": 10**12 + 1}),
        ("tokens", {"tokens": -1}),
        ("tokens", {"tokens": True}),
        ("tokens", {"tokens": 1.5}),
        ("tokens", {"tokens": "7"}),
        ("cost", {"cost": math.nan}),
        ("cost", {"cost": math.inf}),
        ("cost", {"cost": 10**400}),
        ("cost", {"cost": 1e9 * 1.01}),
        ("cost", {"cost": -0.01}),
        ("cost", {"cost": True}),
        ("items", {"items": 2.0}),
        ("items", {"items": 10**400}),
        ("model", {"model": "m" * 257}),
        ("model", {"model": "gpt\n\x1b[31m"}),
        ("model", {"model": 4}),
    ],
)
def test_report_usage_refuses_poison_naming_the_argument(
    argument: str, values: dict[str, Any]
) -> None:
    scope: dict[str, Any] = {"type": "http"}
    with pytest.raises(ValueError, match=argument):
        report_usage(scope, **values)
    assert guard_context(scope).usage is None  # nothing half-recorded


def test_report_usage_takes_the_documented_caps() -> None:
    scope: dict[str, Any] = {"type": "http"}
    report_usage(scope, model="m" * 256, tokens=10**12, cost=10**9, items=10**9)
    usage = guard_context(scope).usage
    assert usage is not None
    assert (usage.model, usage.tokens, usage.cost, usage.items) == ("m" * 256, 10**12, 1e9, 10**9)
    assert type(usage.cost) is float


# -- item 7: the writer splits out what the store refuses as invalid ---------------------------


class SerialisingStore(MemoryStore):
    """Refuses a whole batch for one bad row, as ConvexStore does (one mutation, its own
    serialiser); `down` calls first fail as an unreachable store."""

    def __init__(self, down: int = 0) -> None:
        super().__init__()
        self.down = down
        self.calls: list[str] = []

    async def write_logs(self, batch: LogBatch) -> None:
        self.calls.append(batch.id)
        if self.down:
            self.down -= 1
            raise StoreUnavailableError("unreachable")
        for row in batch.ai_requests:
            _ai_log(row)
        await super().write_logs(batch)


async def test_a_bad_row_is_split_out_and_the_rest_written_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SerialisingStore(down=3)
    writer = LogWriter(store, batch_size=100, interval=0.01, shutdown_timeout=5)
    bad: dict[int, dict[str, float]] = {
        13: {"tokens": 10**400},
        77: {"cost": math.nan},
        78: {"tokens": math.inf},
    }
    for i in range(100):
        writer.add(ai_row(i, **bad.get(i, {})))
    writer.record_key_usage("no-such-key", 5.0)
    with caplog.at_level(logging.WARNING, logger="convex_guard"):
        await writer.close()
    assert [row.timestamp for row in store.ai_logs] == [i for i in range(100) if i not in bad]
    assert (writer.rejected, writer.dropped, writer.buffered) == (3, 0, 0)
    # Unreachable: the same batch (same id) retried; refused as invalid: split, new ids.
    assert store.calls[:4] == [store.calls[0]] * 4
    assert len(set(store.calls[3:])) == len(store.calls[3:]) < 40
    refused = [r for r in caplog.records if "refused a AI request row as invalid" in r.message]
    assert len(refused) == 1  # throttled: once, however many rows


async def test_a_split_cut_short_resumes_its_parts_never_the_whole() -> None:
    store = SerialisingStore()
    writer = LogWriter(store, batch_size=8, interval=30, shutdown_timeout=5)
    for i in range(8):
        writer.add(ai_row(i, tokens=10**400 if i == 5 else 1))
    real = store.write_logs
    calls = 0
    third = asyncio.Event()

    async def slow_after_two(batch: LogBatch) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()
            await asyncio.sleep(30)  # the flush is cancelled here, mid-split
        await real(batch)

    store.write_logs = slow_after_two  # type: ignore[method-assign]
    flush = asyncio.ensure_future(writer.flush())
    await third.wait()
    flush.cancel()
    store.write_logs = real  # type: ignore[method-assign]
    await writer.close()
    assert [row.timestamp for row in store.ai_logs] == [0, 1, 2, 3, 4, 6, 7]
    assert writer.rejected == 1


async def test_log_writes_never_trip_the_request_breaker() -> None:
    class DownForLogs(MemoryStore):
        async def write_logs(self, batch: LogBatch) -> None:
            if batch.id == "bad":
                raise OverflowError("int too large to convert to float")
            raise StoreUnavailableError("log table unreachable")

    store = ResilientStore(DownForLogs(), use_fallback=False)
    for _ in range(10):
        with pytest.raises(StoreError):
            await store.write_logs(LogBatch(id="x"))
    # A bad batch is raised as it is, for the writer to tell it from an outage.
    with pytest.raises(OverflowError):
        await store.write_logs(LogBatch(id="bad"))
    assert store.breaker.state == "closed"
    assert await store.find_api_key("0" * 64) is None


async def test_memory_provider_stats_survive_whatever_was_stored() -> None:
    store = MemoryStore()
    rows = [
        ai_row(1, tokens=10, cost=0.5),
        ai_row(2, tokens=math.nan, cost=math.inf),
        ai_row(3, tokens=10**400, cost=10**400),
        ai_row(4, tokens=-7, cost=-1.0),
    ]
    await store.write_logs(LogBatch(id="b", ai_requests=rows))
    stats = await store.provider_stats("openai", 0, 10)
    assert (stats.total_requests, stats.total_tokens, stats.total_cost) == (4, 10, 0.5)
    assert math.isfinite(stats.average_latency)


@pytest.mark.slow
def test_a_poison_row_costs_neither_the_log_nor_keyed_requests(
    convex_server: ConvexTestServer,
) -> None:
    """Rows that skipped `report_usage` (written to the writer directly) on Convex: the rest
    lands, nothing retries forever, and keyed requests never see the log's trouble."""
    convex_server.reset()
    keys = asyncio.run(_create_keys(convex_server, 8))
    store = ResilientStore(ConvexStore(convex_server.url, convex_server.admin_key), timeout=2)

    async def chat(request: Request) -> JSONResponse:
        report_usage(request, model="gpt-4o-mini", tokens=12, cost=0.001)
        return JSONResponse({"ok": True})

    async def poison(request: Request) -> PlainTextResponse:
        guard.writer.add(ai_row(time.time() * 1000, tokens=10**400))
        guard.writer.add(ai_row(time.time() * 1000, cost=math.nan))
        return PlainTextResponse("poisoned")

    inner = Starlette(
        routes=[
            Route("/api/ai/openai/chat", chat, methods=["POST"]),
            Route("/poison", poison, methods=["POST"]),
        ]
    )
    guard = GuardMiddleware(
        inner, settings=GuardSettings(store=store, writer_interval=0.05, writer_max_backoff=0.2)
    )
    with serve(guard) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.post("/poison").status_code == 200
        time.sleep(0.6)  # the writer meets the poison: long enough to open a breaker thrice
        statuses = [
            c.post(
                "/api/ai/openai/chat",
                json=CHAT,
                headers={"user-agent": BROWSER, "authorization": f"Bearer {key}"},
            ).status_code
            for key in keys
        ]
    assert statuses == [200] * len(keys)
    assert guard.writer.rejected == 2 and guard.writer.buffered == 0
    assert store.breaker.state == "closed"
    rows = convex_server.rows("aiRequestLogs")
    assert len(rows) == len(keys) and all(row["success"] for row in rows)
    stats = asyncio.run(_provider_stats(convex_server))
    assert (stats.total_requests, stats.total_tokens) == (len(keys), 12 * len(keys))


async def _create_keys(server: ConvexTestServer, count: int) -> list[str]:
    store = ConvexStore(server.url, server.admin_key)
    try:
        return [(await ApiKeys(store).create(f"k{i}")).key for i in range(count)]
    finally:
        await store.close()


async def _provider_stats(server: ConvexTestServer) -> Any:
    store = ConvexStore(server.url, server.admin_key)
    try:
        return await store.provider_stats("openai", 0, time.time() * 1000 + 60_000)
    finally:
        await store.close()


# -- item 7: numbers an upstream answers -----------------------------------------------------

#: `usage.total_tokens` as an upstream might write it; every one is "unknown".
UNKNOWN_TOKENS = ["", "-5", "1.5", "NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400]
UNKNOWN_TOKENS += ['"77"', "true", "null", "10000000000001"]


def stub_upstream(literals: list[str]) -> Starlette:
    """An OpenAI-style upstream: for model `case<i>`, `usage.total_tokens` is `literals[i]`
    (no usage at all for ""), with an unprintable model and numbers JSON has no room for."""

    async def completions(request: Request) -> Response:
        literal = literals[int((await request.json())["model"].removeprefix("case"))]
        usage = ""
        if literal:
            usage = ', "usage": {"total_tokens": ' + literal + ', "prompt_tokens": NaN}'
        body = (
            '{"model": "up\\u001b[31m", "choices": [{"message": {"role": "assistant", '
            '"content": "hi"}}], "score": 1e999' + usage + "}"
        )
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def test_an_upstreams_numbers_are_checked_never_a_500(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    literals = [*UNKNOWN_TOKENS, "77"]
    with serve(stub_upstream(literals)) as upstream:
        target = Upstream(upstream.url + "/v1", None, timeout=5)
        app = create_app(settings_for(store), upstream=target)
        with (
            caplog.at_level(logging.INFO),
            serve(app, proxy_headers=False) as server,
            httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}) as c,
        ):
            answers = [
                c.post("/api/ai/groq/chat", json={**CHAT, "model": f"case{i}"})
                for i in range(len(literals))
            ]
    assert [a.status_code for a in answers] == [200] * len(literals)
    assert all(a.json()["score"] is None for a in answers)  # passed on as JSON, never NaN
    rows = sorted(store.ai_logs, key=lambda row: row.timestamp)
    assert [(r.tokens_used, r.cost) for r in rows[:-1]] == [(None, None)] * len(UNKNOWN_TOKENS)
    assert rows[-1].tokens_used == 77 and rows[-1].cost is not None
    # The upstream's unprintable model is not believed: the request's own is logged.
    assert [r.model for r in rows] == [f"case{i}" for i in range(len(literals))]
    assert sum("logged as unknown" in r.message for r in caplog.records) == len(UNKNOWN_TOKENS)


def test_an_unprintable_model_is_a_422_never_a_500() -> None:
    store = MemoryStore()
    app = create_app(settings_for(store), upstream=None)
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        answers = [
            c.post("/api/ai/openai/chat", json={**CHAT, "model": model}, headers=BROWSER_UA)
            for model in ("gpt\n4", "gpt\x1b[31m", "gpt\u2028")
        ]
    assert [a.status_code for a in answers] == [422] * 3
    assert [r.error for r in store.ai_logs] == ["http_422"] * 3


BROWSER_UA = {"user-agent": BROWSER}


# -- item 8: providers are a closed set ---------------------------------------------------------


def raw_get(port: int, paths: list[str]) -> list[int]:
    """GET each path on one keep-alive connection (httpx spends ms parsing a 60 kB URL)."""
    statuses = []
    with socket.create_connection(("127.0.0.1", port)) as sock, sock.makefile("rb") as answers:
        for path in paths:
            request = f"GET {path} HTTP/1.1\r\nHost: t\r\nUser-Agent: {BROWSER}\r\n\r\n"
            sock.sendall(request.encode())
            statuses.append(int(answers.readline().split()[1]))
            length = 0
            while (line := answers.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answers.read(length)
    return statuses


def stored_chars(store: MemoryStore) -> int:
    """Characters held by every string of every stored row."""
    total = 0
    for row in [*store.ai_logs, *store.embedding_logs, *store.auth_failures]:
        total += sum(len(value) for value in vars_of(row) if isinstance(value, str))
    return total


def vars_of(row: Any) -> list[Any]:
    return [getattr(row, name) for name in row.__slots__]


@pytest.mark.slow
def test_made_up_providers_are_logged_as_other_and_stay_bounded() -> None:
    store = MemoryStore()

    async def chat(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/ai/{provider}/chat", chat)])
    app.add_middleware(
        GuardMiddleware,
        settings=GuardSettings(store=store, writer_interval=0.05, writer_max_buffer=5_000),
    )
    paths = [f"/api/ai/{i:05d}{'p' * 60_000}/chat" for i in range(2_000)]
    with serve(app) as server:
        statuses = raw_get(server.port, [*paths, "/api/ai/openai/chat"])
    # The preset's 1000 an hour per IP: half are refused, and logged alike.
    assert statuses.count(200) == 1_000 and statuses.count(429) == 1_001
    rows = store.ai_logs
    assert len(rows) == 2_001
    assert [r.provider for r in rows] == ["other"] * 2_000 + ["openai"]
    for i, r in enumerate(rows[:2_000]):
        assert r.error is not None and r.error.endswith(f"provider:{i:05d}{'p' * 59}…")
    assert sum(r.error.startswith("rate_limited:ipAIRequests") for r in rows if r.error) == 1_001
    assert stored_chars(store) < 2_001 * 300  # 120 MB of names, were they kept


def test_made_up_providers_make_one_rollup_on_convex(convex_server: ConvexTestServer) -> None:
    convex_server.reset()
    store = ConvexStore(convex_server.url, convex_server.admin_key)

    async def chat(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = GuardMiddleware(
        Starlette(routes=[Route("/api/ai/{provider}/chat", chat)]),
        settings=GuardSettings(store=store, writer_interval=0.05),
    )
    paths = [f"/api/ai/{i:03d}{'q' * 60_000}/chat" for i in range(20)]
    with serve(app) as server:
        assert raw_get(server.port, paths) == [200] * 20
    rows = convex_server.rows("aiRequestLogs")
    assert len(rows) == 20 and {row["provider"] for row in rows} == {"other"}
    assert max(len(row["error"]) for row in rows) < 100
    for table in ("providerRollups", "providerHourlyRollups"):
        assert {row["provider"] for row in convex_server.rows(table)} == {"other"}


def test_providers_setting_and_a_custom_resolvers_names() -> None:
    with pytest.raises(ValueError, match="providers"):
        GuardSettings(providers="openai")
    store = MemoryStore()

    async def chat(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/ai/{provider}/chat", chat), Route("/v1/{name}", chat)])
    guarded = GuardMiddleware(
        app, settings=GuardSettings(store=store, providers=["mine"], writer_interval=0.05)
    )
    custom = RequestLoggerMiddleware(
        app, store=MemoryStore(), provider=lambda scope: scope["path"].rsplit("/", 1)[-1] or None
    )
    with serve(guarded) as a, serve(custom) as b:
        httpx.get(a.url + "/api/ai/mine/chat")
        httpx.get(a.url + "/api/ai/openai/chat")
        httpx.get(b.url + "/v1/short")
        httpx.get(b.url + "/v1/" + "x" * 65)
    assert [(r.provider, r.error) for r in store.ai_logs] == [
        ("mine", None),
        ("other", "provider:openai"),
    ]
    logged = custom.writer.store
    assert isinstance(logged, MemoryStore)
    assert [(r.provider, r.error) for r in logged.ai_logs] == [
        ("short", None),
        ("other", "provider:" + "x" * 64 + "…"),
    ]


# -- item 9: log injection ---------------------------------------------------------------------


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_printable_escapes_and_bounds_any_text(text: str, limit: int) -> None:
    logged = printable(text, limit)
    assert logged.isprintable() and len(logged) <= limit + 1
    if text.isprintable() and len(text) <= limit:
        assert logged == text
    else:
        assert logged != text and (logged.endswith("…") or "\\" in logged)
    assert printable(logged, limit + 1) == logged  # escaping twice changes nothing more


FORGED = "/api/ai/x%0aCRITICAL%20forged%1b[31m"


class NoLimits(MemoryStore):
    async def check(self, limits: Any, *, bot: Any = None) -> Any:
        raise StoreError("limits unavailable")


def test_request_text_cannot_forge_log_lines() -> None:
    seen: list[str] = []

    async def chat(request: Request) -> PlainTextResponse:
        seen.append(request.scope["path"])
        await request.body()
        return PlainTextResponse("ok")

    store = NoLimits()
    unknown_key = asyncio.run(ApiKeys(MemoryStore()).create("elsewhere")).key
    app = GuardMiddleware(
        Starlette(routes=[Route("/api/ai/{p}", chat, methods=["GET", "POST"])]),
        settings=GuardSettings(store=store, writer_interval=0.05),
    )
    with captured("convex_guard") as records, serve(app) as server:
        with httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}) as c:
            malformed = c.get(FORGED, headers={"authorization": "Bearer not%20a%20key!"})
            unknown = c.get(FORGED, headers={"authorization": f"Bearer {unknown_key}"})
            anonymous = c.get(FORGED)
        partial_body(server.port, FORGED)
    assert (malformed.status_code, unknown.status_code, anonymous.status_code) == (401, 401, 200)
    assert seen and "\n" in seen[0] and "\x1b" in seen[0]  # the app did get the raw path
    messages = [record.getMessage() for record in records]
    quoting = [m for m in messages if "x\\nCRITICAL forged\\x1b[31m" in m]
    assert len(quoting) >= 4, messages  # malformed key, unknown key, store, disconnect
    assert not [m for m in messages if "\n" in m or "\x1b" in m]


# -- item 19: a client gone mid-body -----------------------------------------------------------


def partial_body(port: int, path: str = "/api/ai/openai/chat") -> None:
    """Promise 1000 bytes of body, send 10, and go away."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nUser-Agent: {BROWSER}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"model":'.encode()
        )
        time.sleep(0.05)


@pytest.mark.parametrize("stack", ["guard", "stacked"])
def test_client_disconnects_mid_body_are_one_debug_line_each(stack: str) -> None:
    store = MemoryStore()
    if stack == "guard":
        app: Any = create_app(settings_for(store), upstream=None)
    else:

        async def chat(request: Request) -> PlainTextResponse:
            await request.body()
            return PlainTextResponse("ok")

        app = RequestLoggerMiddleware(
            Starlette(routes=[Route("/api/ai/openai/chat", chat, methods=["POST"])]),
            store=store,
            writer=LogWriter(store, interval=0.05),
        )
    # Attached once uvicorn has configured its loggers (which drops their handlers).
    with serve(app) as server, captured("uvicorn.error", "") as records:
        for _ in range(20):
            partial_body(server.port)
        deadline = time.monotonic() + 10
        while len(store.ai_logs) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # uvicorn reports an exception after the row is written
    loud = [r for r in records if r.levelno >= logging.WARNING]
    assert not loud, [(r.getMessage(), bool(r.exc_info)) for r in loud]
    gone = [r for r in records if r.getMessage().startswith("Client disconnected mid-request")]
    assert len(gone) == 20 and all(r.levelno == logging.DEBUG for r in gone)
    assert [r.error for r in store.ai_logs] == ["ClientDisconnect"] * 20
