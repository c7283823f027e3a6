"""ConvexStore specifics: errors, configuration, secrets and live subscriptions."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time as time_

import pytest

from convex_guard import (
    HOUR,
    AIRequestLog,
    BotCheck,
    ConfigurationError,
    ConvexAuthError,
    ConvexFunctionNotFoundError,
    ConvexStore,
    ConvexValidationError,
    FixedWindow,
    GuardEnvironment,
    LogBatch,
    MemoryStore,
    StoreTimeoutError,
    StoreUnavailableError,
)
from convex_guard.cli import main

from .conftest import ConvexTestServer
from .fault_tools import free_port

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


async def test_wrong_admin_key_is_refused_without_echoing_it(
    convex_server: ConvexTestServer,
) -> None:
    store = ConvexStore(convex_server.url, "wrong-key-do-not-echo")
    try:
        with pytest.raises(ConvexAuthError) as info:
            await store.limit("x", FixedWindow(rate=1, period=HOUR))
    finally:
        await store.close()
    assert "wrong-key-do-not-echo" not in str(info.value)
    assert "wrong-key-do-not-echo" not in repr(store)


async def test_missing_function_says_deploy(convex_server: ConvexTestServer) -> None:
    store = ConvexStore(convex_server.url, convex_server.admin_key)
    try:
        with pytest.raises(ConvexFunctionNotFoundError, match="deploy"):
            await store._call("query", "nope:missing", {})
    finally:
        await store.close()


async def test_bad_arguments_are_a_validation_error(convex_server: ConvexTestServer) -> None:
    store = ConvexStore(convex_server.url, convex_server.admin_key)
    try:
        with pytest.raises(ConvexValidationError, match=r"guard:check rejected its arguments"):
            await store._call("mutation", "guard:check", {"limits": "not a list"})
    finally:
        await store.close()


async def test_unreachable_deployment_fails_fast() -> None:
    store = ConvexStore(f"http://127.0.0.1:{free_port()}", "key", timeout=1)
    try:
        with pytest.raises(StoreUnavailableError, match="unreachable"):
            await store.count_bot_events("fp", 0)
    finally:
        await store.close()


async def test_a_silent_deployment_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = ConvexStore(f"http://127.0.0.1:{port}", "key", timeout=0.3)
    try:
        with pytest.raises(StoreTimeoutError, match=r"0\.3 s"):
            await store.count_bot_events("fp", 0)
    finally:
        await store.close()
        server.close()


def test_from_env_names_the_missing_variable() -> None:
    with pytest.raises(ConfigurationError, match="CONVEX_SELF_HOSTED_URL"):
        ConvexStore.from_env(GuardEnvironment(convex_self_hosted_url=None, convex_url=None))
    with pytest.raises(ConfigurationError, match="CONVEX_SELF_HOSTED_ADMIN_KEY"):
        ConvexStore.from_env(GuardEnvironment(convex_self_hosted_url="http://127.0.0.1:3210"))
    store = ConvexStore.from_env(
        GuardEnvironment(
            convex_url="http://127.0.0.1:3210",
            convex_self_hosted_admin_key="secret-admin-key",
        )
    )
    assert store.url == "http://127.0.0.1:3210"
    assert "secret-admin-key" not in repr(store)
    with pytest.raises(ConfigurationError, match="http"):
        ConvexStore("127.0.0.1:3210", "k")


async def test_watch_bot_events_pushes_new_events(convex_server: ConvexTestServer) -> None:
    convex_server.reset()
    store = ConvexStore(convex_server.url, convex_server.admin_key)
    seen: list[int] = []

    async def watch() -> None:
        async for events in store.watch_bot_events(since=0, limit=10):
            seen.append(len(events))
            if len(events) >= 2:
                return

    try:
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)
        for _ in range(2):
            bot = BotCheck("fp-w", "192.0.2.1", "curl/8", "bot_useragent", "allowed")
            await store.check([], bot=bot)
            await asyncio.sleep(0.2)
        await asyncio.wait_for(watcher, timeout=15)
    finally:
        await store.close()
    assert seen[0] == 0 and seen[-1] == 2


@pytest.mark.slow
def test_cli_watch_follows_the_deployment_live(convex_server: ConvexTestServer) -> None:
    """`convex-guard watch` prints an update each time Convex pushes new stats or events."""
    convex_server.reset()
    out = io.StringIO()
    store = ConvexStore(convex_server.url, convex_server.admin_key)
    exit_code: list[int] = []
    runner = threading.Thread(
        target=lambda: exit_code.append(
            main(
                ["watch", "--json", "--provider", "openai", "--count", "3"], store=store, stdout=out
            )
        )
    )
    runner.start()
    time_.sleep(1.5)  # both subscriptions have answered once

    async def write() -> None:
        writer = ConvexStore(convex_server.url, convex_server.admin_key)
        try:
            await writer.check(
                [], bot=BotCheck("fp-cli", "192.0.2.7", "curl/8", "bot_useragent", "allowed")
            )
            await asyncio.sleep(0.5)
            now = time_.time() * 1000
            row = AIRequestLog(now, "openai", "gpt-x", "fp", "192.0.2.7", True, 12.0, tokens_used=3)
            await writer.write_logs(LogBatch(id="cli-watch", ai_requests=[row]))
        finally:
            await writer.close()

    asyncio.run(write())
    runner.join(timeout=20)
    assert not runner.is_alive() and exit_code == [0]
    updates = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(updates) == 3
    assert updates[-1]["providers"]["openai"]["totalRequests"] == 1
    assert [e["fingerprint"] for e in updates[-1]["botEvents"]] == ["fp-cli"]


def test_cli_watch_needs_a_deployment() -> None:
    err = io.StringIO()
    assert main(["watch"], store=MemoryStore(), stderr=err) == 1
    assert "needs a Convex deployment" in err.getvalue()


def test_guard_on_env_convex_is_resilient_and_shares_state(
    convex_server: ConvexTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GuardMiddleware with the environment naming Convex: wrapped, and rows land in Convex."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from convex_guard import GuardMiddleware, GuardSettings, ResilientStore, report_usage
    from convex_guard.stores.resolve import resolve_store

    from .conftest import serve

    convex_server.reset()
    monkeypatch.setenv("CONVEX_SELF_HOSTED_URL", convex_server.url)
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", convex_server.admin_key)
    store, owned = resolve_store("env", GuardEnvironment())
    assert owned and isinstance(store, ResilientStore) and isinstance(store.primary, ConvexStore)
    assert store.fallback is not None
    asyncio.run(store.close())

    async def chat(request: Request) -> PlainTextResponse:
        report_usage(request, model="m", tokens=5)
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/api/ai/openai/chat", chat, methods=["POST"])])
    app.add_middleware(GuardMiddleware, settings=GuardSettings(writer_interval=0.1))
    with serve(app) as server:
        import httpx

        response = httpx.post(server.url + "/api/ai/openai/chat", headers={"user-agent": "x/1"})
        assert response.status_code in (200, 429)  # "x/1" is flagged; the row is what counts
        ok = httpx.post(
            server.url + "/api/ai/openai/chat",
            headers={"user-agent": FIREFOX},
        )
        assert ok.status_code == 200 and "RateLimit" in ok.headers

    async def read() -> tuple[int, int]:
        reader = ConvexStore(convex_server.url, convex_server.admin_key)
        try:
            now = time_.time() * 1000
            stats = await reader.provider_stats("openai", now - 60_000, now + 1_000)
        finally:
            await reader.close()
        return stats.total_requests, stats.total_tokens

    requests, tokens = asyncio.run(read())
    assert requests == 2 and tokens >= 5
