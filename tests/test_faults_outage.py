"""Store outage: the loopback Convex server is SIGKILLed under load, then restarted (empty) on the
same port. No request gets a 500, limits fall back to this process (or follow each rule's fail
policy), the circuit breaker stops paying for a dead store, and every log row produced during
the outage reaches the restarted store once, in order."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from examples.gateway import create_app

from convex_guard import (
    HOUR,
    CircuitBreaker,
    FixedWindow,
    GuardSettings,
    ResilientStore,
    Rule,
)

from .conftest import serve
from .convex_server.launch import ConvexTestServer, running_server
from .fault_tools import (
    BROWSER,
    UNKNOWN_MODEL,
    RecordingConvexStore,
    breaker_state,
    chat,
    resilient_settings,
)

TIMEOUT = 0.5
COOLDOWN = 0.5
WORKERS = 4
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; probe-{})"


@pytest.fixture
def convex() -> Iterator[ConvexTestServer]:
    """A server of this test's own: it gets killed."""
    with running_server() as server:
        yield server


@dataclass
class Load:
    """`WORKERS` clients, each sending chats one after another with numbered models."""

    url: str
    statuses: list[int] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)
    models: list[str] = field(default_factory=list)  # every chat that got an answer
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, headers={"user-agent": BROWSER}, timeout=10) as c:
            n = 0
            while not self.stop.is_set():
                model = f"w{worker}-{n:06d}"
                n += 1
                sent = time.monotonic()
                try:
                    status = c.post("/api/ai/openai/chat", json=chat(model)).status_code
                except Exception as exc:  # a failed request is a test failure, reported below
                    with self.lock:
                        self.errors.append(exc)
                    return
                with self.lock:
                    self.statuses.append(status)
                    self.latencies.append((sent, time.monotonic() - sent))
                    self.models.append(model)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.run, args=(w,)) for w in range(WORKERS)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the store to catch up"
        time.sleep(0.1)


def convex_guard_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.exc_info is not None or (r.name.startswith("convex_guard") and r.levelno >= 40)
    ]


@pytest.mark.slow
def test_outage_under_load_falls_back_and_loses_no_rows(
    convex: ConvexTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    rules = [
        Rule("outageIp", FixedWindow(rate=100_000, period=HOUR), key="ip", path="/api/ai"),
        # Three an hour per IP: decided by the in-process fallback during the outage.
        Rule("tight", FixedWindow(rate=3, period=HOUR), key="ip", path="/api/ai/perplexity"),
    ]
    primary, store, settings = resilient_settings(
        convex.url, convex.admin_key, rules, timeout=TIMEOUT, cooldown=COOLDOWN
    )
    app = create_app(settings, upstream=None)
    # uvicorn must not rewrite the client from X-Forwarded-For: the guard decides alone.
    with serve(app, proxy_headers=False) as server, Load(server.url) as load:
        time.sleep(1.0)
        convex.kill()
        killed_at = time.monotonic()
        checks_at_kill = primary.calls["check"]

        # During the outage: limits decided here, bots and failed auth recorded for later.
        with httpx.Client(base_url=server.url, timeout=10) as c:
            bots = []
            for n in range(6):
                r = c.post(
                    "/api/ai/openai/chat", json=chat("x"), headers={"user-agent": GPTBOT.format(n)}
                )
                bots.append(r.status_code)
            tight = [
                c.post(
                    "/api/ai/perplexity/chat",
                    json=chat(f"p-{n}"),
                    headers={"user-agent": BROWSER},
                ).status_code
                for n in range(5)
            ]
            failures = [
                c.post(
                    "/api/embeddings",
                    json={"input": ["a"]},
                    headers={"user-agent": f"{BROWSER} auth-{n}"},
                ).status_code
                for n in range(4)
            ]
            time.sleep(1.5)
            assert store.breaker.state in ("open", "half-open")

        accepted_by_old = primary.accepted_snapshot()
        outage = time.monotonic() - killed_at
        checks_during_outage = primary.calls["check"] - checks_at_kill
        answered_during_outage = sum(1 for sent, _ in load.latencies if sent >= killed_at)
        convex.restart()
        time.sleep(1.0)

    assert not load.errors, load.errors[:3]
    assert set(load.statuses) == {200}, sorted(set(load.statuses))
    assert bots == [403] * 6
    assert tight == [200, 200, 200, 429, 429], "the fallback enforces the limit in-process"
    assert failures == [401] * 4
    # The breaker: while the store was dead only probes (one per cool-down) and the calls in
    # flight at the kill reached it, not every request.
    assert answered_during_outage > 50
    assert checks_during_outage <= WORKERS + 3 + outage / COOLDOWN + 2, checks_during_outage
    # Latency stayed bounded by the timeout: 99% within it plus 1 s of scheduling on a loaded
    # 2-core machine (client and server share this process), none anywhere near the outage.
    seconds = sorted(seconds for _, seconds in load.latencies)
    assert seconds[int(len(seconds) * 0.99)] < TIMEOUT + 1.0, seconds[-5:]
    assert seconds[-1] < TIMEOUT + 3.0, seconds[-5:]
    assert breaker_state(store.breaker) == "closed", "half-open probes closed the circuit again"

    # Every row not accepted by the old server reaches the new one: once, in order.
    old_models = [r.model for b in accepted_by_old for r in b.ai_requests]
    expected = [m for m in load.models if m not in set(old_models)]
    expected_count = len(expected) + 6 + 5  # + bot-blocked chats + perplexity chats

    def ai_rows() -> list[dict[str, object]]:
        return convex.rows("aiRequestLogs")

    wait_for(lambda: len(ai_rows()) >= expected_count)
    time.sleep(0.5)  # anything extra (a duplicate) would have landed by now
    rows = ai_rows()
    models = [str(r["model"]) for r in rows]
    assert len(rows) == expected_count, (len(rows), expected_count)
    worker_models = [m for m in models if m.startswith("w")]
    assert len(worker_models) == len(set(worker_models)), "no row twice"
    assert sorted(worker_models) == sorted(expected)
    assert not set(worker_models) & set(old_models)
    for w in range(WORKERS):
        mine = [m for m in worker_models if m.startswith(f"w{w}-")]
        assert mine == sorted(mine), f"worker {w}'s rows out of order"
    perplexity = [(r["model"], r.get("error")) for r in rows if r["provider"] == "perplexity"]
    assert (
        perplexity
        == [(f"p-{n}", None) for n in range(3)] + [(UNKNOWN_MODEL, "rate_limited:tight")] * 2
    )
    bot_rows = [r.get("error") for r in rows if r["provider"] == "openai" and r["model"] == "x"]
    assert bot_rows == [] and models.count(UNKNOWN_MODEL) == 6 + 2

    events = convex.rows("botDetectionEvents")
    assert [str(e["userAgent"]) for e in events] == [GPTBOT.format(n) for n in range(6)]
    assert {str(e["action"]) for e in events} == {"blocked"}
    auth = convex.rows("embeddingAuthFailures")
    assert [str(a["userAgent"]) for a in auth] == [f"{BROWSER} auth-{n}" for n in range(4)]
    assert len(convex.rows("embeddingRequests")) == 4
    assert not convex_guard_tracebacks(caplog)


@pytest.mark.slow
def test_without_fallback_each_rule_follows_its_fail_policy(
    convex: ConvexTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    primary = RecordingConvexStore(convex.url, convex.admin_key)
    store = ResilientStore(
        primary,
        use_fallback=False,
        timeout=TIMEOUT,
        breaker=CircuitBreaker(threshold=2, cooldown=COOLDOWN),
    )
    rules = [
        Rule("openRule", FixedWindow(rate=1000, period=HOUR), key="ip", path="/api/ai/openai"),
        Rule(
            "closedRule",
            FixedWindow(rate=1000, period=HOUR),
            key="ip",
            path="/api/ai/groq",
            fail="closed",
        ),
    ]
    settings = GuardSettings(store=store, rules=rules, timeout=TIMEOUT, writer_interval=0.05)
    app = create_app(settings, upstream=None)
    with (
        serve(app, proxy_headers=False) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c,
    ):
        assert c.post("/api/ai/openai/chat", json=chat("a")).status_code == 200
        convex.kill()
        opened: list[int] = []
        closed: list[int] = []
        started = time.monotonic()
        for n in range(40):
            opened.append(c.post("/api/ai/openai/chat", json=chat(f"o{n}")).status_code)
            answer = c.post("/api/ai/groq/chat", json=chat(f"g{n}"))
            closed.append(answer.status_code)
            if answer.status_code == 503:
                assert answer.headers["content-type"] == "application/problem+json"
                assert int(answer.headers["Retry-After"]) >= 1
        elapsed = time.monotonic() - started
        checks = primary.calls["check"]
        convex.restart()
        time.sleep(COOLDOWN + 0.1)
        # The first probe may still find the restarted server slow on a loaded machine; then
        # the circuit waits one more cooldown. Within a few, a probe must bring it back.
        deadline = time.monotonic() + 10 * COOLDOWN
        while time.monotonic() < deadline:
            if c.post("/api/ai/groq/chat", json=chat("probe")).status_code == 200:
                break
            time.sleep(COOLDOWN / 5)
        after = [c.post("/api/ai/groq/chat", json=chat(f"r{n}")).status_code for n in range(3)]

    assert opened == [200] * 40
    assert closed == [503] * 40
    assert checks <= 1 + 2 + elapsed / COOLDOWN + 2, "the open circuit spares the dead store"
    assert after == [200] * 3, "a half-open probe brings the store back"
    assert not convex_guard_tracebacks(caplog)
