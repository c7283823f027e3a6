"""Fingerprint and bot detection end to end, through a real uvicorn server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from convex_guard import (
    HOUR,
    BotCheck,
    BotDetectionMiddleware,
    CheckResult,
    ConfigurationError,
    FingerprintMiddleware,
    FixedWindow,
    LimitRequest,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    guard_context,
)

from .conftest import serve

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
CUBOT = (
    "Mozilla/5.0 (Linux; Android 9; CUBOT X19) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.6099.144 Mobile Safari/537.36"
)
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"
MONITOR = "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)"


async def whoami(request: Request) -> JSONResponse:
    ctx = guard_context(request.scope)
    return JSONResponse(
        {"ip": ctx.client_ip, "key": ctx.client_key, "fingerprint": ctx.fingerprint}
    )


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


class CountingStore(MemoryStore):
    """A MemoryStore that counts hot-path round trips."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        self.calls += 1
        return await super().check(limits, bot=bot)


def app_with(store: MemoryStore, *, defer: bool = False, **bot_options: Any) -> Starlette:
    middleware = [
        Middleware(FingerprintMiddleware, trusted_proxies=["127.0.0.1"]),
        Middleware(BotDetectionMiddleware, store=store, defer=defer, **bot_options),
    ]
    if defer:
        middleware.append(
            Middleware(
                RateLimitMiddleware,
                store=store,
                rules=[Rule("ip", FixedWindow(rate=1000, period=HOUR), key="ip", path="/api")],
            )
        )
    return Starlette(
        routes=[Route("/api/whoami", whoami), Route("/health", health)], middleware=middleware
    )


@pytest.mark.parametrize("defer", [False, True])
def test_ai_crawler_blocked_browser_passes(defer: bool) -> None:
    store = CountingStore()
    with serve(app_with(store, defer=defer)) as server, httpx.Client(base_url=server.url) as c:
        blocked = c.get("/api/whoami", headers={"user-agent": GPTBOT})
        assert blocked.status_code == 403
        assert blocked.headers["content-type"] == "application/problem+json"
        for ua in (BROWSER, CUBOT):
            assert c.get("/api/whoami", headers={"user-agent": ua}).status_code == 200
        # /health is allow-listed: even a crawler gets through, and nothing is recorded.
        assert c.get("/health", headers={"user-agent": GPTBOT}).status_code == 200
    events = asyncio.run(store.bot_events(since=0))
    assert len(events) == 1
    event = events[0]
    assert (event.detection_type, event.action) == ("ai_scraper", "blocked")
    assert event.user_agent == GPTBOT and event.ip == "127.0.0.1"
    assert event.metadata is not None and event.metadata["agent"] == "GPTBot"
    # One store round trip per request that needs the store (3 through the rate limit when
    # deferred, else only the flagged one).
    assert store.calls == (3 if defer else 1)


@pytest.mark.parametrize("defer", [False, True])
def test_sixth_flagged_request_challenged_eleventh_blocked(defer: bool) -> None:
    store = MemoryStore()
    app = app_with(store, defer=defer, suspicious_limit=FixedWindow(rate=100, period=HOUR))
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        codes = [
            c.get("/api/whoami", headers={"user-agent": MONITOR}).status_code for _ in range(12)
        ]
        challenged = c.get("/api/whoami", headers={"user-agent": MONITOR})
        # A browser from the same address has another fingerprint and is unaffected.
        assert c.get("/api/whoami", headers={"user-agent": BROWSER}).status_code == 200
    assert codes == [200] * 5 + [429] * 5 + [403] * 2
    assert challenged.status_code == 403
    events = asyncio.run(store.bot_events(since=0, limit=100))
    assert [e.action for e in reversed(events)] == (
        ["allowed"] * 5 + ["challenged"] * 5 + ["blocked"] * 3
    )


def test_challenge_body_and_suspicious_behavior_limit() -> None:
    store = MemoryStore()  # the seed's suspiciousBehavior: 5 a minute per fingerprint
    with serve(app_with(store)) as server, httpx.Client(base_url=server.url) as c:
        ua = {"user-agent": MONITOR, "accept-language": "xx"}
        codes = [c.get("/api/whoami", headers=ua).status_code for _ in range(6)]
        challenged = c.get("/api/whoami", headers=ua)
    assert codes == [200] * 5 + [429]
    body = challenged.json()
    assert body["type"].endswith("#abnormal-usage-detected")
    assert challenged.headers["Retry-After"]


def test_client_ip_from_trusted_proxy_only_and_stable_fingerprint() -> None:
    # uvicorn rewrites scope["client"] from X-Forwarded-For itself unless told not to; here
    # the middleware alone decides whom to trust.
    store = MemoryStore()
    trusting = app_with(store)
    with (
        serve(trusting, proxy_headers=False) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        forwarded = c.get(
            "/api/whoami",
            headers={"user-agent": BROWSER, "x-forwarded-for": "203.0.113.5, 198.51.100.7"},
        ).json()
        # The peer 127.0.0.1 is trusted: the right-most untrusted hop is the client.
        assert forwarded["ip"] == "198.51.100.7"
        v6 = c.get(
            "/api/whoami", headers={"user-agent": BROWSER, "x-forwarded-for": "2001:db8:1:2::77"}
        ).json()
        assert v6["ip"] == "2001:db8:1:2::77" and v6["key"] == "2001:db8:1:2::/64"
        a = c.get("/api/whoami", headers={"User-Agent": BROWSER, "Accept-Language": "en"}).json()
        b = c.get("/api/whoami", headers={"accept-language": "en", "user-agent": BROWSER}).json()
        assert a["fingerprint"] == b["fingerprint"] and len(a["fingerprint"]) == 16
    untrusting = Starlette(
        routes=[Route("/api/whoami", whoami)], middleware=[Middleware(FingerprintMiddleware)]
    )
    with (
        serve(untrusting, proxy_headers=False) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        spoofed = c.get("/api/whoami", headers={"x-forwarded-for": "203.0.113.5"}).json()
        assert spoofed["ip"] == "127.0.0.1"


def test_allowlists_bypass_detection() -> None:
    store = MemoryStore()
    app = app_with(store, allow_user_agents=[r"GPTBot"], allow_ips=[])
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/api/whoami", headers={"user-agent": GPTBOT}).status_code == 200
    app = app_with(MemoryStore(), allow_ips=["127.0.0.0/8"])
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/api/whoami", headers={"user-agent": GPTBOT}).status_code == 200


def test_bad_options_fail_at_construction() -> None:
    app = PlainTextResponse("ok")  # a response is an ASGI app
    with pytest.raises(ConfigurationError, match="category"):
        BotDetectionMiddleware(app, store=MemoryStore(), policy={"robots": "block"})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="allow_ips"):
        BotDetectionMiddleware(app, store=MemoryStore(), allow_ips=["not-an-ip"])
    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        FingerprintMiddleware(app, trusted_proxies=["10.0.0.0/33"])
