"""Properties: no sequence of calls gets more through a limit than its algorithm allows."""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from convex_guard import ConfigurationError, FixedWindow, LimitRequest, MemoryStore, TokenBucket
from convex_guard.core.limits import decide

# (time step in ms, count) pairs; counts stay within capacity so no call is a config error.
steps = st.lists(
    st.tuples(st.integers(0, 5_000), st.integers(0, 4)),
    min_size=1,
    max_size=80,
)
EPS = 1e-6


@given(
    rate=st.integers(1, 20),
    period=st.integers(100, 10_000),
    capacity=st.integers(4, 30),
    steps=steps,
)
def test_token_bucket_never_admits_more_than_capacity_plus_refill(
    rate: int, period: int, capacity: int, steps: list[tuple[int, int]]
) -> None:
    config = TokenBucket(rate=rate, period=timedelta(milliseconds=period), capacity=capacity)
    state = (float(capacity), 0.0)
    now = 0.0
    admitted: list[tuple[float, int]] = []
    for step, count in steps:
        now += step
        result, new_state = decide(config, state, now, count)
        if result.ok:
            admitted.append((now, count))
        else:
            assert new_state is state  # a denied call consumes nothing
        state = new_state
    # Any interval [t_i, t_j] of admitted calls: at most capacity + refill over its length.
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            elapsed = admitted[j][0] - admitted[i][0]
            assert total <= capacity + rate * elapsed / period + EPS


@given(
    rate=st.integers(1, 10),
    period=st.integers(100, 5_000),
    extra=st.integers(0, 10),
    start=st.integers(0, 5_000),
    steps=steps,
)
def test_fixed_window_never_admits_more_than_capacity_plus_rate_per_window(
    rate: int, period: int, extra: int, start: int, steps: list[tuple[int, int]]
) -> None:
    capacity = max(rate, 4) + extra
    config = FixedWindow(
        rate=rate, period=timedelta(milliseconds=period), capacity=capacity, start=start
    )
    state = (float(capacity), float(start))
    now = float(start)
    admitted: list[tuple[float, int]] = []
    for step, count in steps:
        now += step
        result, new_state = decide(config, state, now, count)
        if result.ok:
            admitted.append((now, count))
        else:
            assert new_state is state
        state = new_state
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            windows = (admitted[j][0] - start) // period - (admitted[i][0] - start) // period
            assert total <= capacity + rate * windows + EPS


@given(steps=steps, reserve=st.booleans())
def test_retry_after_is_exactly_when_the_call_would_pass(
    steps: list[tuple[int, int]], reserve: bool
) -> None:
    """Waiting `retry_after` is enough, and (for a bucket) not more than needed."""
    config = TokenBucket(rate=3, period=1_000, capacity=5)
    state = (5.0, 0.0)
    now = 0.0
    for step, count in steps:
        now += step
        result, new_state = decide(config, state, now, count, reserve)
        if not result.ok:
            assert result.retry_after is not None and result.retry_after > 0
            later, _ = decide(config, state, now + result.retry_after + EPS, count)
            assert later.ok
        state = new_state


limit_configs = st.one_of(
    st.builds(
        TokenBucket,
        rate=st.integers(1, 5),
        period=st.integers(100, 1_000).map(lambda ms: timedelta(milliseconds=ms)),
        capacity=st.integers(3, 6),
    ),
    st.builds(
        FixedWindow,
        rate=st.integers(3, 5),
        period=st.integers(100, 1_000).map(lambda ms: timedelta(milliseconds=ms)),
        start=st.just(0),
    ),
)


@settings(max_examples=60)
@given(
    configs=st.lists(limit_configs, min_size=1, max_size=4),
    calls=st.lists(
        st.tuples(st.integers(0, 400), st.lists(st.integers(0, 3), min_size=4, max_size=4)),
        min_size=1,
        max_size=30,
    ),
)
def test_check_is_all_or_nothing(
    configs: list[TokenBucket | FixedWindow], calls: list[tuple[int, list[int]]]
) -> None:
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0], random=lambda: 0.0)

    async def run() -> None:
        for step, counts in calls:
            clock[0] += step
            requests = [
                LimitRequest(f"l{i}", config, key="k", count=counts[i])
                for i, config in enumerate(configs)
            ]
            before = [await store.peek(r.name, r.config, key="k") for r in requests]
            outcome = await store.check(requests)
            after = [await store.peek(r.name, r.config, key="k") for r in requests]
            assert outcome.ok == all(result.ok for result in outcome.results)
            if outcome.ok:
                for r, b, a in zip(requests, before, after, strict=True):
                    assert a.remaining == pytest.approx(b.remaining - r.count)
            else:
                assert [a.remaining for a in after] == [b.remaining for b in before]

    asyncio.run(run())


@settings(max_examples=40)
@given(steps=steps)
def test_memory_store_decides_like_the_pure_core(steps: list[tuple[int, int]]) -> None:
    config = FixedWindow(rate=4, period=1_000, start=0)
    clock = [0.0]
    store = MemoryStore(clock=lambda: clock[0])
    state = (4.0, 0.0)

    async def run() -> None:
        nonlocal state
        for step, count in steps:
            clock[0] += step
            got = await store.limit("x", config, count=count)
            want, state = decide(config, state, clock[0], count)
            assert got == want

    asyncio.run(run())


@settings(max_examples=300)
@given(
    kind=st.sampled_from(["token bucket", "fixed window", "aligned window"]),
    rate=st.floats(0.5, 1e6) | st.floats(0.5, 4),  # a few tokens: a count of 1 is felt
    period=st.floats(1_000, 1e8),
    capacity=st.none() | st.floats(0.5, 1e6),
    max_reserved=st.none() | st.floats(0.5, 100),
    now=st.floats(0, 4e12),
    phase=st.floats(0, 1, exclude_max=True),
    # A request's default count of 1 (as a float and an int) has its own shortcut.
    count=st.sampled_from([1.0, 1]) | st.floats(-50, 200),
    reserve=st.booleans(),
)
def test_first_decision_is_the_deciders_on_a_fresh_state(
    kind: str,
    rate: float,
    period: float,
    capacity: float | None,
    max_reserved: float | None,
    now: float,
    phase: float,
    count: float,
    reserve: bool,
) -> None:
    """A new key's shortcut (`config.first`) answers and stores, to the last bit, what the
    decider does on `config.fresh`, or refuses the same count, for any config and count."""
    numbers = {"rate": rate, "period": period, "capacity": capacity, "max_reserved": max_reserved}
    config = (
        TokenBucket(**numbers)
        if kind == "token bucket"
        else FixedWindow(**numbers, start=0 if kind == "aligned window" else None)
    )
    expected_states: dict[str | None, tuple[float, float]] = {}
    states: dict[str | None, tuple[float, float]] = {}
    try:
        expected = config.decider(
            expected_states, "k", config.fresh(now, lambda: phase), now, count, reserve
        )
    except ConfigurationError:
        with pytest.raises(ConfigurationError):
            config.first(states, "k", now, count, reserve, lambda: phase)
        return
    assert config.first(states, "k", now, count, reserve, lambda: phase) == expected
    assert states == expected_states
    assert expected[0]  # a full state admits every count the decider does not refuse


def reference_fixed_window(
    config: FixedWindow, state: tuple[float, float], now: float, count: float
) -> tuple[tuple[float, float], float] | None:
    """`calculateRateLimit` for a fixed window, written plainly: the state an admitted call
    stores and its time to full (None if denied)."""
    cap, rate, period = config.max, config.rate, config.period
    available, ts = state
    windows = (now - ts) // period
    if windows:
        available += rate * windows
        ts += windows * period
    available = min(available, cap)
    value = available - count
    if value < 0:
        return None
    full_in = ts + period * math.ceil((cap - value) / rate) - now if value < cap else 0.0
    return (value, ts), full_in


@settings(max_examples=300)
@given(
    rate=st.floats(0.5, 1e6),
    period=st.floats(1_000, 1e8),
    capacity=st.none() | st.floats(0.5, 1e6),
    # Tokens missing, in windows' worth: within one window's refill, more, or reserved below.
    missing=st.floats(-1, 3) | st.sampled_from([0.0, 1.0]),
    ts=st.floats(0, 4e12),
    # Time since the state's window began, in periods: the same window, later or earlier.
    windows=st.floats(-3, 30) | st.floats(0, 1, exclude_max=True),
    count=st.sampled_from([0.0, 1.0, 2.0]) | st.floats(0, 100),
)
def test_fixed_window_decider_is_the_plain_formula(
    rate: float,
    period: float,
    capacity: float | None,
    missing: float,
    ts: float,
    windows: float,
    count: float,
) -> None:
    """The compiled decider's shortcuts (the same window without a division, one window's
    refill without a ceiling) store and answer, to the last bit, what the plain formula does,
    in the state's window, later ones and (an aligned start ahead of `now`) earlier ones."""
    config = FixedWindow(rate=rate, period=period, capacity=capacity)
    assume(count <= config.max)
    state = (config.max - min(missing, 1.0) * config.rate, ts)
    now = ts + windows * period
    states: dict[str | None, tuple[float, float]] = {}
    ok, _, remaining, reset = config.decider(states, "k", state, now, count, False)
    expected = reference_fixed_window(config, state, now, count)
    if expected is None:
        assert not ok and not states
        return
    stored, full_in = expected
    assert ok and states == {"k": stored}
    assert (remaining, reset) == (stored[0], full_in)
