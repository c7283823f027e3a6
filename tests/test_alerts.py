"""Anomaly alerts: the rules' properties, and delivery end to end through real servers: an
auth-failure spike becomes one alert, logged and posted once (with many instances too), and a
webhook that hangs or fails never delays a request and never loses an alert silently."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from convex_guard import ConvexStore, GuardMiddleware, GuardSettings, MemoryStore, generate_key
from convex_guard.alerts import DEFAULT_RULES, AlertRule
from convex_guard.alerts.deliver import AlertDeliverer, AlertSettings, alert_body
from convex_guard.cli import main as cli_main
from convex_guard.core.alerts import (
    MAX_COUNT_THRESHOLD,
    WatchedLimit,
    evaluate,
    opens_new,
    spent,
    window,
)
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.keys import NO_KEY
from convex_guard.core.limits import HOUR, MINUTE, FixedWindow, TokenBucket
from convex_guard.stores import alertbook
from convex_guard.stores.base import Alert, AuthFailure, LogBatch

from .conftest import ConvexTestServer, RunningServer, serve

BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"

# -- the rules, pure --------------------------------------------------------------------------


@given(threshold=st.integers(0, MAX_COUNT_THRESHOLD), count=st.integers(0, 10_000))
def test_a_count_rule_fires_exactly_above_its_threshold(threshold: int, count: int) -> None:
    for kind in ("auth_failures", "bot_wave"):
        rule = AlertRule(kind, threshold=threshold, window_ms=MINUTE)
        found = evaluate(rule, "s", count)
        assert (found is not None) == (count > threshold)
        if found is not None:
            assert (found.value, found.threshold, found.subject) == (count, threshold, "s")
        # Reading up to read_cap rows always decides as reading them all would.
        capped = evaluate(rule, "s", min(count, rule.read_cap))
        assert (capped is None) == (found is None)


@given(
    threshold=st.floats(0, 0.99),
    failed=st.integers(0, 500),
    ok=st.integers(0, 500),
    least=st.integers(0, 100),
)
def test_an_error_rate_needs_enough_requests_and_a_share_above_the_threshold(
    threshold: float, failed: int, ok: int, least: int
) -> None:
    rule = AlertRule("error_rate", threshold, 5 * MINUTE, min_requests=least)
    total = failed + ok
    found = evaluate(rule, "provider:groq", failed, total)
    expected = total > 0 and total >= least and failed / total > threshold
    assert (found is not None) == expected
    if found is not None:
        assert 0 < found.value <= 1


@given(
    rate=st.integers(1, 10_000),
    remaining=st.floats(-1e5, 1e5),
    threshold=st.floats(0, 0.99),
    bucket=st.booleans(),
)
def test_a_limit_alerts_when_more_than_its_threshold_share_is_spent(
    rate: int, remaining: float, threshold: float, bucket: bool
) -> None:
    config = TokenBucket(rate=rate, period=HOUR) if bucket else FixedWindow(rate=rate, period=HOUR)
    watched = WatchedLimit("globalAIRequests", config)
    rule = AlertRule("limit_exhaustion", threshold, HOUR, limits=(watched,))
    used, capacity = spent(config, remaining)
    assert 0 <= used <= capacity == rate
    found = evaluate(rule, watched.subject, used, capacity, window_ms=config.period)
    share = min(max(rate - remaining, 0), rate) / rate
    assert (found is not None) == (share > threshold)
    if found is not None:
        assert found.subject == "limit:globalAIRequests" and found.window_ms == HOUR


@given(now=st.floats(1e12, 2e12), minutes=st.integers(1, 60))
def test_minute_rules_count_whole_minutes_that_have_ended(now: float, minutes: int) -> None:
    for kind in ("bot_wave", "error_rate"):
        rule = AlertRule(kind, 0.5, minutes * MINUTE)
        start, end = window(rule, now)
        assert end <= now < end + MINUTE and end % MINUTE == 0
        assert end - start == minutes * MINUTE
    auth = AlertRule("auth_failures", 10, HOUR)
    assert window(auth, now) == (now - HOUR, math.inf)


@settings(max_examples=50, deadline=None)
@given(
    gaps=st.lists(st.floats(0, 3 * HOUR), min_size=1, max_size=30),
    cooldown=st.sampled_from([MINUTE, HOUR]),
)
def test_findings_open_one_alert_per_cooldown(gaps: list[float], cooldown: float) -> None:
    """Through a MemoryStore: the alerts opened are exactly the greedy cool-down starts."""
    clock = [1e12]
    store = MemoryStore(clock=lambda: clock[0])
    rule = AlertRule("auth_failures", threshold=0, window_ms=HOUR, cooldown_ms=cooldown)
    store.configure_alerts([rule])
    opened_at: list[float] = []
    seen = 0
    for i, gap in enumerate(gaps):
        clock[0] += gap
        if not opened_at or opens_new(opened_at[-1], clock[0], cooldown):
            opened_at.append(clock[0])
        seen += 1
        batch = LogBatch(f"b{i}", auth_failures=[AuthFailure("no-key", clock[0], "192.0.2.1")])
        asyncio.run(store.write_logs(batch))
    alerts = asyncio.run(store.alerts(since=0, limit=1000))
    assert sorted(a.first_seen for a in alerts) == opened_at
    assert sum(a.count for a in alerts) == seen


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "nope", "threshold": 1, "window_ms": MINUTE},
        {"kind": "bot_wave", "threshold": -1, "window_ms": MINUTE},
        {"kind": "bot_wave", "threshold": 1, "window_ms": 90_000},
        {"kind": "error_rate", "threshold": 1.5, "window_ms": MINUTE},
        {"kind": "auth_failures", "threshold": math.nan, "window_ms": HOUR},
        {"kind": "auth_failures", "threshold": 1, "window_ms": 0},
        {"kind": "bot_wave", "threshold": 5000, "window_ms": MINUTE},  # reads too many rows
        {"kind": "limit_exhaustion", "threshold": 0.9, "window_ms": HOUR},  # no limits
        {
            "kind": "bot_wave",
            "threshold": 1,
            "window_ms": MINUTE,
            "limits": (WatchedLimit("g", TokenBucket(rate=1, period=HOUR)),),
        },
    ],
)
def test_a_bad_rule_fails_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        AlertRule(**options)


def test_bad_alert_settings_fail_at_construction() -> None:
    for options in (
        {"webhook_url": "ftp://x"},
        {"timeout": 0},
        {"retries": -1},
        {"max_attempts": 0},
        {"rules": DEFAULT_RULES[0]},
    ):
        with pytest.raises(ConfigurationError):
            AlertSettings(**options)
    hidden = AlertSettings(webhook_url="https://user:secret@hooks.example/x")
    assert "secret" not in repr(hidden)


# -- a webhook receiver and a webhook that hangs -------------------------------------------------


class Hook:
    """A loopback webhook: records every post (time, JSON body), answers `statuses` in turn
    (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.posts: list[tuple[float, dict[str, Any], str]] = []
        self.statuses = list(statuses or [])
        self.lock = threading.Lock()

        async def hook(request: Request) -> Response:
            raw = (await request.body()).decode()
            with self.lock:
                self.posts.append((time.monotonic(), json.loads(raw), raw))
                status = self.statuses.pop(0) if self.statuses else 200
            return Response(status_code=status)

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@pytest.fixture
def hook() -> Iterator[tuple[Hook, RunningServer]]:
    receiver = Hook()
    with serve(receiver.app) as server:
        yield receiver, server


class Hanging:
    """A TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def wait_for(check: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def guarded(store: Any, alerts: AlertSettings | None) -> GuardMiddleware:
    inner = Starlette(
        routes=[Route("/api/embeddings", ok, methods=["POST"]), Route("/api/ai/{p}/x", ok)]
    )
    return GuardMiddleware(
        inner, settings=GuardSettings(store=store, writer_interval=0.05, alerts=alerts)
    )


def deliverer_of(guard: GuardMiddleware) -> AlertDeliverer:
    [deliverer] = [c for c in guard.writer.companions if isinstance(c, AlertDeliverer)]
    return deliverer


def spike(server: RunningServer, keys: list[str]) -> list[int]:
    """One client presenting each (bad) key once: its auth failures."""
    with httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c:
        return [
            c.post(
                "/api/embeddings", json={"input": ["a"]}, headers={"Authorization": f"Bearer {k}"}
            ).status_code
            for k in keys
        ]


def fast(webhook_url: str | None, **options: Any) -> AlertSettings:
    return AlertSettings(webhook_url=webhook_url, poll_interval=0.05, **options)


# -- end to end ---------------------------------------------------------------------------------


def test_an_auth_failure_spike_is_one_alert_logged_and_posted_without_secrets(
    hook: tuple[Hook, RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="convex_guard")
    receiver, hook_server = hook
    store = MemoryStore()
    guard = guarded(store, fast(f"{hook_server.url}/hook"))
    keys = [generate_key("embedding") for _ in range(11)]
    with serve(guard, proxy_headers=False) as server:
        statuses = spike(server, keys[:10])
        assert statuses == [401] * 10
        time.sleep(0.3)  # ten failures: not an anomaly
        assert receiver.posts == []
        assert spike(server, keys[10:]) == [429]  # the 11th: the failedAuth limit, recorded too
        wait_for(lambda: len(receiver.posts) == 1, what="the webhook post")
        time.sleep(0.3)  # more polls: still one post
        deliverer = deliverer_of(guard)
        assert (deliverer.sent, deliverer.failed, deliverer.dropped) == (1, 0, 0)
    [(_, body, raw)] = receiver.posts
    assert body["kind"] == "auth_failures"
    assert body["subject"] == "client:127.0.0.1"
    assert (body["value"], body["threshold"], body["windowMs"]) == (11, 10, HOUR)
    assert body["firstSeen"] <= body["lastSeen"] and body["count"] >= 1
    assert set(body) == {
        "source", "id", "kind", "subject", "value", "threshold", "windowMs", "firstSeen",
        "lastSeen", "count",
    }  # fmt: skip
    logged = caplog.text
    assert "Alert: auth_failures on client:127.0.0.1: 11 > 10" in logged
    for key in keys:
        assert key not in raw and key not in logged
    [alert] = asyncio.run(store.alerts(since=0))
    assert (alert.status, alert.attempts) == ("delivered", 1)


def test_two_instances_on_convex_post_each_anomaly_once(
    convex_server: ConvexTestServer, hook: tuple[Hook, RunningServer]
) -> None:
    convex_server.reset()
    receiver, hook_server = hook
    url = f"{hook_server.url}/hook"
    stores = [ConvexStore(convex_server.url, convex_server.admin_key, timeout=10) for _ in "ab"]
    guards = [guarded(s, fast(url, retries=0)) for s in stores]
    for guard, store in zip(guards, stores, strict=True):
        # Closed at lifespan shutdown, in the server's loop its connections belong to.
        guard.writer.companions.append(Closer(store))
    keys = [generate_key("embedding") for _ in range(11)]
    with serve(guards[0], proxy_headers=False) as one, serve(guards[1], proxy_headers=False) as two:
        # One client, its failures spread over both instances: the shared store counts them.
        spike(one, keys[:6])
        spike(two, keys[6:11])
        wait_for(lambda: len(receiver.posts) >= 1, what="the webhook post")
        time.sleep(1.0)  # both deliverers poll every 50 ms meanwhile
        delivered = [deliverer_of(g).sent for g in guards]
    assert len(receiver.posts) == 1
    assert sorted(delivered) == [0, 1]
    [(_, body, raw)] = receiver.posts
    assert (body["kind"], body["subject"], body["value"]) == (
        "auth_failures",
        "client:127.0.0.1",
        11,
    )
    assert convex_server.admin_key not in raw
    assert all(key not in raw for key in keys)

    async def listed() -> list[Alert]:
        reader = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
        try:
            return await reader.alerts(since=0)
        finally:
            await reader.close()

    [alert] = asyncio.run(listed())
    assert (alert.status, alert.attempts) == ("delivered", 1)


class Closer:
    def __init__(self, store: ConvexStore) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self.store.close()


def latencies(server: RunningServer, n: int) -> list[float]:
    with httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c:
        c.get("/api/ai/openai/x")  # connect first
        times = []
        for _ in range(n):
            started = time.perf_counter()
            assert c.get("/api/ai/openai/x").status_code == 200
            times.append(time.perf_counter() - started)
    return times


def test_a_hanging_webhook_never_delays_requests_and_its_alert_ends_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="convex_guard")
    keys = [generate_key("embedding") for _ in range(11)]
    # The same run without a webhook: the baseline latency.
    baseline_guard = guarded(MemoryStore(), fast(None))
    with serve(baseline_guard, proxy_headers=False) as server:
        spike(server, keys)
        wait_for(lambda: deliverer_of(baseline_guard).sent == 1, what="the logged alert")
        baseline = statistics.median(latencies(server, 40))
    hanging = Hanging()
    try:
        guard = guarded(
            MemoryStore(),
            fast(hanging.url, timeout=1.0, retries=1, backoff=0.05, max_attempts=1),
        )
        with serve(guard, proxy_headers=False) as server:
            spike(server, keys)
            wait_for(lambda: len(hanging.accepted) >= 1, what="the webhook connection")
            during = statistics.median(latencies(server, 40))
            deliverer = deliverer_of(guard)
            assert deliverer.failed == 0  # still hanging while the requests ran
            wait_for(lambda: deliverer.failed == 1, what="the alert marked failed")
            assert len(hanging.accepted) == 2  # the first post and its one retry
            [alert] = asyncio.run(guard.store.alerts(since=0))  # type: ignore[attr-defined]
        assert (alert.status, alert.attempts) == ("failed", 1)
        assert deliverer.sent == 0
    finally:
        hanging.close()
    # Unchanged within a bound: no request waits for the webhook (a timeout of 1 s).
    assert during < 3 * baseline + 0.005, (during, baseline)
    assert "marked failed" in caplog.text


def test_a_failing_webhook_is_retried_with_backoff_then_delivered_or_failed(
    hook: tuple[Hook, RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, hook_server = hook

    async def run(statuses: list[int], **options: Any) -> tuple[AlertDeliverer, list[Alert]]:
        receiver.posts.clear()
        receiver.statuses = statuses
        store = MemoryStore()
        store.configure_alerts([AlertRule("auth_failures", threshold=0, window_ms=HOUR)])
        await store.write_logs(
            LogBatch("b", auth_failures=[AuthFailure("no-key", time.time() * 1000, "192.0.2.9")])
        )
        settings = fast(f"{hook_server.url}/hook", backoff=0.1, **options)
        deliverer = AlertDeliverer(store, settings)
        await deliverer.start()
        try:
            for _ in range(200):
                alerts = await store.alerts(since=0)
                if alerts[0].status != "pending":
                    break
                await asyncio.sleep(0.05)
        finally:
            await deliverer.close()
        return deliverer, alerts

    deliverer, [alert] = asyncio.run(run([500, 503], retries=3))
    assert (alert.status, deliverer.sent, deliverer.failed) == ("delivered", 1, 0)
    times = [t for t, _, _ in receiver.posts]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2  # backoff, doubling

    caplog.set_level(logging.INFO, logger="convex_guard")
    deliverer, [alert] = asyncio.run(run([500] * 10, retries=1, max_attempts=2))
    # Two claims of two posts each; the first round handed it back, the second gave up.
    assert len(receiver.posts) == 4
    assert (alert.status, alert.attempts) == ("failed", 2)
    assert (deliverer.sent, deliverer.retried, deliverer.failed) == (0, 1, 1)
    assert "handed back for a retry" in caplog.text and "marked failed" in caplog.text


def test_closing_mid_post_hands_the_alert_back_for_another_instance() -> None:
    hanging = Hanging()

    async def run() -> tuple[list[Alert], list[Alert]]:
        store = MemoryStore()
        store.configure_alerts([AlertRule("auth_failures", threshold=0, window_ms=HOUR)])
        row = AuthFailure("no-key", time.time() * 1000, "192.0.2.5")
        await store.write_logs(LogBatch("b", auth_failures=[row]))
        deliverer = AlertDeliverer(store, fast(hanging.url, timeout=30))
        await deliverer.start()
        for _ in range(200):
            if hanging.accepted:
                break
            await asyncio.sleep(0.02)
        assert await store.pending_alerts() == []  # claimed, its post hanging
        await deliverer.close()
        return await store.pending_alerts(), await store.alerts(since=0)

    try:
        pending, [alert] = asyncio.run(run())
    finally:
        hanging.close()
    assert [a.id for a in pending] == [alert.id]  # claimable now, not after the lease
    assert (alert.status, alert.attempts) == ("pending", 1)


def test_a_full_queue_leaves_alerts_pending_and_counts_them() -> None:
    async def run() -> tuple[AlertDeliverer, int, int]:
        store = MemoryStore()
        store.configure_alerts([AlertRule("auth_failures", threshold=0, window_ms=HOUR)])
        rows = [AuthFailure("no-key", time.time() * 1000, f"192.0.2.{i}") for i in range(5)]
        await store.write_logs(LogBatch("b", auth_failures=rows))
        deliverer = AlertDeliverer(store, AlertSettings(queue_size=2, poll_interval=60))
        deliverer._queue = asyncio.Queue(2)  # polled by hand: no sender draining it
        claimed = await deliverer.poll_once()
        pending = len(await store.pending_alerts())
        return deliverer, claimed, pending

    deliverer, claimed, pending = asyncio.run(run())
    assert (claimed, pending) == (2, 3)
    assert deliverer.dropped == 2  # seen (twice the queue's size is asked for) but left


def test_the_cli_lists_recent_alerts(capsys: pytest.CaptureFixture[str]) -> None:
    store = MemoryStore()
    store.configure_alerts([AlertRule("auth_failures", threshold=1, window_ms=HOUR)])
    key_hash = "f" * 64
    now = time.time() * 1000
    batch = LogBatch("b", auth_failures=[AuthFailure(key_hash, now, None)] * 2)
    asyncio.run(store.write_logs(batch))
    assert cli_main(["alerts", "--since", "1h", "--json"], store=store) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["subject"] == f"key:{key_hash}"
    assert (listed["kind"], listed["value"], listed["status"]) == ("auth_failures", 2, "pending")
    assert cli_main(["alerts"], store=store) == 0
    table = capsys.readouterr().out
    assert "auth_failures" in table and "2 > 1" in table and "pending" in table
    body = alert_body(asyncio.run(store.alerts(since=0))[0])
    assert "status" not in body and body["subject"] == f"key:{key_hash}"


def test_alerts_need_an_alert_store() -> None:
    class LogsOnly:
        async def write_logs(self, batch: LogBatch) -> None:
            return None

    guard = GuardMiddleware(
        PlainTextResponse("x"),
        settings=GuardSettings(
            store=LogsOnly(),
            rules=(),
            key_routes=(),
            bot_detection=False,
            alerts=AlertSettings(),
        ),
    )
    assert guard.error is not None and "AlertStore" in str(guard.error)


# -- an IPv6 client hopping addresses inside its /64 is one subject ----------------------------

NETWORK = "2001:db8:1:2::/64"


def rotating_spike(server: RunningServer, keys: list[str]) -> list[int]:
    """One IPv6 client (behind the trusted loopback proxy) presenting each bad key from
    another address of its /64."""
    with httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c:
        return [
            c.post(
                "/api/embeddings",
                json={"input": ["a"]},
                headers={"Authorization": f"Bearer {k}", "x-forwarded-for": f"2001:db8:1:2::{n:x}"},
            ).status_code
            for n, k in enumerate(keys, start=1)
        ]


def rotating_guard(store: Any, alerts: AlertSettings) -> GuardMiddleware:
    inner = Starlette(routes=[Route("/api/embeddings", ok, methods=["POST"])])
    settings = GuardSettings(
        store=store, writer_interval=0.05, alerts=alerts, trusted_proxies=("127.0.0.1",)
    )
    return GuardMiddleware(inner, settings=settings)


def check_one_network_alert(posts: list[tuple[float, dict[str, Any], str]]) -> None:
    [(_, body, _)] = posts
    assert (body["kind"], body["subject"], body["value"]) == (
        "auth_failures",
        f"client:{NETWORK}",
        11,
    )


def test_an_ipv6_client_rotating_inside_its_network_raises_one_alert_on_memory(
    hook: tuple[Hook, RunningServer],
) -> None:
    receiver, hook_server = hook
    store = MemoryStore()
    guard = rotating_guard(store, fast(f"{hook_server.url}/hook"))
    keys = [generate_key("embedding") for _ in range(11)]
    with serve(guard, proxy_headers=False) as server:
        assert rotating_spike(server, keys) == [401] * 10 + [429]
        wait_for(lambda: len(receiver.posts) == 1, what="the webhook post")
        time.sleep(0.3)  # more polls: still one post
    check_one_network_alert(receiver.posts)
    failures = store.auth_failures
    assert len({f.ip for f in failures}) == 11 and {f.client_key for f in failures} == {NETWORK}
    assert [a.subject for a in asyncio.run(store.alerts(since=0))] == [f"client:{NETWORK}"]


def test_an_ipv6_client_rotating_inside_its_network_raises_one_alert_on_convex(
    convex_server: ConvexTestServer, hook: tuple[Hook, RunningServer]
) -> None:
    convex_server.reset()
    receiver, hook_server = hook
    store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
    guard = rotating_guard(store, fast(f"{hook_server.url}/hook", retries=0))
    guard.writer.companions.append(Closer(store))
    keys = [generate_key("embedding") for _ in range(11)]
    with serve(guard, proxy_headers=False) as server:
        assert rotating_spike(server, keys) == [401] * 10 + [429]
        wait_for(lambda: len(receiver.posts) == 1, what="the webhook post")
        time.sleep(0.3)
    check_one_network_alert(receiver.posts)

    async def listed() -> list[Alert]:
        reader = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
        try:
            return await reader.alerts(since=0)
        finally:
            await reader.close()

    assert [a.subject for a in asyncio.run(listed())] == [f"client:{NETWORK}"]


# -- the in-process alert book is bounded -------------------------------------------------------


def test_the_memory_alert_book_is_bounded_finished_alerts_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(alertbook, "MAX_ALERTS", 3)
    now = [1_000_000_000.0]
    store = MemoryStore(clock=lambda: now[0])
    store.configure_alerts([AlertRule("auth_failures", threshold=0, window_ms=HOUR)])

    async def fail_from(ip: str) -> None:
        row = AuthFailure(NO_KEY, now[0], ip, "curl/8")
        await store.write_logs(LogBatch(id=ip, auth_failures=[row]))
        now[0] += 1

    async def run() -> list[str]:
        for i in range(3):
            await fail_from(f"192.0.2.{i}")
        # The first one delivered: the next alert over the bound drops it, not a pending one.
        first = (await store.pending_alerts(limit=1))[0]
        assert await store.claim_alert(first.id, "me", 60_000)
        assert await store.mark_alert(first.id, "me", "delivered")
        await fail_from("192.0.2.3")
        assert "dropped" not in caplog.text
        # Now every kept alert is pending: the oldest goes, and an error says so.
        await fail_from("192.0.2.4")
        return sorted(a.subject for a in await store.alerts(since=0, limit=100))

    with caplog.at_level(logging.ERROR, "convex_guard"):
        subjects = asyncio.run(run())
    assert subjects == ["client:192.0.2.2", "client:192.0.2.3", "client:192.0.2.4"]
    assert "dropped the oldest pending alert, auth_failures on client:192.0.2.1" in caplog.text
