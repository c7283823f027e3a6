"""Shadow mode, per rule and for the whole guard, on both stores: decided, recorded, counted in
the stats and the dashboard, never refused; API keys stay enforced."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from convex_guard import (
    HOUR,
    MINUTE,
    ConfigurationError,
    ConvexStore,
    GuardMiddleware,
    GuardSettings,
    KeyRoute,
    MemoryStore,
    Rule,
    TokenBucket,
)
from convex_guard.stores.base import AIRequestLog, DashboardSnapshot, LogBatch, ProviderStats

from .conftest import ConvexTestServer, serve
from .e2e_checks import BROWSER

CHAT = "/api/ai/openai/chat"
SECRET = "/api/ai/openai/secret"
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"


async def answer(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def app_closing(store: Any) -> Starlette:
    """The app, closing the store at shutdown, on the server's loop (whose it is)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if isinstance(store, ConvexStore):
            await store.close()

    return Starlette(
        routes=[Route(CHAT, answer, methods=["POST"]), Route(SECRET, answer)], lifespan=lifespan
    )


def bucket(n: int) -> TokenBucket:
    # Refills n an hour: nothing comes back while the test runs.
    return TokenBucket(rate=n, period=HOUR)


@pytest.fixture(params=["memory", "convex"])
def stores(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """(the store the guard uses, a function of a coroutine factory that reads figures)."""
    if request.param == "memory":
        store = MemoryStore()

        def read_memory(call: Any) -> Any:
            return asyncio.run(call(store))

        yield store, read_memory
        return
    server: ConvexTestServer = request.getfixturevalue("convex_server")
    server.reset()

    def read_convex(call: Any) -> Any:
        async def run() -> Any:
            reader = ConvexStore(server.url, server.admin_key, timeout=10)
            try:
                return await call(reader)
            finally:
                await reader.close()

        return asyncio.run(run())

    yield ConvexStore(server.url, server.admin_key, timeout=10), read_convex


def figures(read: Any, requests: int) -> tuple[ProviderStats, DashboardSnapshot]:
    """The provider's stats and a dashboard snapshot, once the writer has flushed `requests`."""
    now = time.time() * 1000
    start = (now // MINUTE - 5) * MINUTE
    deadline = time.monotonic() + 10
    while True:
        stats: ProviderStats = read(lambda s: s.provider_stats("openai", now - HOUR, now + HOUR))
        if stats.total_requests >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    snapshot = read(lambda s: s.dashboard(start, start + 10 * MINUTE, MINUTE))
    return stats, snapshot


def guard(store: Any, **options: Any) -> GuardMiddleware:
    return GuardMiddleware(app_closing(store), store=store, writer_interval=0.02, **options)


def test_a_shadow_rule_decides_and_records_but_never_refuses(stores: tuple[Any, Any]) -> None:
    store, read = stores
    rules = [
        Rule("shadowTight", bucket(2), key="ip", path="/api/ai", shadow=True),
        Rule("enforcedLoose", bucket(5), key="ip", path="/api/ai"),
    ]
    app = guard(store, rules=rules, key_routes=(), bot_detection=False)
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [client.post(CHAT, headers={"user-agent": BROWSER}) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 5 + [429]
    # The shadow rule's fields say it is spent; the enforced one counted every request.
    assert '"shadowTight";r=0' in answers[2].headers["ratelimit"]
    assert '"enforcedLoose";r=2' in answers[2].headers["ratelimit"]
    assert '"enforcedLoose";r=0' in answers[4].headers["ratelimit"]
    assert answers[5].json()["violated-policies"] == ["enforcedLoose"]

    stats, snapshot = figures(read, 6)
    assert stats.total_requests == 6
    assert stats.shadow_refusals == 4  # the 3rd to 6th (the 6th was refused anyway)
    assert snapshot.refusals.get("limit") == 1
    assert snapshot.shadow_refusals.get("limit") == 4
    assert snapshot.to_json()["shadowRefusals"] == {
        "limit": 4,
        "bot": 0,
        "key": 0,
        "budget": 0,
        "body": 0,
    }
    if isinstance(store, MemoryStore):
        shadows = [row.shadow for row in store.ai_logs]
        assert shadows == [None, None] + ["rate_limited:shadowTight"] * 4
        assert [row.success for row in store.ai_logs] == [True] * 5 + [False]


def test_a_shadow_guard_refuses_nothing_but_keys_stay_enforced(stores: tuple[Any, Any]) -> None:
    store, read = stores
    app = guard(
        store,
        shadow=True,
        rules=[Rule("tight", bucket(2), key="ip", path="/api/ai")],
        key_routes=(KeyRoute(SECRET, kind="ai", required=True),),
    )
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        crawler = client.post(CHAT, headers={"user-agent": GPTBOT})
        people = [client.post(CHAT, headers={"user-agent": BROWSER}) for _ in range(3)]
        keyless = client.get(SECRET, headers={"user-agent": BROWSER})
    assert crawler.status_code == 200  # would be 403
    assert [p.status_code for p in people] == [200, 200, 200]  # the 2nd and 3rd would be 429
    # The crawler's request counted (as if allowed): the 2nd and 3rd person's are over.
    assert '"tight";r=0' in people[1].headers["ratelimit"]
    assert keyless.status_code == 401  # shadow mode does not make a protected route public

    stats, snapshot = figures(read, 5)
    assert stats.total_requests == 5
    assert stats.shadow_refusals == 3
    assert snapshot.shadow_refusals.get("bot") == 1 and snapshot.shadow_refusals.get("limit") == 2
    assert snapshot.refusals.get("key") == 1 and not snapshot.refusals.get("limit")
    # The bot decision is recorded as ever: escalation counts it.
    assert any(action == "blocked" for _, action in snapshot.bot_events)
    if isinstance(store, MemoryStore):
        rows = store.ai_logs
        assert rows[0].shadow == "bot_blocked" and rows[0].success
        assert [row.shadow for row in rows[1:4]] == [None] + ["rate_limited:tight"] * 2
        assert all(row.success for row in rows[:4])
        assert rows[4].error == "api_key_missing" and rows[4].shadow is None


@pytest.mark.parametrize("options", [{"shadow": "yes"}, {"provider": "openai"}])
def test_bad_shadow_and_provider_settings_fail_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        GuardSettings(store=MemoryStore(), **options)


def test_convex_stores_the_new_row_fields(convex_server: ConvexTestServer) -> None:
    """`ttft_ms` and `shadow` pass the deployment's validator (a field it did not know would
    refuse the whole batch) and the stats count the shadow row."""
    convex_server.reset()
    now = time.time() * 1000

    async def run() -> ProviderStats:
        store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
        try:
            row = AIRequestLog(now, "groq", "m", "f", "192.0.2.1", True, 80.0, ttft_ms=12.5)
            shadowed = AIRequestLog(
                now, "groq", "m", "f", "192.0.2.1", True, 5.0, shadow="rate_limited:trial"
            )
            await store.write_logs(LogBatch("b1", ai_requests=[row, shadowed]))
            return await store.provider_stats("groq", now - MINUTE, now + MINUTE)
        finally:
            await store.close()

    stats = asyncio.run(run())
    assert stats.total_requests == 2 and stats.shadow_refusals == 1
