"""What keeps a request's cost flat in the number of clients and the length of its headers:
the address fast path, the user-agent verdict cache, the expiry queue, and the one-item
`RateLimit` field. Each cache is held equal to what it stands in for."""

from __future__ import annotations

from ipaddress import IPv4Address

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from convex_guard import (
    HOUR,
    MINUTE,
    ConfigurationError,
    FixedWindow,
    GuardSettings,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
    TokenBucket,
)
from convex_guard.core.clientip import UNKNOWN_CLIENT, _parse, ip_key, peer_keys
from convex_guard.core.limits import LimitConfig, decide
from convex_guard.core.useragent import UserAgentVerdict, _VerdictCache

from .conftest import serve


def reference_peer_keys(peer: str, ipv6_prefix: int) -> tuple[str, str]:
    """peer_keys as it was before its fast path: every peer parsed by `ipaddress`."""
    address = _parse.__wrapped__(peer)
    if address is None:
        return UNKNOWN_CLIENT, UNKNOWN_CLIENT
    return ip_key.__wrapped__(address, 128), ip_key.__wrapped__(address, ipv6_prefix)


# Dotted quads with and without leading zeros, out-of-range parts, ports, spaces and IPv6.
_octets = st.one_of(
    st.integers(0, 255).map(str),
    st.integers(0, 999).map(str),
    st.integers(0, 99).map(lambda n: f"0{n}"),
    st.sampled_from(["", "+1", "1a", "٣"]),
)
_peers = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n))),
    st.lists(_octets, min_size=3, max_size=5).map(".".join),
    st.integers(0, 2**32 - 1).map(lambda n: f"{IPv4Address(n)}:8080"),
    st.integers(0, 2**32 - 1).map(lambda n: f" {IPv4Address(n)}"),
    st.sampled_from(["::1", "2001:db8::1", "::ffff:1.2.3.4", "[2001:db8::1]:443", "unknown"]),
    st.text(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(_peers, st.sampled_from([48, 64, 128]))
def test_peer_keys_equal_a_full_parse(peer: str, prefix: int) -> None:
    assert peer_keys.__wrapped__(peer, prefix) == reference_peer_keys(peer, prefix)
    assert peer_keys(peer, prefix) == reference_peer_keys(peer, prefix)


def _naming(ua: str) -> UserAgentVerdict:
    """A classifier whose verdict differs for every agent: a shared verdict would show."""
    return UserAgentVerdict(is_bot=True, category="other_bot", name=ua)


# Long agents that share their length and both ends, differing only in the middle: the key a
# long agent is found by is the same for all of them.
_middles = st.text(alphabet="abc", min_size=4, max_size=4)
_agents = st.one_of(
    st.text(max_size=300),
    _middles.map(lambda m: "A" * 300 + m + "Z" * 300),
    _middles.map(lambda m: "A" * 64 + m + "Z" * 200),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(_agents, min_size=1, max_size=40), st.integers(1, 8))
def test_verdict_cache_equals_the_classifier_and_stays_bounded(
    agents: list[str], maxsize: int
) -> None:
    cache = _VerdictCache(_naming, maxsize)
    for ua in agents:
        assert cache(ua) == _naming(ua)
        assert cache(ua).name == ua  # a hit, from the entry of this very agent
    info = cache.cache_info()
    assert info.maxsize == maxsize and info.currsize <= 2 * maxsize


_configs: list[LimitConfig] = [
    TokenBucket(rate=3, period=1_000),
    TokenBucket(rate=2, period=MINUTE, capacity=4),
    FixedWindow(rate=3, period=2_000, start=0),
]
_steps = st.lists(
    st.tuples(
        st.integers(0, len(_configs) - 1),  # which limit
        st.integers(0, 5),  # which key
        st.sampled_from([0.0, 1.0, 2.0]),  # count
        st.sampled_from([0, 1, 7, 300, 999, 1_000, 2_500, 61_000]),  # ms elapsed before
    ),
    max_size=60,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=100, deadline=None)
@given(_steps)
async def test_expiry_forgets_only_full_states(steps: list[tuple[int, int, float, int]]) -> None:
    """The store, forgetting states through its expiry queue, decides as one that never forgets:
    a state is only ever dropped once it is full again, when a new one is the same."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    kept: dict[tuple[int, int], tuple[float, float]] = {}
    for index, key, count, elapsed in steps:
        clock.now += elapsed
        config = _configs[index]
        state = kept.get((index, key)) or config.fresh(clock.now, lambda: 0.0)
        expected, new_state = decide(config, state, clock.now, count)
        kept[(index, key)] = new_state
        assert await store.limit(f"limit{index}", config, key=f"k{key}", count=count) == expected
        assert store.limit_keys <= len(kept)


async def test_expiry_drops_every_full_state_of_a_burst() -> None:
    """A burst of keys all full at once is forgotten two per new key, then the new keys are."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = TokenBucket(rate=10, period=1_000)
    for i in range(500):
        await store.limit("ip", config, key=f"old-{i}")
    clock.now += 2_000
    for i in range(250):
        await store.limit("ip", config, key=f"new-{i}")
    assert store.limit_keys == 250
    clock.now += 2_000
    for i in range(250):
        await store.limit("other", config, key=f"later-{i}")
    assert store.limit_keys == 250 and "ip" not in store._limits


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def test_ratelimit_items_closest_sends_the_policy_with_least_remaining() -> None:
    rules = [
        Rule("roomy", FixedWindow(rate=100, period=HOUR)),
        Rule("tight", TokenBucket(rate=3, period=MINUTE), key="ip"),
        Rule("middle", FixedWindow(rate=10, period=MINUTE, start=0)),
    ]
    app = Starlette(routes=[Route("/x", hello)])
    app.add_middleware(
        RateLimitMiddleware, store=MemoryStore(), rules=rules, ratelimit_items="closest"
    )
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        first = client.get("/x")
        assert first.headers["ratelimit-policy"] == '"tight";q=3;w=60'
        assert first.headers["ratelimit"].startswith('"tight";r=2;t=')
        client.get("/x")
        client.get("/x")
        denied = client.get("/x")  # the 429 names what was violated, as with "all"
        assert denied.status_code == 429 and denied.headers["ratelimit"].startswith('"tight";')


def test_ratelimit_items_all_is_the_default_and_bad_values_fail_at_start_up() -> None:
    assert GuardSettings(store=MemoryStore()).ratelimit_items == "all"
    assert (
        GuardSettings(store=MemoryStore(), ratelimit_items="closest").ratelimit_items == "closest"
    )
    rules = [Rule("a", FixedWindow(rate=5, period=MINUTE))]
    for bad in ("one", ""):
        with pytest.raises(ConfigurationError, match="ratelimit_items"):
            GuardSettings(store=MemoryStore(), ratelimit_items=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="ratelimit_items"):
            RateLimitMiddleware(hello, store=MemoryStore(), rules=rules, ratelimit_items=bad)  # type: ignore[arg-type]
