"""Who the client is, through real servers: unix sockets, the forwarded chain, escalation per
client address, and failed authentication that must not lock out valid keys."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from convex_guard import (
    HOUR,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    MemoryStore,
    Rule,
    Store,
    guard_context,
)
from convex_guard.stores.base import ApiKeyRecord, BotEvent
from convex_guard.stores.convex import ConvexStore
from convex_guard.stores.keys import ApiKeys
from convex_guard.wsgi import GuardWSGIMiddleware, guard_scope

from .conftest import ConvexTestServer, serve
from .wsgi_server import serve_wsgi

GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"
BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
CHAT = "/api/ai/openai/chat"


async def whoami(request: Request) -> JSONResponse:
    ctx = guard_context(request.scope)
    return JSONResponse({"ip": ctx.client_ip, "key": ctx.client_key})


def inner_app() -> Starlette:
    return Starlette(
        routes=[
            Route(path, whoami, methods=["GET", "POST"])
            for path in ("/api/x", CHAT, "/api/embeddings")
        ]
    )


def ip_limited(store: Store, rate: int = 2, **options: Any) -> GuardMiddleware:
    """The guard with one per-client limit and nothing else, so only the key decides."""
    return GuardMiddleware(
        inner_app(),
        settings=GuardSettings(
            store=store,
            rules=[Rule("ip", FixedWindow(rate=rate, period=HOUR), key="ip", path="/api")],
            key_routes=(),
            bot_detection=False,
            **options,
        ),
    )


def uds_client(path: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost")


# -- item 4: unix sockets -------------------------------------------------------------------


def test_behind_a_proxy_on_a_unix_socket_clients_get_their_own_ip_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="convex_guard")
    sock = tmp_path / "guard.sock"
    app = ip_limited(MemoryStore(), trusted_proxies=["unix:"])
    with serve(app, uds=str(sock), proxy_headers=False), uds_client(sock) as c:
        first = [c.get("/api/x", headers={"X-Forwarded-For": "198.51.100.1"}) for _ in range(3)]
        other = c.get("/api/x", headers={"X-Forwarded-For": "198.51.100.2"})
        # A client's own entry left of the proxy's is not believed.
        spoof = c.get("/api/x", headers={"X-Forwarded-For": "203.0.113.5, 198.51.100.1"})
        # The socket's proxy named no client: nothing to key on but the shared "unknown".
        unnamed = [c.get("/api/x").json()["key"] for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200, 429]
    assert first[0].json() == {"ip": "198.51.100.1", "key": "198.51.100.1"}
    assert other.status_code == 200 and other.json()["key"] == "198.51.100.2"
    assert spoof.status_code == 429
    assert unnamed == ["unknown", "unknown"]
    warnings = [r for r in caplog.records if "carried no usable" in r.getMessage()]
    assert len(warnings) == 1 and "x-forwarded-for" in warnings[0].getMessage()


def test_on_a_unix_socket_without_unix_trust_one_warning_says_all_share_a_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="convex_guard")
    sock = tmp_path / "guard.sock"
    app = ip_limited(MemoryStore(), rate=100, trusted_proxies=["10.0.0.0/8"])
    with serve(app, uds=str(sock), proxy_headers=False), uds_client(sock) as c:
        keys = [
            c.get("/api/x", headers={"X-Forwarded-For": f"198.51.100.{i}"}).json()["key"]
            for i in range(4)
        ]
    assert keys == ["unknown"] * 4
    warnings = [r for r in caplog.records if "without a client address" in r.getMessage()]
    assert len(warnings) == 1
    assert "'unix:'" in warnings[0].getMessage() and "trusted_proxies" in warnings[0].getMessage()


def test_no_warning_for_tcp_clients(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="convex_guard")
    with (
        serve(ip_limited(MemoryStore(), rate=100)) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        assert c.get("/api/x").json()["key"] == "127.0.0.1"
    assert not [r for r in caplog.records if "client address" in r.getMessage()]


# -- item 6: the forwarded chain, and the two settings ------------------------------------------


def test_a_proxy_that_wrote_no_address_is_the_client_whatever_is_left_of_it() -> None:
    app = ip_limited(MemoryStore(), trusted_proxies=["127.0.0.1"])
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        # The proxy could not tell the client's address and wrote `unknown`; the client
        # rotates what it writes to the left of it.
        answers = [
            c.get("/api/x", headers={"X-Forwarded-For": f"198.51.100.{i}, unknown"})
            for i in range(5)
        ]
        garbage = c.get("/api/x", headers={"X-Forwarded-For": "198.51.100.9, %%%"})
    assert [r.status_code for r in answers] == [200, 200, 429, 429, 429]
    assert answers[0].json()["key"] == "127.0.0.1"
    assert garbage.status_code == 429


def test_forwarded_header_and_ipv6_prefix_are_guard_settings() -> None:
    app = ip_limited(
        MemoryStore(),
        rate=100,
        trusted_proxies=["127.0.0.1"],
        forwarded_header="forwarded",
        ipv6_prefix=48,
    )
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        forwarded = c.get("/api/x", headers={"Forwarded": 'for="[2001:db8:1:2::7]:443"'})
        # The other header is not read once `forwarded` is chosen.
        xff = c.get("/api/x", headers={"X-Forwarded-For": "198.51.100.1"})
    assert forwarded.json() == {"ip": "2001:db8:1:2::7", "key": "2001:db8:1::/48"}
    assert xff.json()["key"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("option", "value"), [("forwarded_header", "x-real-ip"), ("ipv6_prefix", 129)]
)
def test_bad_identity_settings_fail_at_construction(option: str, value: object) -> None:
    from convex_guard import ConfigurationError

    with pytest.raises(ConfigurationError, match=option):
        GuardSettings(store=MemoryStore(), **{option: value})  # type: ignore[arg-type]


def test_the_wsgi_adapter_passes_the_settings_through() -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        key = guard_context(guard_scope(environ)).client_key or ""
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [key.encode()]

    guarded = GuardWSGIMiddleware(
        app,
        store=MemoryStore(),
        rules=(),
        key_routes=(),
        bot_detection=False,
        trusted_proxies=["127.0.0.1"],
        forwarded_header="forwarded",
        ipv6_prefix=56,
    )
    try:
        with serve_wsgi(guarded) as url, httpx.Client(base_url=url) as c:
            answer = c.get("/x", headers={"Forwarded": 'for="[2001:db8:1:2::7]"'})
    finally:
        guarded.close()
    assert answer.text == "2001:db8:1::/56"
    # Django's settings dict names the same fields (the adapter builds the same stack).
    from_django = GuardSettings.from_mapping({"forwarded_header": "forwarded", "ipv6_prefix": 56})
    assert (from_django.forwarded_header, from_django.ipv6_prefix) == ("forwarded", 56)


# -- item 5: escalation per client address ------------------------------------------------------


Events = Callable[[], Coroutine[Any, Any, list[BotEvent]]]


@pytest.fixture(params=["memory", "convex"])
def store_and_events(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Events]]:
    """A store for the server, and how the test reads the bot events it recorded."""
    if request.param == "memory":
        memory = MemoryStore()
        yield memory, lambda: memory.bot_events(since=0, limit=100)
        return
    server: ConvexTestServer = request.getfixturevalue("convex_server")
    server.reset()

    async def events() -> list[BotEvent]:
        # The server's store belongs to the server's loop: read with one of this loop's own.
        reader = ConvexStore(server.url, server.admin_key, timeout=10)
        try:
            return await reader.bot_events(since=0, limit=100)
        finally:
            await reader.close()

    yield ConvexStore(server.url, server.admin_key, timeout=10), events


@pytest.mark.parametrize("rules", ["preset", "none"], ids=["deferred", "direct"])
def test_a_recorded_bot_rotating_accept_language_is_challenged_then_blocked(
    store_and_events: tuple[Store, Events], rules: str
) -> None:
    store, recorded_events = store_and_events
    settings = GuardSettings(
        store=store,
        key_routes=(),
        bot_policy={"ai_crawler": "record"},
        # With limits, the bot check is decided with them (deferred); without, on its own.
        rules=None if rules == "preset" else (),
        bot_verify=False,  # a GPTBot from loopback is spoofed: this test is about escalation
    )
    app = GuardMiddleware(inner_app(), settings=settings)
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        codes = [
            c.post(CHAT, headers={"User-Agent": GPTBOT, "Accept-Language": f"x-{i}"}).status_code
            for i in range(12)
        ]
        person = c.post(CHAT, headers={"User-Agent": BROWSER})
    assert codes == [200] * 5 + [429] * 5 + [403] * 2
    assert person.status_code == 200  # a person is never escalated, whatever the address did
    events = asyncio.run(recorded_events())
    assert len(events) == 12 and {e.ip for e in events} == {"127.0.0.1"}
    assert len({e.fingerprint for e in events}) == 12


# -- item 10: failed authentication throttles guesses, not valid keys -----------------------------


class CountingStore(MemoryStore):
    """Counts key lookups: a throttled guess must not reach the store."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        self.lookups += 1
        return await super().find_api_key(key_hash)


def test_a_valid_key_is_accepted_while_the_clients_guesses_are_refused() -> None:
    store = CountingStore()
    keys = ApiKeys(store)
    ai = asyncio.run(keys.create("team", scopes=()))
    embedding = asyncio.run(keys.create("indexer", kind="embedding"))
    app = GuardMiddleware(inner_app(), settings=GuardSettings(store=store, key_cache_ttl=0))
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:

        def chat(key: str) -> int:
            return c.post(CHAT, headers={"Authorization": f"Bearer {key}"}).status_code

        # People behind the same address use their keys...
        assert chat(ai.key) == 200
        assert c.post("/api/embeddings", headers={"X-API-Key": embedding.key}).status_code == 200
        # ...while a guesser there fails: keyless on the embeddings route, then guesses.
        keyless = [c.post("/api/embeddings").status_code for _ in range(5)]
        guesses = [chat(f"cg_ai_guess{i}") for i in range(6)]
        assert keyless == [401] * 5
        assert guesses == [401] * 5 + [429]
        before = store.lookups
        assert chat("cg_ai_guess-twelve") == 429  # the 12th bad attempt: refused unlooked-up
        assert store.lookups == before
        # The valid keys still work (each looked up: the cache is off), guesses stay refused.
        assert chat(ai.key) == 200
        assert c.post("/api/embeddings", headers={"X-API-Key": embedding.key}).status_code == 200
        assert store.lookups == before + 2
        assert chat("cg_ai_guess-again") == 429
        assert c.post("/api/embeddings").status_code == 429
        # A revoked key is a failed attempt again, and stays refused.
        asyncio.run(keys.revoke(ai.record.id))
        assert chat(ai.key) == 429
        assert chat(ai.key) == 429
