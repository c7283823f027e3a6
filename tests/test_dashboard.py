"""The dashboard: its token, its snapshot's figures, its live updates, no key ever shown.

Every test serves the dashboard with uvicorn (`serve`) and talks to it over HTTP, against a
MemoryStore and against ConvexStore on the loopback Convex server, with known rows; one test
drives the page itself in Debian's chromium through Playwright.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convex_guard import MemoryStore
from convex_guard.cli import main
from convex_guard.core.errors import StoreUnavailableError
from convex_guard.dashboard import Dashboard, app, parse_window, window_label, window_range
from convex_guard.stores.base import (
    LATENCY_BOUNDS_MS,
    AIRequestLog,
    AuthFailure,
    BotEvent,
    DashboardSnapshot,
    KeyUsage,
    LogBatch,
    histogram_percentile,
    latency_bucket,
)
from convex_guard.stores.convex import ConvexStore
from convex_guard.stores.keys import ApiKeys, CreatedKey
from convex_guard.stores.resilient import ResilientStore

from .conftest import ConvexTestServer, serve

MINUTE = 60_000
TOKEN = "t0ken-for-the-dashboard-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
#: A fixed "now", mid-minute, so that every row falls in the bucket it is meant for.
NOW = (time.time() * 1000 // MINUTE) * MINUTE + 30_000


def ai(
    at: float, provider: str, latency: float, tokens: int, cost: float, error: str | None = None
) -> AIRequestLog:
    return AIRequestLog(
        timestamp=at,
        provider=provider,
        model="m",
        fingerprint="fp",
        ip="198.51.100.7",
        success=error is None,
        latency_ms=latency,
        tokens_used=tokens,
        cost=cost,
        error=error,
    )


def known_rows(now: float, key_id: str) -> LogBatch:
    """7 requests (4 succeed; a limit, a key and a bot refusal), 3 bot events, 3 failures."""
    return LogBatch(
        id=uuid.uuid4().hex,
        ai_requests=[
            ai(now - 5 * MINUTE, "openai", 20, 10, 0.10),
            ai(now - 4 * MINUTE, "openai", 40, 20, 0.20),
            ai(now - 3 * MINUTE, "openai", 80, 30, 0.30),
            ai(now - 2 * MINUTE, "openai", 900, 0, 0.0, "rate_limited:requests"),
            ai(now - 1 * MINUTE, "openai", 5, 0, 0.0, "api_key_missing"),
            ai(now - 2 * MINUTE, "anthropic", 300, 5, 0.05),
            ai(now, "anthropic", 3000, 0, 0.0, "bot_blocked"),
        ],
        bot_events=[
            BotEvent(now - MINUTE, "fp-1", "203.0.113.9", "curl/8", "bot_useragent", "blocked"),
            BotEvent(now - MINUTE + 1, "fp-1", "203.0.113.9", "curl/8", "bot_useragent", "blocked"),
            BotEvent(now, "fp-2", "203.0.113.10", "GPTBot/1", "ai_scraper", "challenged"),
        ],
        auth_failures=[
            AuthFailure("f" * 64, now - MINUTE + i, "203.0.113.9", "curl/8") for i in range(3)
        ],
        key_usage=[KeyUsage(key_id, now, 7)],
    )


def more_rows(now: float) -> LogBatch:
    return LogBatch(
        id=uuid.uuid4().hex,
        ai_requests=[ai(now, "openai", 30, 1, 0.01) for _ in range(3)],
    )


async def seeded(store: Any) -> CreatedKey:
    created = await ApiKeys(store).create("billing-service", owner="team-a")
    await store.write_logs(known_rows(NOW, created.record.id))
    return created


def check_known_figures(snap: dict[str, Any]) -> None:
    assert snap["bucketMs"] == MINUTE and snap["end"] - snap["start"] == 15 * MINUTE
    totals = snap["totals"]
    assert totals["requests"] == 7
    assert totals["successRate"] == pytest.approx(4 / 7)
    assert (totals["p50"], totals["p95"]) == (100, 5000)
    assert totals["tokens"] == 65 and totals["cost"] == pytest.approx(0.65)
    assert (totals["authFailures"], totals["botEvents"]) == (3, 3)
    by_name = {p["provider"]: p for p in snap["providers"]}
    assert sorted(by_name) == ["anthropic", "openai"]
    openai = by_name["openai"]
    assert openai["requests"][-6:] == [1, 1, 1, 1, 1, 0]
    assert (openai["p50"], openai["p95"], openai["tokens"]) == (50, 1000, 60)
    assert (by_name["anthropic"]["p50"], by_name["anthropic"]["p95"]) == (500, 5000)
    assert snap["refusals"] == {"limit": 1, "bot": 1, "key": 1, "budget": 0, "body": 0}
    assert snap["botEvents"] == [
        {"type": "ai_scraper", "action": "challenged", "count": 1},
        {"type": "bot_useragent", "action": "blocked", "count": 2},
    ]
    assert snap["botSeries"][-2:] == [2, 1] and snap["authFailures"][-2:] == [3, 0]
    assert [(k["name"], k["requests"]) for k in snap["topKeys"]] == [("billing-service", 7)]


@pytest.fixture
def memory() -> Iterator[tuple[MemoryStore, CreatedKey]]:
    store = MemoryStore()
    created = asyncio.run(seeded(store))
    yield store, created


def dashboard(store: Any, **options: Any) -> Dashboard:
    return app(store, token=TOKEN, window=15 * MINUTE, clock=lambda: NOW, **options)


# -- the token --------------------------------------------------------------------------------


def test_every_route_is_a_bare_401_without_the_right_token(
    memory: tuple[MemoryStore, CreatedKey], caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = memory
    caplog.set_level(logging.WARNING, "convex_guard.dashboard")
    with serve(dashboard(store)) as server, httpx.Client(base_url=server.url) as client:
        answers = []
        routes = ("/api/snapshot", "/api/events", "/api/bots")
        for path in ("/", "/static/app.js", *routes, "/nowhere"):
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token-of-some-length"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Cookie": "dashboard_token=wrong"},
                {"Authorization": f"Bearer {TOKEN[:-1]}"},
            ):
                answers.append(client.get(path, headers=headers))
            answers.append(client.get(f"{path}?token=nope"))
        assert {r.status_code for r in answers} == {401}
        assert {r.content for r in answers} == {b'{"title":"Unauthorized","status":401}'}
        assert all(r.headers["www-authenticate"] == 'Bearer realm="dashboard"' for r in answers)
        # The right token, after all the wrong ones: nothing was locked or cached.
        assert client.get("/api/snapshot", headers=BEARER).status_code == 200
    assert "Dashboard refused GET /api/snapshot from 127.0.0.1: a wrong token" in caplog.text
    assert TOKEN not in caplog.text and "nope" not in caplog.text
    with serve(dashboard(store)) as server, httpx.Client(base_url=server.url) as client:
        client.get("/%0a%1b[31mforged")
    assert "\x1b" not in caplog.text and "\nforged" not in caplog.text


def test_the_token_in_the_address_becomes_a_cookie(memory: tuple[MemoryStore, CreatedKey]) -> None:
    store, _ = memory
    with serve(dashboard(store)) as server, httpx.Client(base_url=server.url) as client:
        first = client.get(f"/?token={TOKEN}")
        assert first.status_code == 303 and first.headers["location"] == "/"
        cookie = first.headers["set-cookie"]
        assert f"dashboard_token={TOKEN}" in cookie and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert first.headers["referrer-policy"] == "no-referrer"
        again = httpx.get(f"{server.url}/?window=6h&token={TOKEN}")  # other parameters stay
        assert again.headers["location"] == "/?window=6h"
        page = client.get("/")  # the client kept the cookie
        assert page.status_code == 200 and "<title>convex-guard dashboard</title>" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/missing.js").status_code == 404


def test_a_generated_token_is_long_and_never_in_the_repr() -> None:
    board = app(MemoryStore())
    assert len(board.token) >= 32 and board.token not in repr(board)
    assert app(MemoryStore()).token != board.token
    for bad in ("short", "sixteen chars; and more", "a" * 15, "ünïcödé-tökén-of-länd"):
        with pytest.raises(ValueError, match="at least 16 characters of"):
            app(MemoryStore(), token=bad)


# -- the snapshot -----------------------------------------------------------------------------


def test_snapshot_figures_from_a_memory_store(memory: tuple[MemoryStore, CreatedKey]) -> None:
    store, created = memory
    with serve(dashboard(store)) as server, httpx.Client(base_url=server.url) as client:
        answer = client.get("/api/snapshot", headers=BEARER)
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        check_known_figures(answer.json())
        page = (
            client.get("/", headers=BEARER).text + client.get("/static/app.js", headers=BEARER).text
        )
    # Neither the key nor its hash, anywhere the dashboard answers.
    for secret in (created.key, created.record.key_hash):
        assert secret not in answer.text and secret not in page


def test_the_bot_list_says_what_was_verified_and_spoofed(
    memory: tuple[MemoryStore, CreatedKey],
) -> None:
    store, _ = memory
    claims = [
        ("66.249.66.1", "verified", "googlebot", "ip 66.249.66.1 in googlebot 66.249.64.0/19"),
        ("8.8.4.4", "spoofed", "claudebot", "ip 8.8.4.4 not in claudebot ranges"),
    ]
    ua = "Mozilla/5.0 (compatible; Bot/1.0)\x1b[31m"
    events = []
    for i, (ip, status, name, why) in enumerate(claims):
        action: Literal["allowed", "blocked"] = "allowed" if status == "verified" else "blocked"
        meta = {"category": "search_engine", "agent": name, "path": "/",
                "verification": status, "verifiedName": name, "evidence": why}  # fmt: skip
        events.append(
            BotEvent(NOW - 30_000 + i, f"fp-{i}", ip, ua, "bot_useragent", action, metadata=meta)
        )
    asyncio.run(store.write_logs(LogBatch(id="bots", bot_events=events)))
    old = BotEvent(NOW - 20 * MINUTE, "fp-old", "192.0.2.1", "x", "rate_limit", "blocked")
    asyncio.run(store.write_logs(LogBatch(id="old", bot_events=[old])))
    with serve(dashboard(store)) as server, httpx.Client(base_url=server.url) as client:
        answer = client.get("/api/bots", headers=BEARER)
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        listed = answer.json()["events"]
        wide = client.get("/api/bots?window=1h", headers=BEARER).json()["events"]
        assert client.get("/api/bots?window=soon", headers=BEARER).status_code == 400
    by_ip = {e["ip"]: e for e in listed}
    assert "192.0.2.1" not in by_ip and "192.0.2.1" in {e["ip"] for e in wide}  # the window
    assert len(listed) == 5  # the seeded three and the two claims, most recent first
    times = [e["timestamp"] for e in listed]
    assert times == sorted(times, reverse=True)
    for ip, status, name, why in claims:
        row = by_ip[ip]
        assert (row["verification"], row["verifiedName"], row["evidence"]) == (status, name, why)
        assert (row["category"], row["agent"]) == ("search_engine", name)
        assert "\x1b" not in row["userAgent"]
    assert by_ip["203.0.113.10"]["verification"] is None  # no claim was checked


def test_the_bot_list_of_a_store_without_bot_events_is_a_404() -> None:
    class Snapshots:
        """A dashboard store that keeps no bot history."""

        def __init__(self) -> None:
            self.inner = MemoryStore()

        def __getattr__(self, name: str) -> Any:
            if name in ("bot_events", "count_bot_events", "check"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    board = dashboard(Snapshots())
    with serve(board) as server:
        answer = httpx.get(f"{server.url}/api/bots", headers=BEARER)
    assert answer.status_code == 404 and "keeps no bot events" in answer.json()["detail"]


def test_bad_windows_are_a_400_with_a_reason(
    memory: tuple[MemoryStore, CreatedKey], caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = memory
    caplog.set_level(logging.WARNING, "convex_guard.dashboard")
    with (
        serve(dashboard(store)) as server,
        httpx.Client(base_url=server.url, headers=BEARER) as client,
    ):
        for window in ("0m", "31d", "1y", "-1h", "1h;drop", "9" * 50 + "m"):
            for path in ("/api/snapshot", "/api/events"):
                answer = client.get(path, params={"window": window})
                assert answer.status_code == 400, (path, window)
                assert answer.json()["detail"].startswith("window must be")
        assert client.get("/api/snapshot", params={"window": "6h"}).json()["bucketMs"] == 6 * MINUTE
    assert "Dashboard: bad window 1y" in caplog.text


def test_windows_and_buckets() -> None:
    assert parse_window("15m") == 15 * MINUTE and parse_window(None) == 60 * MINUTE
    assert window_range(60 * MINUTE, NOW) == (NOW - 30_000 - 59 * MINUTE, NOW + 30_000, MINUTE)
    start, end, bucket = window_range(7 * 24 * 60 * MINUTE, NOW)
    assert bucket == 3 * 60 * MINUTE and (end - start) / bucket == 56 and end > NOW
    assert histogram_percentile([0] * 12, 0.5) == 0
    # Inclusive upper bounds, the last bucket open (as convex/convex/lib/logs.ts buckets).
    assert [latency_bucket(ms) for ms in (0, 10, 10.5, 30_000, 30_001)] == [0, 0, 1, 10, 11]
    labels = [window_label(w * MINUTE) for w in (15, 60, 6 * 60, 24 * 60, 7 * 24 * 60, 1.5)]
    assert labels == ["15m", "1h", "6h", "24h", "7d", "2m"]
    assert all(parse_window(label) for label in labels)


# -- live ------------------------------------------------------------------------------------


def snapshots(
    client: httpx.Client, path: str, timeout: float
) -> Generator[dict[str, Any], None, None]:
    """The `snapshot` events of an event stream, as they come."""
    with client.stream("GET", path, headers=BEARER, timeout=timeout) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "snapshot":
                yield json.loads(line[6:])


def test_events_push_a_new_snapshot_after_new_rows_on_memory(
    memory: tuple[MemoryStore, CreatedKey],
) -> None:
    store, _ = memory
    with (
        serve(dashboard(store, poll_interval=0.05)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        updates = snapshots(client, "/api/events", timeout=5)
        check_known_figures(next(updates))
        asyncio.run(store.write_logs(more_rows(NOW)))
        assert next(updates)["totals"]["requests"] == 10
        updates.close()


def write_more_rows(server_: ConvexTestServer) -> None:
    """New rows from another client of the deployment, as another instance would write them."""

    async def write() -> None:
        writer = ConvexStore(server_.url, server_.admin_key, timeout=10)
        try:
            await writer.write_logs(more_rows(NOW))
        finally:
            await writer.close()

    asyncio.run(write())


@pytest.fixture
def convex(convex_server: ConvexTestServer) -> Iterator[tuple[ConvexTestServer, CreatedKey]]:
    convex_server.reset()

    async def seed() -> CreatedKey:
        store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
        try:
            return await seeded(store)
        finally:
            await store.close()

    yield convex_server, asyncio.run(seed())


def test_snapshot_and_live_updates_on_convex(convex: tuple[ConvexTestServer, CreatedKey]) -> None:
    server_, created = convex
    store = ConvexStore(server_.url, server_.admin_key, timeout=10)
    with (
        serve(dashboard(store, throttle=0.05)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        answer = client.get("/api/snapshot", headers=BEARER)
        check_known_figures(answer.json())
        assert created.key not in answer.text and created.record.key_hash not in answer.text
        assert server_.admin_key not in answer.text
        # Pushed by the subscription, not polled: the poll interval is far longer than the wait.
        updates = snapshots(client, "/api/events", timeout=20)
        check_known_figures(next(updates))

        write_more_rows(server_)
        assert next(updates)["totals"]["requests"] == 10
        updates.close()


def test_the_static_files_ship_in_the_package() -> None:
    static = resources.files("convex_guard.dashboard") / "static"
    names = {entry.name for entry in static.iterdir()}
    assert {"index.html", "app.js", "app.css"} <= names
    html = (static / "index.html").read_text()
    # Nothing fetched from elsewhere at run time.
    assert "http" not in html.replace('"http://www.w3.org', "")


def test_the_cli_serves_the_dashboard_and_prints_where(
    convex: tuple[ConvexTestServer, CreatedKey],
) -> None:
    server_, created = convex
    env = {
        **os.environ,
        "CONVEX_SELF_HOSTED_URL": server_.url,
        "CONVEX_SELF_HOSTED_ADMIN_KEY": server_.admin_key,
    }
    env.pop("CONVEX_GUARD_DASHBOARD_TOKEN", None)
    command = [sys.executable, "-m", "convex_guard.cli", "dashboard", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--window", "15m"], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stderr is not None
        ready, _, _ = select.select([process.stderr], [], [], 20)
        assert ready, "the dashboard printed no address"
        line = process.stderr.readline()
        found = re.search(r"at (http://127\.0\.0\.1:\d+/)\?token=([\w-]{32,})$", line.strip())
        assert found is not None, line
        with httpx.Client(base_url=found.group(1), follow_redirects=True) as client:
            page = client.get("/", params={"token": found.group(2)})
            assert page.status_code == 200 and page.url.query == b""
            answer = client.get("/api/snapshot", params={"window": "15m"})
        assert answer.json()["totals"]["requests"] == 7
        assert created.key not in answer.text
    finally:
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=15)
    assert process.returncode in (0, 130)
    assert server_.admin_key not in line + rest


# -- in a real browser ----------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by `make test` when missing


class NoLiveStore(MemoryStore):
    """A store whose subscriptions fail at once: the page must poll."""

    async def watch_dashboard(
        self, start: float, end: float, bucket_ms: float
    ) -> AsyncIterator[DashboardSnapshot]:
        raise StoreUnavailableError("no subscriptions today")
        yield  # an async generator all the same


@pytest.mark.slow  # 5-8 s: chromium's start and two waits for the page
def test_the_page_in_chromium_shows_the_figures_and_follows_new_rows(
    memory: tuple[MemoryStore, CreatedKey], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    store, created = memory
    with (
        serve(dashboard(store, poll_interval=0.1)) as server,
        sync_playwright() as playwright,
    ):
        # Root in a container has no user namespace for chromium's sandbox.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1500})
            # The page runs under its own CSP (no eval): Playwright's locator assertions do
            # too, where `wait_for_function` would not.
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{server.url}/?token={TOKEN}")
            assert page.url == f"{server.url}/"  # the token left the address bar
            # The page opens with the dashboard's own window.
            expect(page.locator('button[data-window="15m"]')).to_have_class("active")
            expect(page.locator("#tile-requests")).to_have_text("7")
            tiles = {
                name: page.text_content(f"#tile-{name}")
                for name in ("success", "p50", "p95", "tokens", "cost", "auth", "bots")
            }
            assert tiles == {
                "success": "57.1%",
                "p50": "100 ms",
                "p95": "5,000 ms",
                "tokens": "65",
                "cost": "$0.6500",
                "auth": "3",
                "bots": "3",
            }

            def value(key: str) -> str | None:
                return page.get_attribute(f'[data-key="{key}"]', "data-value")

            assert [value(f"refusals/{r}") for r in ("limit", "bot", "key", "budget")] == [
                "1",
                "1",
                "1",
                "0",
            ]
            assert value("bots/bot_useragent/blocked") == "2"
            assert value("bots/ai_scraper/challenged") == "1"
            assert page.text_content('[data-key="p95/openai"] .value') == "1,000 ms"
            assert page.text_content('[data-key="success/anthropic"] .value') == "50%"
            assert page.text_content('[data-key="tokens/openai"] .value') == "60"
            label = f"billing-service ({created.record.prefix}…)"
            assert page.text_content(f'[data-key="keys/{created.record.id}"] text') == label
            line = '[data-key="rpm/openai"]'
            assert page.get_attribute(line, "data-total") == "5"
            points = page.get_attribute(line, "points")
            expect(page.locator("#status")).to_have_class(re.compile(r"\blive\b"))

            # Playwright's sync API runs a loop of its own here: write from another thread.
            writing = threading.Thread(target=asyncio.run, args=(store.write_logs(more_rows(NOW)),))
            writing.start()
            writing.join()
            expect(page.locator(line)).to_have_attribute("data-total", "8")
            assert page.get_attribute(line, "points") != points  # the chart was redrawn
            assert page.text_content("#tile-requests") == "10"
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            html = page.content()
            assert created.key not in html and created.record.key_hash not in html
            assert errors == []

            # Live updates that fail: the page polls instead, and still follows new rows.
            other_store = NoLiveStore()
            with serve(dashboard(other_store, poll_interval=0.1)) as other:
                page.goto(f"{other.url}/?token={TOKEN}")
                expect(page.locator("#tile-requests")).to_have_text("0")
                expect(page.locator("#status")).to_have_text(re.compile("polling"))
                writing = threading.Thread(
                    target=asyncio.run, args=(other_store.write_logs(more_rows(NOW)),)
                )
                writing.start()
                writing.join()
                expect(page.locator("#tile-requests")).to_have_text("3")
        finally:
            browser.close()


def test_mounted_under_a_path(memory: tuple[MemoryStore, CreatedKey]) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    store, _ = memory
    site = Starlette(routes=[Mount("/ops/dashboard", app=dashboard(store))])
    with serve(site) as server, httpx.Client(base_url=server.url) as client:
        first = client.get(f"/ops/dashboard/?token={TOKEN}")
        assert first.status_code == 303 and first.headers["location"] == "/ops/dashboard/"
        assert "Path=/ops/dashboard/" in first.headers["set-cookie"]
        assert client.get("/ops/dashboard/").status_code == 200
        assert client.get("/ops/dashboard/api/snapshot").json()["totals"]["requests"] == 7
        assert client.get("/ops/dashboard/static/app.css").status_code == 200


def test_the_cli_in_process_with_a_token_of_yours(
    memory: tuple[MemoryStore, CreatedKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = memory
    monkeypatch.setenv("CONVEX_GUARD_DASHBOARD_TOKEN", TOKEN)
    err = io.StringIO()
    seen: dict[str, Any] = {}

    def visit() -> None:
        try:
            deadline = time.monotonic() + 10
            while "dashboard of" not in err.getvalue() and time.monotonic() < deadline:
                time.sleep(0.02)
            seen["line"] = err.getvalue()
            found = re.search(r"at (http://127\.0\.0\.1:\d+/)$", seen["line"].strip())
            assert found is not None
            with httpx.Client(base_url=found.group(1), headers=BEARER) as client:
                seen["snapshot"] = client.get("/api/snapshot", params={"window": "15m"}).json()
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    visitor = threading.Thread(target=visit)
    visitor.start()
    code = main(["dashboard", "--port", "0"], store=store, stderr=err)
    visitor.join(10)
    assert code in (0, 130), err.getvalue()
    assert TOKEN not in seen["line"]  # a token you gave is yours to hand on
    assert seen["snapshot"]["totals"]["requests"] == 7


class FailingStore(MemoryStore):
    async def dashboard(self, start: float, end: float, bucket_ms: float) -> DashboardSnapshot:
        raise StoreUnavailableError("down at http://***@store.example")


def test_a_store_that_fails_is_a_503_and_an_unavailable_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "convex_guard.dashboard")
    board = dashboard(ResilientStore(FailingStore()))
    with serve(board) as server, httpx.Client(base_url=server.url, headers=BEARER) as client:
        answer = client.get("/api/snapshot")
        assert answer.status_code == 503
        assert answer.json() == {
            "title": "Store unavailable",
            "status": 503,
            "detail": "The store did not answer; retry shortly.",
        }
        events = client.get("/api/events", timeout=5)
        assert events.status_code == 200 and events.text == "event: unavailable\ndata: {}\n\n"
    assert "the store failed" in caplog.text


class GarbageConvexStore(ConvexStore):
    """A ConvexStore whose deployment answers `dashboard:snapshot` with something else."""

    def __init__(self, answer: Any) -> None:
        super().__init__("http://127.0.0.1:9", "admin-key", timeout=1)
        self.answer = answer

    async def _call(
        self, kind: Literal["query", "mutation"], path: str, args: Mapping[str, Any]
    ) -> Any:
        return self.answer


@pytest.mark.parametrize(
    "answer",
    [None, [], {}, {"providers": "x"}, {"providers": [{"provider": 1}], "refusals": {}}],
    ids=["null", "list", "empty", "wrong-type", "missing-fields"],
)
def test_a_snapshot_of_the_wrong_shape_is_a_503_never_a_500(
    answer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "convex_guard.dashboard")
    store = GarbageConvexStore(answer)
    with (
        serve(dashboard(store)) as server,
        httpx.Client(base_url=server.url, headers=BEARER) as client,
    ):
        answer_ = client.get("/api/snapshot")
        assert answer_.status_code == 503, answer_.text
    assert "dashboard:snapshot" in caplog.text
    asyncio.run(store.close())


class BurstStore(MemoryStore):
    """A store whose subscription pushes 20 changes in 0.1 s, then nothing."""

    async def watch_dashboard(
        self, start: float, end: float, bucket_ms: float
    ) -> AsyncIterator[DashboardSnapshot]:
        for _ in range(20):
            await self.write_logs(more_rows(NOW))
            yield await self.dashboard(start, end, bucket_ms)
            await asyncio.sleep(0.005)
        await asyncio.sleep(60)


def test_a_burst_of_pushes_reaches_the_page_as_the_first_and_the_latest() -> None:
    board = dashboard(BurstStore(), throttle=0.3, poll_interval=0.01)
    with serve(board) as server, httpx.Client(base_url=server.url) as client:
        updates = snapshots(client, "/api/events", timeout=1.5)
        # The first push goes at once (3 rows, or a few more on a busy machine), the 19 others
        # within the next 0.3 s as one: the latest.
        assert next(updates)["totals"]["requests"] < 60
        assert next(updates)["totals"]["requests"] == 60
        with pytest.raises(httpx.ReadTimeout):
            next(updates)  # and nothing since, though the store is polled every 10 ms
        updates.close()


@given(
    latencies=st.lists(st.floats(0, 60_000, allow_nan=False), min_size=1, max_size=200),
    q=st.sampled_from([0.5, 0.95, 0.99, 1.0]),
)
def test_the_histogram_percentile_is_the_bucket_of_the_nearest_rank(
    latencies: list[float], q: float
) -> None:
    counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    for ms in latencies:
        counts[latency_bucket(ms)] += 1
    exact = sorted(latencies)[math.ceil(q * len(latencies)) - 1]  # the nearest-rank quantile
    bucket = min(latency_bucket(exact), len(LATENCY_BOUNDS_MS) - 1)
    assert histogram_percentile(counts, q) == LATENCY_BOUNDS_MS[bucket]
    assert histogram_percentile(counts, q) >= min(exact, LATENCY_BOUNDS_MS[-1])


def test_both_stores_bucket_latencies_alike() -> None:
    """The Convex rollups' bounds are the Python side's: the percentiles agree."""
    source = (Path(__file__).parents[1] / "convex" / "convex" / "lib" / "logs.ts").read_text()
    found = re.search(r"export const LATENCY_BOUNDS_MS = \[([\d, ]+)\];", source)
    assert found is not None
    assert tuple(float(n) for n in found.group(1).split(",")) == LATENCY_BOUNDS_MS


class CountingStore(MemoryStore):
    """A store whose subscription pushes one snapshot, and counts the subscriptions."""

    subscriptions = 0

    async def watch_dashboard(
        self, start: float, end: float, bucket_ms: float
    ) -> AsyncIterator[DashboardSnapshot]:
        self.subscriptions += 1
        yield await self.dashboard(start, end, bucket_ms)
        await asyncio.sleep(60)


def test_the_subscription_is_renewed_when_the_window_moves_on() -> None:
    store = CountingStore()
    # 0.3 s before a bucket ends: the window moves on, and the range subscribed to with it.
    end_of_bucket = (NOW // MINUTE + 1) * MINUTE - 300
    board = app(store, token=TOKEN, window=15 * MINUTE, clock=lambda: end_of_bucket, throttle=0)
    with serve(board) as server, httpx.Client(base_url=server.url) as client:
        updates = snapshots(client, "/api/events", timeout=1.5)
        assert next(updates)["totals"]["requests"] == 0
        with pytest.raises(httpx.ReadTimeout):
            next(updates)  # the same figures from each new subscription are not sent again
        updates.close()
    assert store.subscriptions >= 3


# -- behind a ResilientStore (what the environment's Convex store comes wrapped in) ----------


def test_behind_a_resilient_store_the_dashboard_follows_the_subscription(
    convex: tuple[ConvexTestServer, CreatedKey],
) -> None:
    server_, _ = convex
    store = ResilientStore(ConvexStore(server_.url, server_.admin_key, timeout=10), timeout=10)
    assert hasattr(store, "watch_dashboard")
    # Pushed by the subscription: the dashboard would poll once a minute.
    board = dashboard(store, throttle=0.05, poll_interval=60)
    with serve(board) as server, httpx.Client(base_url=server.url) as client:
        updates = snapshots(client, "/api/events", timeout=20)
        check_known_figures(next(updates))

        started = time.monotonic()
        write_more_rows(server_)
        assert next(updates)["totals"]["requests"] == 10
        assert time.monotonic() - started < 20
        updates.close()
    assert store.breaker.state == "closed"


def test_a_resilient_store_over_a_store_without_subscriptions_has_none() -> None:
    store = ResilientStore(MemoryStore())
    assert not hasattr(store, "watch_dashboard")
    assert getattr(store, "watch_dashboard", None) is None


class BrokenFeedStore(MemoryStore):
    """A store whose subscription pushes one snapshot, then fails with no StoreError."""

    async def watch_dashboard(
        self, start: float, end: float, bucket_ms: float
    ) -> AsyncIterator[DashboardSnapshot]:
        yield await self.dashboard(start, end, bucket_ms)
        await asyncio.sleep(0.05)
        raise RuntimeError("the connection dropped")


def test_a_failing_subscription_behind_a_resilient_store_ends_the_stream_for_polling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "convex_guard.dashboard")
    store = ResilientStore(BrokenFeedStore())
    board = dashboard(store, throttle=0)
    with serve(board) as server, httpx.Client(base_url=server.url, headers=BEARER) as client:
        for _ in range(4):  # more failures than the breaker's threshold
            events = client.get("/api/events", timeout=5)
            assert events.status_code == 200
            assert events.text.startswith("event: snapshot\ndata: ")
            assert events.text.endswith("event: unavailable\ndata: {}\n\n")
        # Not one of them counted against the request path's circuit: polling still answers.
        assert store.breaker.state == "closed"
        assert client.get("/api/snapshot").status_code == 200
    assert "RuntimeError: the connection dropped" in caplog.text
