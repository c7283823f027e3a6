"""ConvexStore at scale: per-writer batch rows, capped answers that say so, typed backend
errors, and credentials kept out of everything it prints."""

from __future__ import annotations

import asyncio
import json
import string
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convex_guard import (
    AIRequestLog,
    ApiKeyList,
    BotEvent,
    CircuitBreaker,
    CircuitOpenError,
    ConfigurationError,
    ConvexAuthError,
    ConvexStore,
    LogBatch,
    ResilientStore,
    StoreConflictError,
    StoreError,
    StoreOverloadedError,
    StoreUnavailableError,
)
from convex_guard.stores.base import KeyUsage, NewApiKey
from convex_guard.stores.convex import _hidden, _redact_url

from .conftest import ConvexTestServer
from .fault_tools import free_port

ADMIN_KEY = "convex-self-hosted|0123456789abcdef-admin-secret"

# The backend's own bodies (crates/errors: `ErrorMetadata::user_occ` after the mutation's
# retries; the function runner's limiter when no slot frees within its queue timeout).
OCC_BODY = {
    "code": "OptimisticConcurrencyControlFailure",
    "message": (
        'Documents read from or written to the "providerRollups" table changed while this '
        "mutation was being run and on every subsequent retry. Another call to this mutation "
        'changed the document with ID "k5712cs6vdbfq1ssx1kpa2v6cs7q1fwm". '
        "See https://docs.convex.dev/error#1"
    ),
}
OVERLOADED_BODY = {
    "code": "TooManyConcurrentRequests",
    "message": (
        "Too many concurrent requests. Your backend is limited to 16 concurrent mutations. "
        "To get more resources, upgrade to Convex Pro. If you are already on Convex Pro, "
        "please contact support."
    ),
}

Handler = Callable[[httpx.Request], httpx.Response]


def stub(handler: Handler, url: str = "http://127.0.0.1:3210", **options: Any) -> ConvexStore:
    return ConvexStore(url, ADMIN_KEY, transport=httpx.MockTransport(handler), **options)


def answering(status: int, body: object) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def success(value: object) -> Handler:
    return answering(200, {"status": "success", "value": value})


def one_row(ts: float = 1_000.0) -> LogBatch:
    row = AIRequestLog(ts, "openai", "m", "fp", "192.0.2.1", True, 10.0, tokens_used=1)
    return LogBatch(id=f"b-{ts}", ai_requests=[row])


# -- typed backend errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error", "words"),
    [
        (503, OCC_BODY, StoreConflictError, "OptimisticConcurrencyControlFailure"),
        (429, OVERLOADED_BODY, StoreOverloadedError, "TooManyConcurrentRequests"),
    ],
)
async def test_backend_503_and_429_become_typed_errors(
    status: int, body: dict[str, str], error: type[StoreError], words: str
) -> None:
    store = stub(answering(status, body))
    try:
        with pytest.raises(error) as info:
            await store.write_logs(one_row())
        with pytest.raises(error):
            await store.provider_stats("openai", 0, 1)
    finally:
        await store.close()
    assert isinstance(info.value, StoreUnavailableError)  # what the breaker and fallback see
    message = str(info.value)
    assert "logs:writeBatch" in message and words in message and str(status) in message
    assert ADMIN_KEY not in message


@pytest.mark.parametrize("conflicts", [1, 2, 3])
async def test_a_mutation_the_backend_gave_up_on_is_sent_again_twice_at_most(
    conflicts: int,
) -> None:
    # An OCC failure committed nothing, so sending the mutation again cannot count it twice.
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(json.loads(request.content)["path"])
        if len(paths) <= conflicts:
            return httpx.Response(503, json=OCC_BODY)
        return httpx.Response(200, json={"status": "success", "value": {"applied": True}})

    store = stub(handler)
    try:
        if conflicts <= 2:
            await store.write_logs(one_row())
            assert paths == ["logs:writeBatch"] * (conflicts + 1)
        else:
            with pytest.raises(StoreConflictError):
                await store.write_logs(one_row())
            assert paths == ["logs:writeBatch"] * 3
    finally:
        await store.close()


async def test_a_query_answered_503_is_not_sent_again() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(json.loads(request.content)["path"])
        return httpx.Response(503, json=OCC_BODY)

    store = stub(handler)
    try:
        with pytest.raises(StoreConflictError):
            await store.find_api_key("h")
    finally:
        await store.close()
    assert paths == ["apiKeys:getByHash"]


async def test_a_body_that_echoes_the_admin_key_is_scrubbed() -> None:
    echo = {**OCC_BODY, "message": f"{OCC_BODY['message']} (auth: Convex {ADMIN_KEY})"}
    store = stub(answering(503, echo))
    try:
        with pytest.raises(StoreConflictError) as info:
            await store.write_logs(one_row())
    finally:
        await store.close()
    assert ADMIN_KEY not in str(info.value) and "**********" in str(info.value)


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (503, {"code": "Overloaded", "message": "busy"}, StoreUnavailableError),
        (502, "<html>Bad Gateway</html>", StoreUnavailableError),
        (429, {"code": "RateLimited", "message": "slow down"}, StoreOverloadedError),
    ],
)
async def test_other_unavailable_answers(status: int, body: object, error: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    store = stub(handler)
    try:
        with pytest.raises(error) as info:
            await store.count_auth_failures("h", 0)
    finally:
        await store.close()
    assert type(info.value) is error  # an unknown 503 is not called a conflict


async def test_the_breaker_counts_conflicts_and_overload() -> None:
    # A request-path call (log writes bypass the breaker: a log outage never fails requests).
    calls: list[str] = []
    bodies = iter([(503, OCC_BODY), (429, OVERLOADED_BODY)])

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["path"])
        status, body = next(bodies)
        return httpx.Response(status, json=body)

    store = ResilientStore(
        stub(handler), use_fallback=False, breaker=CircuitBreaker(threshold=2, cooldown=60)
    )
    try:
        with pytest.raises(StoreConflictError):
            await store.find_api_key("h1")
        with pytest.raises(StoreOverloadedError):
            await store.find_api_key("h2")
        assert store.breaker.state == "open"
        with pytest.raises(CircuitOpenError):
            await store.find_api_key("h3")
    finally:
        await store.close()
    assert calls == ["apiKeys:getByHash", "apiKeys:getByHash"]  # the open circuit spared the third


# -- credentials in the URL ----------------------------------------------------------------------


async def test_url_credentials_are_used_but_never_shown() -> None:
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        # A backend (or proxy) that echoes where it was called.
        return httpx.Response(503, json={"code": "Overloaded", "message": str(request.url)})

    store = stub(handler, url="https://alice:pa55w0rd@convex.example:3210/")
    try:
        assert store.url == "https://***@convex.example:3210"
        assert "pa55w0rd" not in repr(store) and "alice" not in repr(store)
        with pytest.raises(StoreUnavailableError) as info:
            await store.count_auth_failures("h", 0)
    finally:
        await store.close()
    assert seen[0].userinfo == b"alice:pa55w0rd"  # still what the connection uses
    assert "pa55w0rd" not in str(info.value) and "alice" not in str(info.value)
    assert "convex.example" in str(info.value)


async def test_unreachable_and_refused_errors_hide_url_credentials() -> None:
    port = free_port()
    store = ConvexStore(f"http://bob:hunter2@127.0.0.1:{port}", ADMIN_KEY, timeout=1)
    try:
        with pytest.raises(StoreUnavailableError) as unreachable:
            await store.count_auth_failures("h", 0)
    finally:
        await store.close()
    refusing = stub(answering(401, {"code": "BadAdminKey", "message": "bad"}), url=store._url)
    try:
        with pytest.raises(ConvexAuthError) as refused:
            await refusing.count_auth_failures("h", 0)
    finally:
        await refusing.close()
    for error in (unreachable.value, refused.value):
        assert "hunter2" not in str(error) and "bob" not in str(error)
        assert f"127.0.0.1:{port}" in str(error)
    with pytest.raises(ConfigurationError) as bad:
        ConvexStore("ftp://bob:hunter2@host", ADMIN_KEY)
    assert "hunter2" not in str(bad.value)


# -- capped answers say so ---------------------------------------------------------------------


async def test_truncated_flags_reach_the_python_types() -> None:
    record = {
        "id": "k1",
        "kind": "ai",
        "keyHash": "h",
        "prefix": "cg_",
        "name": "n",
        "scopes": [],
        "createdAt": 1.0,
        "requestCount": 2.0,
        "active": True,
    }
    answers = {
        "ai/analytics:getProviderStats": {
            "totalRequests": 4000.0,
            "successRate": 1.0,
            "averageLatency": 1.0,
            "totalTokens": 0.0,
            "totalCost": 0.0,
            "truncated": True,
        },
        "embeddings/analytics:getUsage": {
            "totalRequests": 10000.0,
            "successfulRequests": 10000.0,
            "totalTokens": 1.0,
            "totalItems": 1.0,
            "truncated": True,
        },
        "apiKeys:list": {"keys": [record], "truncated": True},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        path = json.loads(request.content)["path"]
        return httpx.Response(200, json={"status": "success", "value": answers[path]})

    store = stub(handler)
    try:
        assert (await store.provider_stats("openai", 0, 1)).truncated
        assert (await store.embedding_usage("h", 0, 1)).truncated
        keys = await store.list_api_keys()
    finally:
        await store.close()
    assert isinstance(keys, ApiKeyList) and keys.truncated
    assert [k.request_count for k in keys] == [2]


async def test_a_capped_edge_is_flagged_end_to_end(convex_server: ConvexTestServer) -> None:
    """More rows in a range's partial minute than one query reads: the answer says so."""
    convex_server.reset()
    store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=30)
    minute = (time.time() * 1000 // 60_000) * 60_000 - 60_000
    rows = [
        AIRequestLog(minute + 1 + i % 50_000, "openai", "m", "fp", "192.0.2.1", True, 1.0)
        for i in range(4_001)
    ]
    try:
        await store.write_logs(LogBatch(id="edge", ai_requests=rows))
        partial = await store.provider_stats("openai", minute + 1, minute + 59_999)
        whole = await store.provider_stats("openai", minute, minute + 60_000)
        small = await store.provider_stats("openai", minute + 1, minute + 1)
    finally:
        await store.close()
    assert (partial.total_requests, partial.truncated) == (4_000, True)
    assert (whole.total_requests, whole.truncated) == (4_001, False)
    assert (small.total_requests, small.truncated) == (1, False)


# -- batches of several writers ------------------------------------------------------------------


async def test_each_store_sends_one_writer_id_of_its_own() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["args"])
        return httpx.Response(200, json={"status": "success", "value": {"applied": True}})

    first, second = stub(handler), stub(handler)
    try:
        await first.write_logs(one_row(1_000))
        await first.write_logs(one_row(2_000))
        await second.write_logs(one_row(3_000))
    finally:
        await first.close()
        await second.close()
    writers = [args["writer"] for args in sent]
    assert writers == [first.writer, first.writer, second.writer]
    assert first.writer != second.writer and len(first.writer) >= 16


async def test_several_writers_share_no_document_and_add_up(
    convex_server: ConvexTestServer,
) -> None:
    """Three instances log the same minute and the same key: totals as if one had."""
    convex_server.reset()
    stores = [ConvexStore(convex_server.url, convex_server.admin_key) for _ in range(3)]
    now = time.time() * 1000
    try:
        key = await stores[0].create_api_key(
            NewApiKey("ai", "f" * 64, "cg_", "shared", None, (), None, now, None)
        )

        async def log(i: int, store: ConvexStore) -> None:
            rows = [
                AIRequestLog(
                    now - 500 + i, "openai", "m", "fp", "192.0.2.1", i != 1, 10.0 * i, tokens_used=i
                )
                for _ in range(i + 1)
            ]
            usage = [KeyUsage(key.id, now - 100 * i, i + 1)]
            await store.write_logs(LogBatch(id=f"w{i}", ai_requests=rows, key_usage=usage))

        await asyncio.gather(*(log(i, store) for i, store in enumerate(stores)))
        stats = await stores[1].provider_stats("openai", now - 60_000, now + 1_000)
        found = await stores[2].find_api_key("f" * 64)
        listed = await stores[0].list_api_keys()
    finally:
        for store in stores:
            await store.close()
    # 1 + 2 + 3 rows; writer 1's two rows failed; latencies 0, 10, 10, 20, 20, 20.
    assert (stats.total_requests, stats.total_tokens, stats.truncated) == (6, 0 + 2 + 6, False)
    assert stats.success_rate == pytest.approx(4 / 6)
    assert stats.average_latency == pytest.approx(80 / 6)
    assert found is not None and (found.request_count, found.last_used) == (6, now)
    assert not listed.truncated and [k.request_count for k in listed] == [6]


async def test_more_bot_events_than_one_query_reads_come_whole(
    convex_server: ConvexTestServer,
) -> None:
    """Asking for more than 1,000 events pages through them instead of cutting short."""
    convex_server.reset()
    store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=30)
    events = [
        BotEvent(1_000.0 + i // 4, f"fp{i}", "192.0.2.1", "bot", "ai_scraper", "allowed")
        for i in range(1_250)
    ]
    try:
        await store.write_logs(LogBatch(id="bots", bot_events=events))
        some = await store.bot_events(since=0, limit=1_100)
        every = await store.bot_events(since=0, limit=5_000)
        recent = await store.bot_events(since=1_200, limit=2_000)
        with pytest.raises(ConfigurationError, match="at most 1000"):
            await anext(store.watch_bot_events(since=0, limit=1_001))
    finally:
        await store.close()
    assert len(some) == 1_100 and len({e.fingerprint for e in some}) == 1_100
    timestamps = [e.timestamp for e in every]
    assert timestamps == sorted(timestamps, reverse=True)  # newest first across pages
    assert {e.fingerprint for e in every} == {e.fingerprint for e in events}
    assert len(every) == 1_250
    assert {e.fingerprint for e in recent} == {f"fp{i}" for i in range(800, 1_250)}


async def test_a_hidden_user_name_does_not_change_how_errors_read() -> None:
    """User "admin" is hidden from messages, yet an admin-key error is still one."""
    answer = {"status": "error", "errorMessage": "The admin key is not valid for this deployment"}
    store = stub(answering(200, answer), url="http://admin:pw-9f8e@127.0.0.1:3210")
    try:
        with pytest.raises(ConvexAuthError) as info:
            await store.count_auth_failures("h", 0)
    finally:
        await store.close()
    assert "pw-9f8e" not in str(info.value) and "admin:" not in str(info.value)


async def test_subscription_errors_hide_url_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    import convex

    class Refusing:
        def __init__(self, url: str) -> None:
            self.url = url

        def set_admin_auth(self, key: str) -> None:
            self.key = key

        def subscribe(self, path: str, args: dict[str, Any]) -> Any:
            raise RuntimeError(f"cannot connect to {self.url} with {self.key}")

    monkeypatch.setattr(convex, "ConvexClient", Refusing)
    store = ConvexStore("http://dave:s3cr3t-pw@127.0.0.1:3210", ADMIN_KEY)
    try:
        with pytest.raises(StoreError) as info:
            await anext(store.watch_bot_events(since=0))
    finally:
        await store.close()
    message = str(info.value)
    assert "s3cr3t-pw" not in message and "dave" not in message and ADMIN_KEY not in message
    assert "http://***@127.0.0.1:3210" in message


@given(
    user=st.text(alphabet=string.ascii_letters + string.digits + "-._~%!$&'()*+,;=", min_size=1),
    # "!" never occurs in the shown URL, so finding the password there means it leaked.
    password=st.text(
        alphabet=string.ascii_letters + string.digits + "-._~%!$&'()*+,;=:@", min_size=3
    ).map(lambda text: "!" + text),
    path=st.sampled_from(["", "/", "/convex", "/a@b"]),
)
def test_no_userinfo_survives_in_the_shown_url(user: str, password: str, path: str) -> None:
    url = f"https://{user}:{password}@convex.example:3210{path}"
    shown = _redact_url(url)
    assert f"{user}:{password}" not in shown and password not in shown
    assert shown == f"https://***@convex.example:3210{path}"
    message = f"failed: {url} ({password}, {ADMIN_KEY})"
    for secret, replacement in _hidden(url, shown, ADMIN_KEY):
        message = message.replace(secret, replacement)
    assert password not in message and ADMIN_KEY not in message
