"""A store has only the capabilities it implements: a limit-only store passes the limit
contract, serves the rate limiter and a guard configured without the rest, and a guard that
needs more refuses to start, naming what the store lacks."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from convex_guard import (
    HOUR,
    ApiKeyMiddleware,
    ApiKeys,
    BotCheck,
    BotDetectionMiddleware,
    CheckResult,
    ConfigurationError,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    KeyRoute,
    LimitConfig,
    LimitRequest,
    LimitResult,
    LogBatch,
    LogWriter,
    MemoryStore,
    RateLimitMiddleware,
    RequestLoggerMiddleware,
    ResilientStore,
    Rule,
)
from convex_guard.core.limits import LimitState, decide, initial_state
from convex_guard.stores.base import LimitThroughCheck
from convex_guard.stores.testing import LimitStoreContract

from .conftest import serve

EXIT_WITHIN = 45.0


class DictLimits(LimitThroughCheck):
    """A limit-only store: one process's states in a dict, decided by `core.limits`.

    `check` never awaits, so on one event loop it is atomic; `limit` comes from the mixin.
    """

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.states: dict[tuple[str, str | None], LimitState] = {}
        self.clock = clock or (lambda: time.time() * 1000.0)

    def _state(self, name: str, key: str | None, config: LimitConfig, now: float) -> LimitState:
        state = self.states.get((name, key))
        return state if state is not None else initial_state(config, now, random.random)

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        if bot is not None:
            raise ValueError("DictLimits keeps no bot history")
        now = self.clock()
        decided: dict[tuple[str, str | None], LimitState] = {}
        results = []
        for r in limits:
            slot = (r.name, r.key)
            state = decided.get(slot) or self._state(r.name, r.key, r.config, now)
            result, decided[slot] = decide(r.config, state, now, r.count, r.reserve)
            results.append(result)
        ok = all(result.ok for result in results)
        if ok:  # all consumed, or none
            self.states.update(decided)
        return CheckResult(ok, tuple(results))

    async def peek(self, name: str, config: LimitConfig, *, key: str | None = None) -> LimitResult:
        now = self.clock()
        return decide(config, self._state(name, key, config, now), now, 0)[0]

    async def reset(self, name: str, *, key: str | None = None) -> None:
        self.states.pop((name, key), None)


class DictLimitsAndLogs(DictLimits):
    """The limiter and a log sink: what a guard with only rate limits needs."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[LogBatch] = []

    async def write_logs(self, batch: LogBatch) -> None:
        self.batches.append(batch)


# -- (a) the limit contract, on the wall clock (the default: this one sleeps ~2 s) --------------


class TestDictLimitsContract(LimitStoreContract):
    conflicts = False

    @pytest.fixture
    def store(self) -> DictLimits:
        return DictLimits()


# -- (b) the rate limiter over it, on a real server ---------------------------------------------


def ok_app() -> Starlette:
    return Starlette(routes=[Route("/api/ai/openai/chat", lambda request: PlainTextResponse("ok"))])


def three_requests(url: str) -> list[httpx.Response]:
    with httpx.Client(base_url=url, timeout=10) as client:
        return [client.get("/api/ai/openai/chat") for _ in range(3)]


def test_a_limit_only_store_serves_the_rate_limiter() -> None:
    store = DictLimits()
    app = ok_app()
    rule = Rule("twice", FixedWindow(rate=2, period=HOUR), path="/api/ai")
    app.add_middleware(RateLimitMiddleware, store=store, rules=[rule])
    with serve(app) as server:
        responses = three_requests(server.url)
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert int(responses[2].headers["retry-after"]) > 0
    assert [key for key in store.states] == [("twice", None)]


# -- (c) a guard with only rate limits and the request log ---------------------------------------


def test_a_limiter_with_a_log_sink_serves_a_guard_without_keys_or_bot_detection() -> None:
    store = DictLimitsAndLogs()
    rule = Rule("ipTwice", FixedWindow(rate=2, period=HOUR), key="ip", path="/api/ai")
    settings = GuardSettings(store=store, rules=[rule], key_routes=(), bot_detection=False)
    app = ok_app()
    app.add_middleware(GuardMiddleware, settings=settings)
    with serve(app) as server:
        responses = three_requests(server.url)
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert ("ipTwice", "127.0.0.1") in store.states
    # The writer flushed at shutdown: each request logged once, the refused one as failed.
    rows = [row for batch in store.batches for row in batch.ai_requests]
    assert [(row.provider, row.success) for row in rows] == [
        ("openai", True),
        ("openai", True),
        ("openai", False),
    ]


# -- (d) what a guard needs and the store lacks, named at start-up ------------------------------

LIMIT_ONLY_AT_DEFAULTS = (
    "convex-guard: GuardMiddleware: the store DictLimits lacks LogStore (write_logs), needed by "
    "the request log (always on); KeyStore (create_api_key, find_api_key, list_api_keys, "
    "update_api_key), needed by API keys (off with key_routes=()); BotStore (count_bot_events, "
    "bot_events), needed by bot detection (off with bot_detection=False)"
)


def test_a_limit_only_store_under_default_settings_refuses_the_startup_of_a_real_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = ok_app()
    app.add_middleware(GuardMiddleware, store=DictLimits())
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="auto", log_config=None)
    server = uvicorn.Server(config)
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as exited:
        asyncio.run(asyncio.wait_for(server.serve(), EXIT_WITHIN))
    assert exited.value.code == 3  # uvicorn's "startup failed"
    assert not server.started
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert failures == [LIMIT_ONLY_AT_DEFAULTS, "Application startup failed. Exiting."]


@pytest.mark.parametrize(
    ("store", "options", "named"),
    [
        pytest.param(
            DictLimits(),
            {"key_routes": (), "bot_detection": False},
            "DictLimits lacks LogStore (write_logs), needed by the request log (always on)",
            id="logs-always",
        ),
        pytest.param(
            object(),
            {"rules": (), "bot_detection": False},
            "object lacks LogStore (write_logs), needed by the request log (always on); "
            "LimitStore (limit, check, peek, reset), needed by API keys (off with "
            "key_routes=()); KeyStore (create_api_key, find_api_key, list_api_keys, "
            "update_api_key), needed by API keys (off with key_routes=())",
            id="keys-need-limits",
        ),
        pytest.param(
            object(),
            {"key_routes": ()},
            "object lacks LogStore (write_logs), needed by the request log (always on); "
            "LimitStore (limit, check, peek, reset), needed by rate limits (off with rules=()); "
            "BotStore (count_bot_events, bot_events), needed by bot detection",
            id="bots-name-only-their-own-methods",
        ),
    ],
)
def test_the_settings_name_what_their_middlewares_need(
    store: object, options: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        GuardSettings(store=store, **options)  # type: ignore[arg-type]
    assert str(raised.value).startswith(f"GuardMiddleware: the store {named}")


def test_a_store_with_what_the_settings_need_is_accepted() -> None:
    for store in (DictLimitsAndLogs(), MemoryStore()):
        settings = GuardSettings(store=store, key_routes=(), bot_detection=False)
        assert GuardMiddleware(ok_app(), settings=settings).error is None


def limit_only_middlewares(app: ASGIApp) -> dict[str, Callable[[], object]]:
    store = DictLimits()
    route = KeyRoute("/api/embeddings", kind="embedding")
    writer = LogWriter(MemoryStore())
    return {
        "BotDetectionMiddleware: the store DictLimits lacks BotStore (count_bot_events, "
        "bot_events)": lambda: BotDetectionMiddleware(app, store=store),  # type: ignore[arg-type]
        "ApiKeyMiddleware: the store DictLimits lacks KeyStore (create_api_key, find_api_key, "
        "list_api_keys, update_api_key); LogStore (write_logs)": lambda: ApiKeyMiddleware(
            app,
            store=store,  # type: ignore[arg-type]
            routes=[route],
        ),
        "ApiKeyMiddleware: the store DictLimits lacks KeyStore (create_api_key, find_api_key, "
        "list_api_keys, update_api_key)": lambda: ApiKeyMiddleware(
            app,
            store=store,  # type: ignore[arg-type]
            routes=[route],
            writer=writer,
        ),
        "RequestLoggerMiddleware: the store DictLimits lacks LogStore (write_logs)": lambda: (
            RequestLoggerMiddleware(app, store=store)  # type: ignore[arg-type]
        ),
        "LogWriter: the store DictLimits lacks LogStore (write_logs)": lambda: LogWriter(
            store  # type: ignore[arg-type]
        ),
        "ApiKeys: the store DictLimits lacks KeyStore (create_api_key, find_api_key, "
        "list_api_keys, update_api_key); AuditStore (audit_entries), needed by the audit "
        "trail (off with audit=False)": lambda: ApiKeys(store),  # type: ignore[arg-type]
        "RateLimitMiddleware: the store object lacks LimitStore (limit, check, peek, reset)": (
            lambda: RateLimitMiddleware(
                app,
                store=object(),  # type: ignore[arg-type]
                rules=[Rule("r", FixedWindow(rate=1, period=HOUR))],
            )
        ),
    }


def test_each_middleware_names_what_its_store_lacks_at_construction() -> None:
    app = ok_app()
    for message, build in limit_only_middlewares(app).items():
        with pytest.raises(ConfigurationError) as raised:
            build()
        assert str(raised.value) == message
    # A writer given brings its own store: the logger then needs nothing of the one it is given.
    writer = LogWriter(MemoryStore())
    logger = RequestLoggerMiddleware(app, store=DictLimits(), writer=writer)  # type: ignore[arg-type]
    assert logger.writer is writer


def test_importing_the_package_does_not_import_pytest() -> None:
    # The contract suite imports pytest; the package, which apps import, must not.
    code = "import sys, convex_guard, convex_guard.stores; print('pytest' in sys.modules)"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == "False"


def test_a_resilient_store_needs_a_primary_with_every_capability() -> None:
    # It answers for all of them, so the guard's check of it could not see what is missing.
    with pytest.raises(ConfigurationError) as raised:
        ResilientStore(DictLimits())  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith("ResilientStore: the store DictLimits lacks Store (")
    assert "write_logs" in message and "close" in message and "check" not in message
