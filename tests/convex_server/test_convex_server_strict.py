"""The loopback Convex server is as strict as the backend where it matters: optimistic
concurrency (conflicts, retries, the final 503), the mutation concurrency cap (429),
transaction limits, and internal functions hidden from callers without admin auth, over HTTP
and the sync protocol.

Each test starts its own server with the options it needs. Mutations are made to overlap with
`hold()`: the server's serial point is kept busy, so mutations sent meanwhile arrive together
(same arrival number), as concurrent requests do on the backend.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from .launch import ConvexTestServer, running_server

#: A limit with no key: every caller shares one `rateLimits` document. A day-long period
#: makes the refill negligible within a test (10 tokens a day).
GLOBAL = {"name": "global", "config": {"kind": "token bucket", "rate": 10, "period": 86_400_000}}
FAST = (5.0, 50.0)


def call(server: ConvexTestServer, kind: str, path: str, args: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/api/{kind}",
        json={"path": path, "args": args, "format": "json"},
        headers={"Authorization": f"Convex {server.admin_key}"},
        timeout=60,
    )


async def together(server: ConvexTestServer, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send the mutations at once while the server is held: they arrive together."""
    server.hold(400)
    headers = {"Authorization": f"Convex {server.admin_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
        return list(
            await asyncio.gather(
                *(client.post("/api/mutation", json={**b, "format": "json"}) for b in bodies)
            )
        )


def check(limit: dict[str, Any] = GLOBAL) -> dict[str, Any]:
    return {"path": "guard:check", "args": {"limits": [limit]}}


def rate_limit_documents(server: ConvexTestServer) -> list[dict[str, Any]]:
    return [
        d
        for d in server.counters()["documents"]
        if d["table"] == "rateLimits" and d["component"] == "rateLimiter"
    ]


@pytest.fixture(scope="module")
def strict_server() -> Iterator[ConvexTestServer]:
    with running_server(occ_backoff_ms=FAST) as server:
        yield server


@pytest.fixture
def strict(strict_server: ConvexTestServer) -> ConvexTestServer:
    """The backend's defaults (backoff scaled down), an empty deployment and zero counters."""
    strict_server.reset()
    return strict_server


def test_two_concurrent_increments_of_one_document_conflict_and_one_retries(
    strict: ConvexTestServer,
) -> None:
    assert call(strict, "mutation", "guard:check", check()["args"]).json()["status"] == "success"
    answers = asyncio.run(together(strict, [check(), check()]))

    assert [a.status_code for a in answers] == [200, 200]
    values = sorted(a.json()["value"]["results"][0]["value"] for a in answers)
    # Both were admitted and both consumed a token: the retry saw the winner's write.
    assert all(a.json()["value"]["ok"] for a in answers)
    assert values == pytest.approx([7, 8], abs=0.01)
    counters = strict.counters()
    [doc] = rate_limit_documents(strict)
    assert doc["writes"] == 3
    assert (doc["conflicts"], doc["retries"], doc["occFailures"]) == (1, 1, 0)
    totals = counters["totals"]
    assert (totals["conflicts"], totals["retries"], totals["occFailures"]) == (1, 1, 0)
    assert totals["mutations"] == 3
    assert totals["attempts"] == 4


def test_without_retries_a_conflict_is_the_backends_503() -> None:
    with running_server(occ_retries=0) as server:
        call(server, "mutation", "guard:check", check()["args"])
        answers = asyncio.run(together(server, [check(), check()]))
        [doc] = rate_limit_documents(server)
        assert sorted(a.status_code for a in answers) == [200, 503]
        [failed] = [a for a in answers if a.status_code == 503]
        assert failed.json() == {
            "code": "OptimisticConcurrencyControlFailure",
            "message": 'Documents read from or written to the "rateLimits" table changed while '
            "this mutation was being run and on every subsequent retry. Another call to this "
            f'mutation changed the document with ID "{doc["id"]}". '
            "See https://docs.convex.dev/error#1",
        }
        # The loser's writes were rolled back: the limit counts the warm-up and the winner.
        after = call(server, "mutation", "guard:check", check()["args"]).json()["value"]
        assert after["results"][0]["value"] == pytest.approx(7, abs=0.01)
        assert (doc["conflicts"], doc["retries"], doc["occFailures"]) == (1, 0, 1)
        assert server.counters()["totals"]["occFailures"] == 1


def test_with_occ_off_nothing_conflicts() -> None:
    with running_server(occ=False) as server:
        call(server, "mutation", "guard:check", check()["args"])
        answers = asyncio.run(together(server, [check(), check()]))
        assert [a.status_code for a in answers] == [200, 200]
        totals = server.counters()["totals"]
        assert (totals["conflicts"], totals["retries"]) == (0, 0)
        [doc] = rate_limit_documents(server)
        assert doc["writes"] == 3


def test_a_burst_over_the_concurrency_cap_gets_the_backends_429() -> None:
    with running_server(max_concurrent_mutations=1, queue_timeout_ms=50) as server:
        keyed = [check({**GLOBAL, "key": f"k{i}"}) for i in range(3)]
        answers = asyncio.run(together(server, keyed))
        assert sorted(a.status_code for a in answers) == [200, 429, 429]
        for refused in (a for a in answers if a.status_code == 429):
            assert refused.json() == {
                "code": "TooManyConcurrentRequests",
                "message": "Too many concurrent requests. Your backend is limited to 1 "
                "concurrent mutations. To get more resources, upgrade to Convex Pro. If you "
                "are already on Convex Pro, please contact support.",
            }
        assert server.counters()["totals"]["overloaded"] == 2


def ai_row(n: int) -> dict[str, Any]:
    return {
        "timestamp": 1_700_000_000_000 + n,
        "provider": "openai",
        "model": "m",
        "fingerprint": "f",
        "ip": "192.0.2.1",
        "success": True,
        "latencyMs": 1,
    }


def embedding_row(n: int) -> dict[str, Any]:
    return {
        "requestId": f"r{n}",
        "apiKeyHash": "h",
        "timestamp": 1_700_000_000_000 + n,
        "batchSize": 1,
        "latencyMs": 1,
        "tokensUsed": 1,
        "success": True,
        "model": "m",
    }


def batch(ai: int, embeddings: int) -> dict[str, Any]:
    return {
        "batchId": f"b-{ai}-{embeddings}",
        "aiRequests": [ai_row(n) for n in range(ai)],
        "embeddingRequests": [embedding_row(n) for n in range(embeddings)],
        "authFailures": [],
        "botEvents": [],
        "keyUsage": [],
    }


def test_a_transaction_over_the_write_limit_fails_as_on_the_backend(
    strict: ConvexTestServer,
) -> None:
    # 8,192 + 7,900 rows and their rollups: over the backend's 16,000 writes per transaction.
    answer = call(strict, "mutation", "logs:writeBatch", batch(8192, 7900))
    assert answer.status_code == 200
    assert answer.json() == {
        "status": "error",
        "errorMessage": "Uncaught Error: Too many writes in a single function execution "
        "(limit: 16000)",
    }
    assert strict.rows("aiRequestLogs") == []  # all rolled back
    assert strict.rows("logBatches") == []
    # More than 8,192 items in one array: the backend refuses the arguments.
    too_long = call(strict, "mutation", "logs:writeBatch", batch(8193, 0)).json()
    assert too_long == {
        "status": "error",
        "errorMessage": "Invalid arguments for logs.js:writeBatch: Array length is too long "
        "(8193 > maximum length 8192)",
    }
    # Under the limits the same shape is written.
    assert call(strict, "mutation", "logs:writeBatch", batch(100, 100)).json() == {
        "status": "success",
        "value": {"applied": True},
    }
    assert len(strict.rows("aiRequestLogs")) == 100


def test_an_internal_function_without_admin_auth_is_hidden(strict: ConvexTestServer) -> None:
    for kind, path, args in [
        ("mutation", "guard:check", check()["args"]),
        ("query", "ai/analytics:getBotEvents", {"limit": 1, "since": 0}),
    ]:
        answer = httpx.post(
            f"{strict.url}/api/{kind}", json={"path": path, "args": args}, timeout=30
        )
        assert answer.status_code == 200
        assert answer.json() == {
            "status": "error",
            "errorMessage": f"Could not find public function for '{path}'.",
        }
    assert strict.counters()["totals"]["mutations"] == 0  # refused before it ran
    # A wrong admin key is still refused outright.
    wrong = httpx.post(
        f"{strict.url}/api/query",
        json={"path": "ai/analytics:getBotEvents", "args": {"limit": 1, "since": 0}},
        headers={"Authorization": "Convex not-the-key"},
        timeout=30,
    )
    assert wrong.status_code == 401
    assert wrong.json()["code"] == "BadAdminKey"


def test_counters_count_every_write_and_reset_with_the_deployment(
    strict: ConvexTestServer,
) -> None:
    for _ in range(3):
        call(strict, "mutation", "guard:check", check()["args"])
    call(strict, "mutation", "logs:writeBatch", batch(2, 0))
    counters = strict.counters()
    hottest = counters["documents"][0]
    assert (hottest["table"], hottest["writes"]) == ("rateLimits", 3)
    tables = {d["table"] for d in counters["documents"]}
    assert {"aiRequestLogs", "providerRollups", "providerHourlyRollups", "logBatches"} <= tables
    assert counters["totals"]["mutations"] == 4
    assert counters["totals"]["commits"] == 4

    strict.reset()
    assert strict.counters() == {
        "totals": {
            "queries": 0,
            "mutations": 0,
            "attempts": 0,
            "commits": 0,
            "conflicts": 0,
            "retries": 0,
            "occFailures": 0,
            "overloaded": 0,
        },
        "documents": [],
    }


async def sync_mutation(
    url: str, key: str | None, args: dict[str, Any], held: asyncio.Event
) -> tuple[dict[str, Any] | None, Any]:
    """One Mutation over the sync protocol: (its MutationResponse or None, the close frame)."""
    async with websockets.connect(url.replace("http", "ws") + "/api/1.0/sync") as ws:
        await ws.send(
            '{"type":"Connect","sessionId":"s","connectionCount":0,"lastCloseReason":null}'
        )
        if key is not None:
            auth = {"type": "Authenticate", "tokenType": "Admin", "value": key, "baseVersion": 0}
            await ws.send(json.dumps(auth))
        await held.wait()
        mutation = {"type": "Mutation", "requestId": 0, "udfPath": "guard:check", "args": [args]}
        await ws.send(json.dumps(mutation))
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message["type"] == "MutationResponse":
                    return message, None
        except websockets.ConnectionClosed as closed:
            return None, closed.rcvd
        return None, ws.protocol.close_rcvd


def test_over_the_sync_protocol_as_the_backend_answers() -> None:
    with running_server(occ_retries=0) as server:
        call(server, "mutation", "guard:check", check()["args"])

        async def run() -> list[tuple[dict[str, Any] | None, Any]]:
            held = asyncio.Event()
            tasks = [
                asyncio.create_task(sync_mutation(server.url, k, check()["args"], held))
                for k in (server.admin_key, server.admin_key, None)
            ]
            await asyncio.sleep(0.5)  # connected and authenticated
            server.hold(400)
            held.set()
            return list(await asyncio.gather(*tasks))

        first, second, anonymous = asyncio.run(run())
        # Without admin auth: a failed MutationResponse, the function hidden.
        assert anonymous[0] is not None
        assert anonymous[0]["success"] is False
        assert anonymous[0]["result"] == "Could not find public function for 'guard:check'."
        # Of the two that overlapped, one committed; the other's socket was closed with 1013
        # (try again later) and the OCC code, as the backend closes it.
        outcomes = sorted([first, second], key=lambda o: o[0] is None)
        assert outcomes[0][0] is not None and outcomes[0][0]["success"] is True
        close = outcomes[1][1]
        assert (close.code, close.reason) == (1013, "OptimisticConcurrencyControlFailure")
