"""A pluggable user-agent classifier through real servers: its verdicts decide, bugs never 500."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from convex_guard import (
    HOUR,
    BotDetectionMiddleware,
    ConfigurationError,
    FingerprintMiddleware,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    UserAgentClassifier,
    UserAgentVerdict,
    classify_user_agent,
)
from convex_guard.core.useragent import DATA_PROVENANCE, SOURCES

from .conftest import serve

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
#: A company's own fetcher: no list knows it, so the default classifier sees a person.
INTERNAL = "AcmeInventorySync/4.2 (Linux x86_64)"
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2)"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def stacked(store: MemoryStore, *, defer: bool, **bot_options: Any) -> Starlette:
    middleware = [
        Middleware(FingerprintMiddleware),
        Middleware(BotDetectionMiddleware, store=store, defer=defer, **bot_options),
    ]
    if defer:
        rule = Rule("ip", FixedWindow(rate=1000, period=HOUR), key="ip", path="/api")
        middleware.append(Middleware(RateLimitMiddleware, store=store, rules=[rule]))
    return Starlette(routes=[Route("/api/hello", hello)], middleware=middleware)


def guarded(store: MemoryStore, **options: Any) -> ASGIApp:
    """The whole guard: its preset rules on /api/ai, so the bot check is deferred to them."""
    app = Starlette(routes=[Route("/api/ai/openai/chat", hello)])
    settings = GuardSettings(store=store, key_routes=(), writer_interval=60)
    return GuardMiddleware(app, settings, **options)


def knows_internal(ua: str) -> UserAgentVerdict:
    """The default classifier, plus the company's own fetcher as a scanner (blocked)."""
    if ua.startswith("AcmeInventorySync/"):
        return UserAgentVerdict(True, "scanner", "AcmeInventorySync")
    return classify_user_agent(ua)


def broken(ua: str) -> UserAgentVerdict:
    raise RuntimeError("classifier bug")


def get_codes(app: ASGIApp, path: str, agents: list[str]) -> list[int]:
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        return [client.get(path, headers={"user-agent": ua}).status_code for ua in agents]


def test_default_classifier_lets_the_internal_fetcher_through() -> None:
    assert not classify_user_agent(INTERNAL).is_bot
    assert get_codes(stacked(MemoryStore(), defer=False), "/api/hello", [INTERNAL]) == [200]


@pytest.mark.parametrize("defer", [False, True])
def test_custom_classifier_flags_what_the_default_does_not(defer: bool) -> None:
    store = MemoryStore()
    app = stacked(store, defer=defer, classifier=knows_internal)
    assert get_codes(app, "/api/hello", [INTERNAL, BROWSER, GPTBOT]) == [403, 200, 403]
    events = asyncio.run(store.bot_events(since=0))
    agents = sorted(str(e.metadata["agent"]) for e in events if e.metadata)
    assert agents == ["AcmeInventorySync", "GPTBot"]


def test_guard_settings_bot_classifier() -> None:
    store = MemoryStore()
    app = guarded(store, bot_classifier=knows_internal)
    assert get_codes(app, "/api/ai/openai/chat", [INTERNAL, BROWSER]) == [403, 200]
    assert [r.error for r in store.ai_logs] == ["bot_blocked", None]
    assert get_codes(guarded(MemoryStore()), "/api/ai/openai/chat", [INTERNAL]) == [200]


@pytest.mark.parametrize("defer", [False, True])
def test_raising_classifier_fails_open_and_logs_once(
    defer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="convex_guard")
    app = stacked(MemoryStore(), defer=defer, classifier=broken)
    assert get_codes(app, "/api/hello", [INTERNAL, BROWSER, GPTBOT, BROWSER]) == [200] * 4
    lines = [r.getMessage() for r in caplog.records if "classifier failed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "classifier bug" in lines[0] and "fail=open" in lines[0]


@pytest.mark.parametrize("defer", [False, True])
def test_raising_classifier_fails_closed_with_503_not_500(defer: bool) -> None:
    store = MemoryStore()
    app = stacked(store, defer=defer, classifier=broken, fail="closed")
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        refused = client.get("/api/hello", headers={"user-agent": BROWSER})
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["title"] == "Bot detection is unavailable"
    # A bug in the classifier says nothing about the client: no bot event is recorded.
    assert asyncio.run(store.bot_events(since=0)) == []


def test_raising_classifier_under_the_guard() -> None:
    store = MemoryStore()
    app = guarded(store, bot_classifier=broken, fail="closed")
    assert get_codes(app, "/api/ai/openai/chat", [BROWSER]) == [503]
    assert [r.error for r in store.ai_logs] == ["bot_check_unavailable"]
    assert get_codes(
        guarded(MemoryStore(), bot_classifier=broken), "/api/ai/openai/chat", [BROWSER]
    ) == [200]


@pytest.mark.parametrize(
    "answer",
    [
        lambda ua: UserAgentVerdict(True, "robot-overlord", "X"),  # type: ignore[arg-type]
        lambda ua: None,
        lambda ua: UserAgentVerdict(True, ["scanner"], "X"),  # type: ignore[arg-type]
    ],
)
def test_a_malformed_verdict_follows_the_fail_policy(
    answer: Callable[[str], UserAgentVerdict],
) -> None:
    assert get_codes(
        stacked(MemoryStore(), defer=False, classifier=answer), "/api/hello", [GPTBOT]
    ) == [200]
    closed = stacked(MemoryStore(), defer=True, classifier=answer, fail="closed")
    assert get_codes(closed, "/api/hello", [GPTBOT]) == [503]


def test_a_custom_classifier_is_called_as_it_is_unless_it_caches_itself() -> None:
    calls: list[str] = []

    def counting(ua: str) -> UserAgentVerdict:
        calls.append(ua)
        return UserAgentVerdict(False, None)

    assert (
        get_codes(
            stacked(MemoryStore(), defer=False, classifier=counting), "/api/hello", [BROWSER] * 3
        )
        == [200] * 3
    )
    assert calls == [BROWSER] * 3

    calls.clear()
    cached: UserAgentClassifier = lru_cache(maxsize=16)(counting)
    assert (
        get_codes(
            stacked(MemoryStore(), defer=False, classifier=cached), "/api/hello", [BROWSER] * 3
        )
        == [200] * 3
    )
    assert calls == [BROWSER]


@pytest.mark.parametrize("bad", [None, "convex_guard.classify_user_agent", 42])
def test_classifier_must_be_callable(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="classifier"):
        BotDetectionMiddleware(hello, store=MemoryStore(), classifier=bad)  # type: ignore[arg-type]


def test_each_declared_source_is_read_whole() -> None:
    assert [s.name for s in SOURCES] == [
        "crawler_user_agents",
        "ai_robots_txt",
        "device_detector",
        "device_detector_regexes",
        "isbot",
        "curated",
    ]
    for source in SOURCES:
        text = (resources.files(source.package) / source.resource).read_text("utf-8")
        document = json.loads(text)
        entries = document if source.entries is None else document[source.entries]
        counted = "agents" if source.kind == "names" else "patterns"
        assert DATA_PROVENANCE[f"{source.name}_{counted}"] == len(entries) > 0


def test_in_app_browsers_are_not_escalated_but_padding_is() -> None:
    """Over 1 KiB is suspicious and escalates; Facebook's and Instagram's in-app browsers
    (up to ~600 bytes) never reach that, however often they come."""
    from .test_useragent import IN_APP

    limit = FixedWindow(rate=100, period=HOUR)  # the escalation, not the per-minute limit
    in_app = max(IN_APP, key=len)
    padded = BROWSER + " " + "x" * 1100
    assert (
        get_codes(
            stacked(MemoryStore(), defer=False, suspicious_limit=limit), "/api/hello", [in_app] * 12
        )
        == [200] * 12
    )
    codes = get_codes(
        stacked(MemoryStore(), defer=False, suspicious_limit=limit), "/api/hello", [padded] * 12
    )
    assert codes[:5] == [200] * 5
    assert codes[-1] == 403
