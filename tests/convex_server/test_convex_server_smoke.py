"""The loopback Convex test server answers the official Python clients like a real backend.

Skipped unless the Convex project's npm packages are installed (`cd convex && npm ci`).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from convex import ConvexClient
from convex.http_client import ConvexExecutionError, ConvexHttpClient
from convex.values import CoercibleToConvexValue

from .launch import ConvexTestServer

# The clients take arguments of this type; the dicts below are declared so, not inferred.
Args = dict[str, CoercibleToConvexValue]

BUCKET: Args = {"kind": "token bucket", "rate": 2, "period": 60_000}
BOT: Args = {
    "fingerprint": "fp-smoke",
    "ip": "192.0.2.1",
    "userAgent": "curl/8.0",
    "detectionType": "bot_useragent",
    "action": "allowed",
}


@pytest.fixture
def url(convex_server: ConvexTestServer) -> str:
    return convex_server.url


@pytest.fixture
def admin(convex_server: ConvexTestServer) -> ConvexHttpClient:
    convex_server.reset()
    client = ConvexHttpClient(convex_server.url)
    client.set_admin_auth(convex_server.admin_key)
    return client


def test_guard_check_and_provider_stats(admin: ConvexHttpClient) -> None:
    limits: list[Args] = [{"name": "n", "key": "k", "config": BUCKET}]
    first = admin.mutation("guard:check", {"limits": limits})
    assert first["ok"] is True
    assert first["results"][0]["value"] == 1.0
    assert first["now"] >= first["results"][0]["ts"]
    denied = admin.mutation("guard:check", {"limits": [{**limits[0], "count": 2}]})
    assert denied["ok"] is False
    assert denied["results"][0]["retryAfter"] > 0

    now = time.time() * 1000
    row: Args = {
        "timestamp": now,
        "provider": "openai",
        "model": "m",
        "fingerprint": "f",
        "ip": "192.0.2.1",
        "success": True,
        "latencyMs": 12,
        "tokensUsed": 3,
        "cost": 0.5,
    }
    batch: Args = {
        "batchId": "b1",
        "aiRequests": [row, {**row, "success": False, "latencyMs": 8}],
        "embeddingRequests": [],
        "authFailures": [],
        "botEvents": [],
        "keyUsage": [],
    }
    assert admin.mutation("logs.js:writeBatch", batch) == {"applied": True}
    assert admin.mutation("logs:writeBatch", batch) == {"applied": False}
    time_range: Args = {"start": now - 1, "end": now + 1}
    stats = admin.query(
        "ai/analytics:getProviderStats", {"provider": "openai", "timeRange": time_range}
    )
    assert stats == {
        "totalRequests": 2.0,
        "successRate": 0.5,
        "averageLatency": 10.0,
        "totalTokens": 6.0,
        "totalCost": 1.0,
        "shadowRefusals": 0.0,
        "truncated": False,
    }


def test_function_errors_and_auth(url: str, admin: ConvexHttpClient) -> None:
    too_many: Args = {"name": "n", "count": 5, "config": BUCKET}
    with pytest.raises(ConvexExecutionError, match="exceeds"):
        admin.mutation("guard:check", {"limits": [too_many]})
    with pytest.raises(ConvexExecutionError, match="Could not find"):
        admin.query("guard:nothing")
    # An internal function without admin auth: the backend hides it (a function error, HTTP
    # 200), exactly as it answers for a function that does not exist.
    anonymous = ConvexHttpClient(url)
    with pytest.raises(
        ConvexExecutionError,
        match=r"^Could not find public function for 'ai/analytics:getBotEvents'\.$",
    ):
        anonymous.query("ai/analytics:getBotEvents", {"limit": 1, "since": 0})
    wrong = ConvexHttpClient(url)
    wrong.set_admin_auth("not-the-key")
    with pytest.raises(Exception, match="401") as raised:
        wrong.query("ai/analytics:getBotEvents", {"limit": 1, "since": 0})
    assert "not-the-key" not in str(raised.value)


async def test_subscription_sees_a_new_bot_event(
    convex_server: ConvexTestServer, admin: ConvexHttpClient
) -> None:
    client = ConvexClient(convex_server.url)
    client.set_admin_auth(convex_server.admin_key)
    subscription = client.subscribe("ai/analytics:getBotEvents", {"limit": 10, "since": 0})
    events = subscription.__aiter__()
    assert await asyncio.wait_for(events.__anext__(), 10) == []
    verdict = await asyncio.to_thread(client.mutation, "guard:check", {"limits": [], "bot": BOT})
    assert verdict["bot"] == {"action": "allowed", "previousEvents": 0.0}
    events_now = await asyncio.wait_for(events.__anext__(), 10)
    assert isinstance(events_now, list)
    [event] = events_now
    assert isinstance(event, dict)
    assert event["fingerprint"] == "fp-smoke"
    assert event["metadata"] == {"previousAttempts": 0.0}
    subscription.unsubscribe()
