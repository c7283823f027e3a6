"""One contract for every store (`convex_guard.stores.testing`), bound to ours.

Runs against MemoryStore and against ConvexStore on the loopback Convex test server (the real
`convex/` functions under convex-test, over Convex's real HTTP API). Set CONVEX_SELF_HOSTED_URL
and CONVEX_SELF_HOSTED_ADMIN_KEY to also check a real self-hosted deployment's hot path
(`-m convex_live`); the whole contract needs an empty store, which a live deployment is not.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from convex_guard import HOUR, FixedWindow, MemoryStore
from convex_guard.stores.convex import ConvexStore
from convex_guard.stores.testing import (
    AlertStoreContract,
    AuditStoreContract,
    ShiftedClock,
    StoreContract,
)

from .conftest import ConvexTestServer


class TestMemoryStore(StoreContract, AlertStoreContract, AuditStoreContract):
    conflicts = False

    @pytest.fixture
    def clock(self) -> ShiftedClock:
        return ShiftedClock()

    @pytest.fixture
    def store(self, clock: ShiftedClock) -> MemoryStore:
        return MemoryStore(clock=clock.now)


class ServerClock(ShiftedClock):
    """The loopback server's clock, shifted with the test's."""

    def __init__(self, server: ConvexTestServer) -> None:
        super().__init__()
        self.server = server

    async def advance(self, ms: float) -> None:
        await super().advance(ms)
        self.server.shift_clock(self.offset)


class TestConvexStore(StoreContract, AlertStoreContract, AuditStoreContract):
    @pytest.fixture
    def clock(self, convex_server: ConvexTestServer) -> ServerClock:
        convex_server.reset()
        return ServerClock(convex_server)

    @pytest.fixture
    async def store(
        self, convex_server: ConvexTestServer, clock: ServerClock
    ) -> AsyncIterator[ConvexStore]:
        convex = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
        try:
            yield convex
        finally:
            await convex.close()


live = pytest.mark.skipif(
    not (
        os.environ.get("CONVEX_SELF_HOSTED_URL") and os.environ.get("CONVEX_SELF_HOSTED_ADMIN_KEY")
    ),
    reason="set CONVEX_SELF_HOSTED_URL and CONVEX_SELF_HOSTED_ADMIN_KEY to run against a real "
    "self-hosted deployment",
)


@pytest.mark.convex_live
@live
async def test_live_deployment_answers_the_hot_path() -> None:
    store = ConvexStore.from_env()
    try:
        name = f"live-{uuid.uuid4().hex}"
        config = FixedWindow(rate=2, period=HOUR, start=0)
        results = [await store.limit(name, config, key="k") for _ in range(3)]
        assert [r.ok for r in results] == [True, True, False]
        await store.reset(name, key="k")
    finally:
        await store.close()
