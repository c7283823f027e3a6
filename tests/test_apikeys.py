"""API keys: the sans-IO core, the service, and ApiKeyMiddleware end to end through uvicorn."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from convex_guard import HOUR, MINUTE, MemoryStore, StoreError, TokenBucket
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.fingerprint import DEFAULT_FIELDS
from convex_guard.core.headers import header_reader
from convex_guard.core.keys import NO_KEY, generate_key, hash_key, is_well_formed
from convex_guard.middleware.apikeys import (
    ApiKeyMiddleware,
    KeyRoute,
    _Malformed,
    _presented_key,
)
from convex_guard.middleware.context import guard_context
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.stores.base import ApiKeyRecord, KeyRateLimit
from convex_guard.stores.keys import (
    DEFAULT_GRACE_MS,
    DEFAULT_LIFETIME_MS,
    ApiKeys,
    KeyNotFoundError,
    KeyRevokedError,
)

from .conftest import serve
from .fault_tools import raw_reply

T0 = 1_800_000_000_000.0


class Clock:
    """Epoch ms, shared by the store, the service and the middleware; safe across threads."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, ms: float) -> None:
        with self._lock:
            self.now += ms


# -- core ---------------------------------------------------------------------------------------
def test_generated_keys_are_prefixed_long_and_distinct() -> None:
    keys = {generate_key("ai") for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert re.fullmatch(r"cg_ai_[0-9A-Za-z]{43}", key)
    assert generate_key("embedding").startswith("cg_emb_")


def test_hash_is_sha256_hex() -> None:
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert hash_key(key.encode()) == hash_key(key)
    assert hash_key("") != NO_KEY and not re.fullmatch(r"[0-9a-f]{64}", NO_KEY)


@pytest.mark.slow
@given(st.text(max_size=300))
def test_well_formed_accepts_only_bounded_tokens(text: str) -> None:
    ok = is_well_formed(text)
    if ok:
        assert 0 < len(text) <= 256 and text.isascii() and " " not in text


async def test_create_returns_raw_key_once_and_stores_only_its_hash() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    keys = ApiKeys(store, clock=clock)
    created = await keys.create("ci", owner="ann", scopes=["chat", "chat"])
    assert created.key not in repr(created)
    assert created.key not in str(created)
    record = created.record
    assert record.key_hash == hash_key(created.key)
    assert record.scopes == ("chat",)
    assert record.expires_at == T0 + DEFAULT_LIFETIME_MS
    assert created.key not in repr(record)
    assert created.key.startswith(record.prefix) and len(record.prefix) == len("cg_ai_") + 4
    # Lookups by hash are exact: a one-character change finds nothing.
    assert (await keys.verify(created.key)).record == record
    altered = created.key[:-1] + ("A" if created.key[-1] != "A" else "B")
    assert (await keys.verify(altered)).status == "unknown"
    assert await store.find_api_key(hash_key(created.key.upper())) is None
    never = await keys.create("forever", lifetime=None)
    assert never.record.expires_at is None


async def test_verify_expiry_revocation_and_kind() -> None:
    clock = Clock()
    keys = ApiKeys(MemoryStore(clock=clock), clock=clock, lifetime=MINUTE)
    created = await keys.create("short")
    assert (await keys.verify(created.key, kind="ai")).ok
    assert (await keys.verify(created.key, kind="embedding")).status == "wrong_kind"
    clock.advance(MINUTE - 1)
    assert (await keys.verify(created.key)).ok
    clock.advance(1)
    assert (await keys.verify(created.key)).status == "expired"
    other = await keys.create("other")
    await keys.revoke(other.record.id)
    assert (await keys.verify(other.key)).status == "revoked"
    with pytest.raises(KeyNotFoundError):
        await keys.revoke("nope")


async def test_rotate_keeps_settings_and_old_key_for_the_grace_period() -> None:
    clock = Clock()
    keys = ApiKeys(MemoryStore(clock=clock), clock=clock)
    limit = KeyRateLimit(requests=5, period=MINUTE)
    old = await keys.create("svc", owner="ann", scopes=["chat"], rate_limit=limit)
    clock.advance(HOUR)
    new = await keys.rotate(old.record.id)
    assert new.key != old.key
    assert (new.record.name, new.record.owner, new.record.scopes, new.record.rate_limit) == (
        "svc",
        "ann",
        ("chat",),
        limit,
    )
    assert new.record.expires_at == T0 + HOUR + DEFAULT_LIFETIME_MS
    clock.advance(DEFAULT_GRACE_MS - 1)
    assert (await keys.verify(old.key)).ok
    clock.advance(1)
    assert (await keys.verify(old.key)).status == "expired"
    assert (await keys.verify(new.key)).ok
    # A key about to expire anyway keeps its earlier expiry.
    soon = await keys.create("soon", lifetime=MINUTE)
    await keys.rotate(soon.record.id)
    assert (await keys.get(soon.record.id)).expires_at == soon.record.expires_at
    await keys.revoke(soon.record.id)
    with pytest.raises(KeyRevokedError):
        await keys.rotate(soon.record.id)


async def test_bad_options_fail_at_construction() -> None:
    store = MemoryStore()
    with pytest.raises(ConfigurationError):
        ApiKeys(store, lifetime=0)
    with pytest.raises(ConfigurationError):
        await ApiKeys(store).create("x", rate_limit=KeyRateLimit(requests=0, period=MINUTE))
    with pytest.raises(ConfigurationError):
        await ApiKeys(store).create(" ")
    with pytest.raises(ConfigurationError):
        ApiKeyMiddleware(Starlette(), store=store, routes=[])
    with pytest.raises(ConfigurationError):
        KeyRoute("/api", kind="other")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        KeyRoute("/api", scopes="chat")


# -- end to end ---------------------------------------------------------------------------------
async def whoami(request: Request) -> JSONResponse:
    ctx = guard_context(request.scope)
    return JSONResponse(
        {
            "key_id": ctx.api_key_id,
            "name": ctx.api_key_name,
            "user": ctx.user_id,
            "scopes": list(ctx.scopes),
            "has_hash": ctx.api_key_hash is not None,
        }
    )


ROUTES = [
    KeyRoute("/api/admin", scopes=["admin"]),
    KeyRoute("/api/ai", scopes=["chat"]),
    KeyRoute("/api/embeddings", kind="embedding"),
    KeyRoute("/api/public", required=False),
]


def make_app(store: MemoryStore, clock: Clock, writer: LogWriter, **options: Any) -> Starlette:
    app = Starlette(
        routes=[
            Route(path, whoami, methods=["GET", "POST"])
            for path in (
                "/api/admin/x",
                "/api/ai/openai/chat",
                "/api/embeddings",
                "/api/public",
                "/health",
            )
        ]
    )
    app.add_middleware(
        ApiKeyMiddleware,
        store=store,
        routes=ROUTES,
        writer=writer,
        clock=clock,
        **options,
    )
    return app


@pytest.fixture
def env() -> Iterator[tuple[MemoryStore, Clock, ApiKeys, LogWriter]]:
    clock = Clock()
    store = MemoryStore(clock=clock)
    writer = LogWriter(store, interval=0.05)
    yield store, clock, ApiKeys(store, clock=clock), writer


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_valid_key_fills_context_and_usage_is_batched(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter], caplog: pytest.LogCaptureFixture
) -> None:
    store, clock, keys, writer = env
    created = asyncio.run(keys.create("ci", owner="user-1", scopes=["chat"]))
    caplog.set_level(logging.DEBUG)
    with serve(make_app(store, clock, writer)) as server, httpx.Client(base_url=server.url) as c:
        for _ in range(3):
            response = c.post("/api/ai/openai/chat", headers=bearer(created.key))
            assert response.status_code == 200
        assert response.json() == {
            "key_id": created.record.id,
            "name": "ci",
            "user": "user-1",
            "scopes": ["chat"],
            "has_hash": True,
        }
        # X-API-Key works too, and the same key in both headers is not ambiguous.
        assert c.get("/api/ai/x", headers={"X-API-Key": created.key}).status_code == 404
        both = {**bearer(created.key), "X-API-Key": created.key}
        assert c.post("/api/ai/openai/chat", headers=both).status_code == 200
        # Unprotected routes never look at headers.
        assert c.get("/health", headers=bearer("garbage")).status_code == 200
    record = asyncio.run(store.find_api_key(created.record.key_hash))
    assert record is not None
    assert record.request_count == 5 and record.last_used == T0
    assert writer.batches_written <= 3  # usage is summed, not written per request
    # No raw key anywhere: rows, records, reprs, logs.
    everything = " ".join(
        repr(x)
        for x in (
            store._keys,
            store.auth_failures,
            store.ai_logs,
            store.embedding_logs,
            store._bot_events,
            store._limits,
            created,
            writer,
        )
    )
    assert created.key not in everything
    assert created.key not in caplog.text


def test_missing_invalid_and_wrong_scope(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter], caplog: pytest.LogCaptureFixture
) -> None:
    store, clock, keys, writer = env
    chat = asyncio.run(keys.create("chat", scopes=["chat"]))
    emb = asyncio.run(keys.create("emb", kind="embedding"))
    caplog.set_level(logging.DEBUG)
    with serve(make_app(store, clock, writer)) as server, httpx.Client(base_url=server.url) as c:
        missing = c.post("/api/ai/openai/chat")
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="convex-guard"'
        assert missing.headers["content-type"] == "application/problem+json"
        bad = c.post("/api/ai/openai/chat", headers=bearer("cg_ai_" + "x" * 43))
        assert bad.status_code == 401
        assert bad.headers["WWW-Authenticate"] == (
            'Bearer realm="convex-guard", error="invalid_token"'
        )
        forbidden = c.get("/api/admin/x", headers=bearer(chat.key))
        assert forbidden.status_code == 403
        assert forbidden.headers["WWW-Authenticate"] == (
            'Bearer realm="convex-guard", error="insufficient_scope", scope="admin"'
        )
        assert forbidden.json()["required-scopes"] == ["admin"]
        # An embedding key is not an AI key, and the reverse.
        assert c.post("/api/ai/openai/chat", headers=bearer(emb.key)).status_code == 401
        assert c.post("/api/embeddings", headers=bearer(chat.key)).status_code == 401
        assert c.post("/api/embeddings", headers=bearer(emb.key)).status_code == 200
        # Optional route: anonymous passes, a presented key must be valid.
        anon = c.get("/api/public")
        assert anon.status_code == 200 and anon.json()["key_id"] is None
        assert c.get("/api/public", headers=bearer(chat.key)).json()["name"] == "chat"
        assert c.get("/api/public", headers=bearer("nope")).status_code == 401
    failures = store.auth_failures
    assert [f.key_hash for f in failures] == [
        NO_KEY,
        hash_key("cg_ai_" + "x" * 43),
        chat.record.key_hash,
        emb.record.key_hash,
        chat.record.key_hash,
        hash_key("nope"),
    ]
    assert all(f.ip == "127.0.0.1" and f.user_agent for f in failures)
    for key in (chat.key, emb.key):
        assert key not in caplog.text and key not in repr(failures)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", b"Bearer")],
        [(b"authorization", b"Bearer   ")],
        [(b"authorization", b"Bearer \xff\xfe\xfd")],
        [(b"authorization", b"Bearer " + b"a" * 5000)],
        [(b"x-api-key", b"k" * 300)],
        [(b"authorization", b"Bearer one"), (b"authorization", b"Bearer two")],
        [(b"authorization", b"Bearer one"), (b"x-api-key", b"two")],
        [(b"authorization", b"Bearer a b c")],
        [(b"x-api-key", "caf\u00e9".encode())],
    ],
)
def test_bad_header_bytes_are_a_clean_401(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter], headers: list[tuple[bytes, bytes]]
) -> None:
    store, clock, _, writer = env
    with serve(make_app(store, clock, writer)) as server:
        # Raw bytes on a socket: HTTP clients refuse to send most of these.
        lines = [b"POST /api/ai/openai/chat HTTP/1.1", b"host: x", b"content-length: 0"]
        lines += [name + b": " + value for name, value in headers]
        request = b"\r\n".join(lines) + b"\r\n\r\n"
        reply = raw_reply(server.port, request, until=b"\r\n\r\n", timeout=5)
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 401 ")
    assert "content-type: application/problem+json" in head
    assert 'www-authenticate: bearer realm="convex-guard", error="invalid_token"' in head


def test_revocation_takes_effect_within_cache_ttl(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter],
) -> None:
    store, clock, keys, writer = env
    created = asyncio.run(keys.create("ci", scopes=["chat"]))
    app = make_app(store, clock, writer, cache_ttl=5.0)
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/api/ai/openai/chat", headers=bearer(created.key)).status_code == 200
        asyncio.run(keys.revoke(created.record.id))
        # Still cached: the stated window of up to 5 s.
        clock.advance(4_999)
        assert c.post("/api/ai/openai/chat", headers=bearer(created.key)).status_code == 200
        clock.advance(1)
        assert c.post("/api/ai/openai/chat", headers=bearer(created.key)).status_code == 401


def test_expiry_and_rotation_grace_end_to_end(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter],
) -> None:
    store, clock, keys, writer = env
    old = asyncio.run(keys.create("svc", scopes=["chat"]))
    with serve(make_app(store, clock, writer)) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/api/ai/openai/chat", headers=bearer(old.key)).status_code == 200
        new = asyncio.run(keys.rotate(old.record.id, grace=HOUR))
        clock.advance(HOUR - 1)  # expiry is checked on every request, even from the cache
        assert c.post("/api/ai/openai/chat", headers=bearer(old.key)).status_code == 200
        assert c.post("/api/ai/openai/chat", headers=bearer(new.key)).status_code == 200
        clock.advance(1)
        assert c.post("/api/ai/openai/chat", headers=bearer(old.key)).status_code == 401
        assert c.post("/api/ai/openai/chat", headers=bearer(new.key)).status_code == 200
        clock.advance(DEFAULT_LIFETIME_MS)
        assert c.post("/api/ai/openai/chat", headers=bearer(new.key)).status_code == 401


def test_failed_auth_is_throttled_with_a_bot_event(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter],
) -> None:
    store, clock, keys, writer = env
    good = asyncio.run(keys.create("good", scopes=["chat"]))
    unseen = asyncio.run(keys.create("unseen", scopes=["chat"]))
    with serve(make_app(store, clock, writer)) as server, httpx.Client(base_url=server.url) as c:
        assert c.post("/api/ai/openai/chat", headers=bearer(good.key)).status_code == 200
        codes = [
            c.post("/api/ai/openai/chat", headers=bearer(f"guess{i}")).status_code
            for i in range(12)
        ]
        assert codes == [401] * 10 + [429, 429]
        throttled = c.post("/api/ai/openai/chat", headers=bearer("guess-again"))
        assert throttled.headers["content-type"] == "application/problem+json"
        assert throttled.json()["violated-policies"] == ["failedAuth"]
        # One token refills every 6 minutes; Retry-After says so.
        assert 1 <= int(throttled.headers["Retry-After"]) <= 360
        # A key this process has found valid still works from the throttled IP; one it has
        # never seen cannot be told from a guess without a lookup, and waits.
        assert c.post("/api/ai/openai/chat", headers=bearer(good.key)).status_code == 200
        assert c.post("/api/ai/openai/chat", headers=bearer(unseen.key)).status_code == 429
        clock.advance(6 * MINUTE)
        assert c.post("/api/ai/openai/chat", headers=bearer(unseen.key)).status_code == 200
    events = asyncio.run(store.bot_events(since=0))
    assert events and all(
        e.detection_type == "rate_limit" and e.action == "blocked" and e.ip == "127.0.0.1"
        for e in events
    )
    assert len(events) == 4  # the 11th and 12th guess, the 13th, and the unseen key while throttled
    assert len(store.auth_failures) == 11  # guesses that reached verification


def test_keys_own_rate_limit(env: tuple[MemoryStore, Clock, ApiKeys, LogWriter]) -> None:
    store, clock, keys, writer = env
    limited = asyncio.run(
        keys.create("small", scopes=["chat"], rate_limit=KeyRateLimit(requests=2, period=MINUTE))
    )
    with serve(make_app(store, clock, writer)) as server, httpx.Client(base_url=server.url) as c:
        codes = [
            c.post("/api/ai/openai/chat", headers=bearer(limited.key)).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]
        clock.advance(MINUTE)
        assert c.post("/api/ai/openai/chat", headers=bearer(limited.key)).status_code == 200
    assert store.auth_failures == []  # a spent quota is not an auth failure


def test_failed_auth_limit_is_configurable(
    env: tuple[MemoryStore, Clock, ApiKeys, LogWriter],
) -> None:
    store, clock, _, writer = env
    app = make_app(store, clock, writer, failed_auth=TokenBucket(rate=2, period=HOUR))
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        codes = [c.post("/api/ai/openai/chat").status_code for _ in range(3)]
    assert codes == [401, 401, 429]


class DownStore(MemoryStore):
    """Key lookups fail ("raise") or never answer ("hang"); everything else works."""

    def __init__(self, mode: str, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.mode = mode

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        raise StoreError("down")


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_store_failure_fails_closed_within_the_timeout(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    store = DownStore(mode, clock)
    writer = LogWriter(store)
    app = make_app(store, clock, writer, timeout=0.2)
    with serve(app) as server, httpx.Client(base_url=server.url) as c:
        started = time.monotonic()
        response = c.post("/api/ai/openai/chat", headers=bearer(generate_key()))
        assert time.monotonic() - started < 2.0
        # Anonymous requests on optional routes need no lookup and still pass.
        assert c.get("/api/public").status_code == 200
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    assert "API key lookup failed" in caplog.text
    assert store.auth_failures == []  # the store's trouble is not the client's failure


_header_bytes = st.binary(max_size=400) | st.sampled_from(
    [b"Bearer", b"Bearer ", b"bearer x", b"Basic abc", b"Bearer cg_ai_" + b"a" * 43]
)


@given(
    st.lists(
        st.tuples(st.sampled_from([b"authorization", b"x-api-key", b"other"]), _header_bytes),
        max_size=4,
    )
)
def test_header_parsing_never_fails_unexpectedly(headers: list[tuple[bytes, bytes]]) -> None:
    """Whatever the bytes, the parser gives a well-formed key, nothing, or a clean refusal."""
    try:
        key = _presented_key(header_reader(DEFAULT_FIELDS).read(headers))
    except _Malformed:
        return
    assert key is None or is_well_formed(key)
