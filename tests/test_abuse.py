"""Abuse: clients that rotate what they control (X-Forwarded-For, IPv6 addresses inside their
/64, user-agents, guessed API keys) are limited as the one client they are, and no secret
(raw API keys, the Convex admin key) reaches a log line, a response, an error or a row."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from typing import Any

import httpx
import pytest
from examples.gateway import create_app

from convex_guard import (
    HOUR,
    ApiKeys,
    ConvexStore,
    FixedWindow,
    GuardSettings,
    MemoryStore,
    Rule,
    StoreError,
    generate_key,
)

from .conftest import ConvexTestServer, serve
from .fault_tools import BROWSER, chat
from .strategies import call, guard_of

PER_IP = 5
ATTEMPTS = 20
FAILED_AUTH = 10  # the seed's failedAuth: 10 an hour


def per_ip_settings(store: Any, **options: Any) -> GuardSettings:
    # The window starts now, so it cannot roll over during the test.
    window = FixedWindow(rate=PER_IP, period=HOUR, start=int(time.time() * 1000))
    return GuardSettings(
        store=store,
        rules=[Rule("perIp", window, key="ip", path="/api/ai")],
        writer_interval=0.05,
        **options,
    )


def browser(n: int) -> str:
    return f"Mozilla/5.0 (X11; Linux x86_64; rv:{100 + n}.0) Gecko/20100101 Firefox/{100 + n}.0"


def test_rotating_forwarded_headers_without_trusted_proxy_is_one_client() -> None:
    store = MemoryStore()
    app = create_app(per_ip_settings(store), upstream=None)
    with (
        serve(app, proxy_headers=False) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c,
    ):
        statuses = [
            c.post(
                "/api/ai/openai/chat",
                json=chat(f"m{n}"),
                headers={
                    "x-forwarded-for": f"198.51.100.{n}, 203.0.113.{n}",
                    "forwarded": f"for=192.0.2.{n}",
                    "x-real-ip": f"192.0.2.{200 + n}",
                },
            ).status_code
            for n in range(ATTEMPTS)
        ]
        asyncio.run(asyncio.sleep(0.2))
    assert statuses == [200] * PER_IP + [429] * (ATTEMPTS - PER_IP)
    assert {row.ip for row in store.ai_logs} == {"127.0.0.1"}
    assert len(store.ai_logs) == ATTEMPTS


def test_rotating_ipv6_inside_one_64_is_one_client() -> None:
    store = MemoryStore()
    app = create_app(per_ip_settings(store), upstream=None)
    body = json.dumps(chat("m")).encode()
    ua = [(b"user-agent", BROWSER.encode())]

    async def run(prefix: str, count: int) -> list[int]:
        out = []
        for n in range(count):
            client = (f"{prefix}:{n:x}:{secrets.randbits(16):x}:1:{n + 1:x}", 40000 + n)
            status, _ = await call(app, "POST", "/api/ai/openai/chat", ua, client, body)
            out.append(status)
        await guard_of(app).writer.flush()
        return out

    with asyncio.Runner() as runner:
        hopping = runner.run(run("2001:db8:aa:1", ATTEMPTS))
        neighbour = runner.run(run("2001:db8:aa:2", PER_IP + 1))
    assert hopping == [200] * PER_IP + [429] * (ATTEMPTS - PER_IP)
    # Another /64 is another client, with a quota of its own.
    assert neighbour == [200] * PER_IP + [429]


def test_rotating_user_agents_does_not_escape_the_per_ip_limit() -> None:
    store = MemoryStore()
    app = create_app(per_ip_settings(store), upstream=None)
    with (
        serve(app, proxy_headers=False) as server,
        httpx.Client(base_url=server.url, timeout=10) as c,
    ):
        statuses = [
            c.post(
                "/api/ai/openai/chat",
                json=chat(f"m{n}"),
                headers={"user-agent": browser(n), "accept-language": f"x-{n}"},
            ).status_code
            for n in range(ATTEMPTS)
        ]
    assert statuses == [200] * PER_IP + [429] * (ATTEMPTS - PER_IP)
    assert len({row.fingerprint for row in store.ai_logs}) == ATTEMPTS, "every one looked new"


def test_brute_forcing_api_keys_is_throttled_and_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = MemoryStore()
    real = asyncio.run(ApiKeys(store).create("real", kind="embedding")).key
    app = create_app(GuardSettings(store=store, writer_interval=0.05), upstream=None)
    guesses = [generate_key("embedding") for _ in range(ATTEMPTS)]
    bodies: list[bytes] = []
    with (
        serve(app, proxy_headers=False) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c,
    ):
        statuses = []
        for n, guess in enumerate(guesses):
            # Rotating X-Forwarded-For changes nothing: no proxy is trusted.
            r = c.post(
                "/api/embeddings",
                json={"input": ["a"]},
                headers={"Authorization": f"Bearer {guess}", "x-forwarded-for": f"10.0.0.{n}"},
            )
            statuses.append(r.status_code)
            bodies.append(r.content + repr(r.headers).encode())
        # Once throttled, even the right key waits: guessing costs the guesser.
        right = c.post("/api/embeddings", json={"input": ["a"]}, headers={"X-API-Key": real})
        bodies.append(right.content + repr(right.headers).encode())
        time.sleep(0.3)
    assert statuses == [401] * FAILED_AUTH + [429] * (ATTEMPTS - FAILED_AUTH)
    assert right.status_code == 429
    assert right.json()["violated-policies"] == ["failedAuth"]
    failures = store.auth_failures
    assert len(failures) >= FAILED_AUTH
    assert all(f.ip == "127.0.0.1" and len(f.key_hash) == 64 for f in failures)
    events = asyncio.run(store.bot_events(since=-math.inf, limit=1000))
    throttled = [e for e in events if e.detection_type == "rate_limit"]
    assert len(throttled) == ATTEMPTS - FAILED_AUTH + 1
    assert all(e.metadata and e.metadata["limit"] == "failedAuth" for e in throttled)
    # No raw key anywhere: responses, log lines, stored rows.
    secrets_ = [real, *guesses]
    everything = [b.decode("latin-1") for b in bodies]
    everything += [r.getMessage() for r in caplog.records]
    everything += [repr(row) for row in store.ai_logs + store.embedding_logs + failures + events]
    assert not [s for s in secrets_ for text in everything if s in text]


@pytest.mark.slow
def test_no_secret_reaches_logs_errors_or_convex_rows(
    convex_server: ConvexTestServer,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    convex_server.reset()
    admin = convex_server.admin_key

    async def create_keys() -> tuple[str, str]:
        setup = ConvexStore(convex_server.url, admin)  # its connections belong to this loop
        try:
            keys = ApiKeys(setup)
            embedding = await keys.create("e", kind="embedding", owner="u1")
            ai = await keys.create("a", kind="ai", owner="u2")
            return embedding.key, ai.key
        finally:
            await setup.close()

    embedding, ai = asyncio.run(create_keys())
    store = ConvexStore(convex_server.url, admin)
    guesses = [generate_key("ai") for _ in range(3)]
    seen: list[str] = [repr(store)]

    app = create_app(GuardSettings(store=store, writer_interval=0.05), upstream=None)
    with (
        serve(app, proxy_headers=False) as server,
        httpx.Client(base_url=server.url, headers={"user-agent": BROWSER}, timeout=10) as c,
    ):
        answers = [
            c.post("/api/embeddings", json={"input": ["a"]}, headers={"X-API-Key": embedding}),
            c.post(
                "/api/ai/openai/chat", json=chat("m"), headers={"Authorization": f"Bearer {ai}"}
            ),
            c.post("/api/embeddings", json={"input": ["a"]}, headers={"X-API-Key": ai}),
            *(
                c.post(
                    "/api/ai/openai/chat",
                    json=chat("m"),
                    headers={"Authorization": f"Bearer {g}"},
                )
                for g in guesses
            ),
            c.post(
                "/api/ai/openai/chat",
                json=chat("m"),
                headers={"Authorization": f"Bearer {ai}", "X-API-Key": embedding},
            ),
        ]
        time.sleep(0.5)
    assert [a.status_code for a in answers] == [200, 200, 401, 401, 401, 401, 401]
    seen += [a.text + repr(a.headers) for a in answers]

    # Errors the store raises: a wrong admin key, a dead deployment.
    async def failing() -> list[str]:
        out = []
        for url, key in ((convex_server.url, admin + "x"), ("http://127.0.0.1:9", admin)):
            broken = ConvexStore(url, key, timeout=1)
            try:
                await broken.find_api_key("0" * 64)
            except StoreError as exc:
                out += [str(exc), repr(exc), repr(broken)]
            finally:
                await broken.close()
        return out

    seen += asyncio.run(failing())
    assert len(seen) > 10
    tables = [
        "aiRequestLogs",
        "botDetectionEvents",
        "apiKeys",
        "embeddingApiKeys",
        "embeddingRequests",
        "embeddingAuthFailures",
        "logBatches",
    ]
    rows = {table: convex_server.rows(table) for table in tables}
    assert rows["embeddingAuthFailures"] and rows["aiRequestLogs"] and rows["embeddingRequests"]
    seen.append(json.dumps(rows))
    seen += [r.getMessage() for r in caplog.records]
    seen += [str(r.exc_info) for r in caplog.records if r.exc_info]
    out, err = capfd.readouterr()
    seen += [out, err]
    for secret in (admin, embedding, ai, *guesses):
        leaks = [text[:200] for text in seen if secret in text]
        assert not leaks, leaks
