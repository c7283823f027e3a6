"""Streamed answers through the guard on a real server: usage read off the stream, time to
first output, chunks passed on unbuffered, a client that goes away, bad usage events."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from convex_guard import (
    MINUTE,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    report_usage,
)
from convex_guard.core.streamusage import CHARS_PER_TOKEN, UsageReader
from convex_guard.middleware.logger import RequestLoggerMiddleware
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.stores.base import AIRequestLog

from .conftest import RunningServer, serve

USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
WORDS = [f"word{i} " for i in range(6)]
FIRST_DELAY = 0.15  # seconds before the first word: the time to first output
PATH = "/api/ai/openai/chat"


def sse(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def word(text: str) -> bytes:
    return sse({"model": "stream-model", "choices": [{"index": 0, "delta": {"content": text}}]})


class Gates:
    """Lets a test hold the app's stream until the client has seen what came before."""

    def __init__(self) -> None:
        self.after_first = threading.Event()
        self.sent_second = threading.Event()


async def streamed(request: Request) -> StreamingResponse:
    gates: Gates = request.app.state.gates
    mode = request.query_params.get("mode", "usage")

    async def body() -> AsyncIterator[bytes]:
        yield b": the stream opens\n\n"
        yield sse({"model": "stream-model", "choices": [{"delta": {"role": "assistant"}}]})
        await asyncio.sleep(FIRST_DELAY)
        yield word(WORDS[0])
        if mode == "gated":  # the next word only once the client has read the first
            assert await asyncio.to_thread(gates.after_first.wait, 5)
            gates.sent_second.set()
        if mode == "endless":
            while True:
                await asyncio.sleep(0.01)
                yield word("more ")
        for text in WORDS[1:]:
            yield word(text)
        if mode == "report":
            report_usage(request, tokens=999, model="reported-model")
        if mode == "bad":
            yield sse({"choices": [], "usage": {"total_tokens": -5}})
        elif mode == "split":
            for i, byte in enumerate(sse({"choices": [], "usage": USAGE}).replace(b"\n", b"\r\n")):
                yield bytes([byte])
                if i % 16 == 0:
                    await asyncio.sleep(0)
        elif mode != "nousage":
            yield sse({"choices": [], "usage": USAGE})
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def ticks(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"event: tick\ndata: {i}\n\n".encode()

    return StreamingResponse(body(), media_type="text/event-stream")


async def plain(request: Request) -> JSONResponse:
    return JSONResponse({"usage": USAGE})


def make_app(store: MemoryStore, *, stacked: bool = False) -> Any:
    app = Starlette(
        routes=[
            Route(PATH, streamed, methods=["POST"]),
            Route("/api/ai/openai/plain", plain),
            Route("/api/ai/openai/ticks", ticks),
        ]
    )
    app.state.gates = Gates()
    if stacked:  # the logger alone, as a middleware of its own
        return RequestLoggerMiddleware(app, store=store, writer=LogWriter(store, interval=0.02))
    settings = GuardSettings(store=store, rules=(), key_routes=(), writer_interval=0.02)
    return GuardMiddleware(app, settings=settings)


def starlette_of(app: Any) -> Starlette:
    """The Starlette app under the guard's layers (however many steps wrap it)."""
    while not isinstance(app, Starlette):
        app = app.app
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[RunningServer, MemoryStore, Gates]]:
    store = MemoryStore()
    app = make_app(store)
    with serve(app) as running:
        yield running, store, starlette_of(app).state.gates


def rows_after(store: MemoryStore, seen: int, want: int = 1) -> list[AIRequestLog]:
    deadline = time.monotonic() + 5
    while len(store.ai_logs) < seen + want:
        assert time.monotonic() < deadline, "the row was not written"
        time.sleep(0.01)
    return store.ai_logs[seen:]


def stream_once(
    server: RunningServer, mode: str, store: MemoryStore
) -> tuple[str, AIRequestLog, float]:
    seen = len(store.ai_logs)
    started = time.perf_counter()
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        client.stream("POST", PATH, params={"mode": mode}) as response,
    ):
        assert response.status_code == 200
        text = response.read().decode()
    elapsed = (time.perf_counter() - started) * 1000
    [row] = rows_after(store, seen)
    return text, row, elapsed


@pytest.mark.parametrize("mode", ["usage", "split"])
def test_usage_and_ttft_are_read_off_the_stream(
    server: tuple[RunningServer, MemoryStore, Gates], mode: str
) -> None:
    running, store, _ = server
    text, row, elapsed = stream_once(running, mode, store)
    assert text.endswith("data: [DONE]\n\n") and "word5" in text
    assert row.success and row.error is None and row.provider == "openai"
    assert row.tokens_used == 42
    assert row.model == "stream-model"
    assert row.ttft_ms is not None
    # The first word comes after FIRST_DELAY, the rest after it: ttft inside the latency.
    assert FIRST_DELAY * 1000 * 0.9 <= row.ttft_ms < row.latency_ms <= elapsed


def test_app_reported_usage_wins_over_the_stream(
    server: tuple[RunningServer, MemoryStore, Gates],
) -> None:
    running, store, _ = server
    _, row, _ = stream_once(running, "report", store)
    assert row.tokens_used == 999 and row.model == "reported-model"


def test_a_bad_usage_event_is_logged_and_the_text_estimated(
    server: tuple[RunningServer, MemoryStore, Gates], caplog: pytest.LogCaptureFixture
) -> None:
    running, store, _ = server
    with caplog.at_level(logging.WARNING, logger="convex_guard"):
        _, row, _ = stream_once(running, "bad", store)
    assert row.success and row.tokens_used == -(-len("".join(WORDS)) // CHARS_PER_TOKEN)
    assert any("usage.total_tokens" in r.getMessage() for r in caplog.records)


def test_a_stream_without_usage_gets_the_estimate(
    server: tuple[RunningServer, MemoryStore, Gates],
) -> None:
    running, store, _ = server
    _, row, _ = stream_once(running, "nousage", store)
    assert row.tokens_used == -(-len("".join(WORDS)) // CHARS_PER_TOKEN)


def test_chunks_pass_through_unbuffered(server: tuple[RunningServer, MemoryStore, Gates]) -> None:
    running, store, gates = server
    seen = len(store.ai_logs)
    with (
        httpx.Client(base_url=running.url, timeout=10) as client,
        client.stream("POST", PATH, params={"mode": "gated"}) as response,
    ):
        lines = response.iter_lines()
        for line in lines:
            if "word0" in line:
                break
        # The client has the first word while the app has not sent the second yet.
        assert not gates.sent_second.is_set()
        gates.after_first.set()
        rest = "\n".join(lines)
    assert gates.sent_second.is_set() and "word5" in rest
    [row] = rows_after(store, seen)
    assert row.tokens_used == 42


def test_a_client_gone_mid_stream_settles_what_was_sent(
    server: tuple[RunningServer, MemoryStore, Gates],
) -> None:
    running, store, _ = server
    seen = len(store.ai_logs)
    got = 0
    with (
        httpx.Client(base_url=running.url, timeout=10) as client,
        client.stream("POST", PATH, params={"mode": "endless"}) as response,
    ):
        for line in response.iter_lines():
            got += "more" in line
            if got == 5:
                break  # leaving the block closes the connection
    [row] = rows_after(store, seen)
    assert row.ttft_ms is not None
    # At least the words the client read; what the app sent before it noticed, at most a few.
    least = -(-(len(WORDS[0]) + 5 * len("more ")) // CHARS_PER_TOKEN)
    assert row.tokens_used is not None and least <= row.tokens_used < least + 100


def test_other_responses_are_not_read(server: tuple[RunningServer, MemoryStore, Gates]) -> None:
    running, store, _ = server
    seen = len(store.ai_logs)
    with httpx.Client(base_url=running.url, timeout=10) as client:
        assert client.get("/api/ai/openai/plain").json() == {"usage": USAGE}
    [row] = rows_after(store, seen)
    assert row.tokens_used is None and row.ttft_ms is None


def test_an_event_stream_of_another_shape_reports_nothing(
    server: tuple[RunningServer, MemoryStore, Gates],
) -> None:
    running, store, _ = server
    seen = len(store.ai_logs)
    with httpx.Client(base_url=running.url, timeout=10) as client:
        assert "data: 2" in client.get("/api/ai/openai/ticks").text
    [row] = rows_after(store, seen)
    assert row.tokens_used is None and row.ttft_ms is None and row.model == "unknown"


def test_the_logger_alone_reads_streams_too() -> None:
    store = MemoryStore()
    with serve(make_app(store, stacked=True)) as running:
        _, row, _ = stream_once(running, "usage", store)
    assert row.tokens_used == 42 and row.ttft_ms is not None


@pytest.mark.parametrize("mode", ["nousage", "usage"])
def test_a_stack_of_middlewares_reads_a_stream_once(mode: str) -> None:
    """The logger with a rate limiter inside it, each its own runner wrapping `send` (the
    limiter for its fields): the logger's runner alone feeds the stream's reader, so the
    estimate from the text sent is the text's, not twice it."""
    store = MemoryStore()
    inner = make_app(store, stacked=True).app  # the Starlette app
    rule = Rule("streamed", FixedWindow(rate=1000, period=MINUTE), path=PATH)
    limited = RateLimitMiddleware(inner, store=store, rules=[rule])
    app = RequestLoggerMiddleware(limited, store=store, writer=LogWriter(store, interval=0.02))
    with serve(app) as running:
        with httpx.Client(base_url=running.url, timeout=10) as client:
            response = client.post(PATH, params={"mode": mode})
        assert response.status_code == 200 and "ratelimit" in response.headers
        [row] = rows_after(store, 0)
    expected = 42 if mode == "usage" else -(-len("".join(WORDS)) // CHARS_PER_TOKEN)
    assert row.tokens_used == expected


def test_a_failing_reader_leaves_the_stream_whole(
    server: tuple[RunningServer, MemoryStore, Gates],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, store, _ = server

    def broken(self: UsageReader, chunk: bytes) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(UsageReader, "feed", broken)
    with caplog.at_level(logging.ERROR, logger="convex_guard"):
        text, row, _ = stream_once(running, "usage", store)
    assert text.endswith("data: [DONE]\n\n") and "word5" in text
    assert row.success and row.tokens_used is None
    assert any("reader failed" in r.getMessage() for r in caplog.records)
