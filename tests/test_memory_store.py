"""MemoryStore beyond the algorithm: bounded memory, reset, peek, and the hot-path check."""

from __future__ import annotations

import gc
import math
from datetime import timedelta
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convex_guard import (
    MINUTE,
    ConfigurationError,
    FixedWindow,
    LimitRequest,
    MemoryStore,
    TokenBucket,
)
from convex_guard.core.limits import LimitConfig, LimitState, decide
from convex_guard.stores.base import AIRequestLog, AuthFailure, BotCheck, LogBatch
from convex_guard.stores.memory import MAX_BATCH_IDS, LimitPlan, LimitSpec


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_refilled_state_is_forgotten_without_a_full_scan() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = TokenBucket(rate=10, period=1_000)  # refills fully within a second
    for i in range(1_000):
        await store.limit("ip", config, key=f"10.0.{i // 256}.{i % 256}")
    assert store.limit_keys == 1_000  # all partly used, nothing to forget yet
    clock.now += 2_000  # every key is full again
    for i in range(2_000):
        await store.limit("ip", config, key=f"new-{i}")
        # Each new key sweeps two of the oldest, which are full again and dropped.
        assert store.limit_keys == max(1_000 - 2 * (i + 1), 0) + (i + 1)
    assert store.limit_keys == 2_000
    # All old keys dropped.
    assert not any(k is not None and k.startswith("10.0.") for k in store._limits["ip"].states)


@pytest.mark.parametrize(
    "config",
    [
        TokenBucket(rate=1, period=timedelta(milliseconds=100)),  # full again 100 ms after use
        # A deep bucket: one token back in 100 ms, though refilling from empty takes 100 s.
        # States are forgotten by when each can be full, not by the bucket's depth.
        TokenBucket(rate=1, period=timedelta(milliseconds=100), capacity=1_000),
        FixedWindow(rate=1, period=timedelta(milliseconds=100)),  # any phase, full by 100 ms
    ],
)
async def test_memory_stays_bounded_under_a_stream_of_distinct_keys(config: LimitConfig) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    peak = 0
    for i in range(50_000):
        clock.now += 1  # 1 new key per ms: ~100 keys are live at any time
        await store.limit("ip", config, key=str(i))
        peak = max(peak, store.limit_keys)
    assert peak <= 2 * 101 + 2


async def test_reset_and_peek() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = FixedWindow(rate=3, period=MINUTE, start=0)
    assert (await store.peek("a", config, key="k")).remaining == 3
    for _ in range(3):
        assert (await store.limit("a", config, key="k")).ok
    denied = await store.limit("a", config, key="k")
    assert not denied.ok and denied.retry_after is not None
    peeked = await store.peek("a", config, key="k")
    assert peeked.remaining == 0 and peeked.ok  # peeking consumes nothing and never denies
    assert (await store.limit("a", config, key="other")).ok  # keys are independent
    await store.reset("a", key="k")
    assert (await store.peek("a", config, key="k")).remaining == 3
    assert (await store.limit("a", config, key="k")).ok


async def test_check_sees_its_own_consumption_for_repeated_slots() -> None:
    store = MemoryStore(clock=Clock())
    config = FixedWindow(rate=3, period=MINUTE, start=0)
    twice = [LimitRequest("a", config, "k", 2), LimitRequest("a", config, "k", 2)]
    outcome = await store.check(twice)
    assert not outcome.ok  # 2 + 2 > 3, even though each alone fits
    assert store.limit_keys == 0  # the new state stored for the first is dropped again
    assert (await store.peek("a", config, key="k")).remaining == 3
    admitted = await store.check([*twice[:1], LimitRequest("a", config, "k", 1)])
    assert admitted.ok and [r.remaining for r in admitted.results] == [1, 0]
    assert store.limit_keys == 1


async def test_limit_states_cost_the_garbage_collector_nothing() -> None:
    """States are tuples of floats, which the collector stops tracking: a store holding
    100,000 keys adds nothing to a full collection (a list per key cost 65 ms each)."""
    store = MemoryStore(clock=Clock())
    bucket = TokenBucket(rate=10, period=MINUTE)
    window = FixedWindow(rate=100, period=MINUTE)
    for i in range(50):
        await store.limit("a", bucket, key=f"k{i}")
        outcome = await store.check([LimitRequest("b", window, f"k{i}"), LimitRequest("c", window)])
        assert outcome.ok
    gc.collect()
    states = [state for limit in store._limits.values() for state in limit.states.values()]
    assert len(states) == 50 + 50 + 1
    assert not any(gc.is_tracked(state) for state in states)


async def test_bot_escalation_and_no_consumption_when_blocked() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = FixedWindow(rate=100, period=MINUTE, start=0)
    bot = BotCheck("fp", "1.2.3.4", "curl/8", "bot_useragent", "allowed")
    actions = []
    for _ in range(12):
        clock.now += 1_000
        outcome = await store.check([LimitRequest("ip", config, "1.2.3.4")], bot=bot)
        assert outcome.bot is not None
        actions.append(outcome.bot.action)
        assert outcome.ok == (outcome.bot.action == "allowed")
    # Seed rule: more than 5 previous events → challenged, more than 10 → blocked.
    assert actions == ["allowed"] * 5 + ["challenged"] * 5 + ["blocked"] * 2
    # Only the 5 allowed requests consumed the limit.
    assert (await store.peek("ip", config, key="1.2.3.4")).remaining == 95
    events = await store.bot_events(since=0, limit=100)
    assert len(events) == 12
    assert events[0].metadata == {"previousAttempts": 11}  # newest first
    assert await store.count_bot_events("fp", clock.now - 5_500) == 6
    clock.now += 3_600_000  # an hour later the history no longer counts
    outcome = await store.check([], bot=bot)
    assert outcome.bot is not None and outcome.bot.action == "allowed"


async def test_policy_action_is_never_softened_by_history() -> None:
    store = MemoryStore(clock=Clock())
    bot = BotCheck("fp", "ip", "GPTBot/1.0", "ai_scraper", "blocked")
    outcome = await store.check([], bot=bot)
    assert outcome.bot is not None and outcome.bot.action == "blocked" and not outcome.ok


def test_max_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        MemoryStore(max_rows=0)


async def test_a_count_no_waiting_could_admit_is_refused_naming_the_limit() -> None:
    store = MemoryStore(clock=Clock())
    config = TokenBucket(rate=10, period=MINUTE, capacity=5)
    with pytest.raises(ConfigurationError, match=r"exceeds capacity 5.*'tokens'"):
        await store.limit("tokens", config, count=6)
    with pytest.raises(ConfigurationError, match=">= 0"):
        await store.limit("tokens", config, count=-1)
    assert (await store.limit("tokens", config, count=6, reserve=True)).ok  # may queue ahead


async def test_kept_log_rows_cost_the_garbage_collector_nothing() -> None:
    """Rows are kept as plain tuples, which the collector stops tracking: a full collection
    does not walk the 100,000 rows a busy store holds. Read back, they are the rows written."""
    store = MemoryStore(max_rows=3)
    rows = [
        AIRequestLog(
            timestamp=float(i),
            provider="openai",
            model="m",
            fingerprint="f",
            ip="203.0.113.7",
            success=i % 2 == 0,
            latency_ms=1.5,
            tokens_used=i,
        )
        for i in range(5)
    ]
    await store.write_logs(LogBatch(id="b1", ai_requests=rows))
    gc.collect()
    assert not any(gc.is_tracked(values) for values in store._ai_logs._rows)
    assert store.ai_logs == rows[2:]  # the oldest dropped past max_rows
    stats = await store.provider_stats("openai", 0, 10)
    assert (stats.total_requests, stats.total_tokens) == (3, 2 + 3 + 4)


async def test_batch_ids_are_remembered_for_retries_within_a_bound() -> None:
    """A retried batch lands once; the ids kept for that stay bounded on a long-lived store."""
    store = MemoryStore()
    row = AuthFailure(key_hash="h", timestamp=1.0)
    await store.write_logs(LogBatch(id="first", auth_failures=[row]))
    await store.write_logs(LogBatch(id="first", auth_failures=[row]))  # the retry
    assert len(store.auth_failures) == 1
    for n in range(MAX_BATCH_IDS + 50):
        await store.write_logs(LogBatch(id=f"b{n}"))
    assert len(store._batches) == MAX_BATCH_IDS
    await store.write_logs(LogBatch(id=f"b{MAX_BATCH_IDS + 49}", auth_failures=[row]))
    assert len(store.auth_failures) == 1  # a recent id is still known


_CONFIGS: list[LimitConfig] = [
    TokenBucket(rate=3, period=1_000),
    TokenBucket(rate=2, period=MINUTE, capacity=4, max_reserved=3),
    FixedWindow(rate=2, period=2_000, capacity=5, start=0),
    # Aligned windows: a forgotten random-phase window draws a new phase, by design.
    FixedWindow(rate=3, period=1_000, start=500),
]
#: One step: (what, which limit, which key, count, reserve, ms elapsed before). "limit" decides
#: one limit, "pair" decides it with the next limit's state of the same key in one check
#: (both or neither), "reset" forgets the key's state.
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["limit", "limit", "pair", "reset"]),
        st.integers(0, len(_CONFIGS) - 1),
        st.integers(0, 15),
        st.sampled_from([0.0, 1.0, 2.0]),
        st.booleans(),
        st.sampled_from([0, 1, 15, 100, 500, 999, 2_000, 61_000]),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(_STEPS)
async def test_expiry_segments_keep_decisions_and_forget_every_full_state(
    steps: list[tuple[str, int, int, float, bool, int]],
) -> None:
    """Decisions through the expiry queue (new states in segments, reserved ones below zero,
    resets, pairs rolled back on a deny) equal those of a store that never forgets; no state
    is held that the reference does not hold; and once every state is full again, new keys
    drop all of them, however they were queued: states held stay bounded."""
    clock = Clock()
    store = MemoryStore(clock=clock, random=lambda: 0.0)
    kept: dict[tuple[int, str], LimitState] = {}

    for what, index, k, count, reserve, elapsed in steps:
        clock.now += elapsed
        key = f"k{k}"
        if what == "reset":
            await store.reset(f"limit{index}", key=key)
            kept.pop((index, key), None)
            continue
        slots = [index] if what == "limit" else [index, (index + 1) % len(_CONFIGS)]
        before = dict(kept)
        expected = []
        for slot in slots:
            config = _CONFIGS[slot]
            state = kept.get((slot, key)) or config.fresh(clock.now, lambda: 0.0)
            result, new_state = decide(config, state, clock.now, count, reserve)
            expected.append(result)
            if result.ok:
                kept[(slot, key)] = new_state
        if not all(r.ok for r in expected):
            kept = before  # a pair is decided together: a deny keeps nothing
        if what == "limit":
            got = [
                await store.limit(
                    f"limit{index}", _CONFIGS[index], key=key, count=count, reserve=reserve
                )
            ]
        else:
            outcome = await store.check(
                [LimitRequest(f"limit{s}", _CONFIGS[s], key, count, reserve) for s in slots]
            )
            got = list(outcome.results)
        assert [(r.ok, r.remaining, r.reset_after) for r in got] == [
            (r.ok, r.remaining, r.reset_after) for r in expected
        ]
        held = {
            (int(n.removeprefix("limit")), key)
            for n, entry in store._limits.items()
            for key in entry.states
        }
        assert held <= set(kept)
    # Long after everything refilled (even reservations far below zero), one new key per
    # queued state drops them all: each step queued at most two states.
    clock.now += 10**8
    fresh = TokenBucket(rate=3, period=1_000)
    for i in range(2 * len(steps) + 1):
        assert (await store.limit("new", fresh, key=f"new-{i}")).ok
    # (A reset leaves its name's empty entry: one per name, not per key.)
    assert not any(limit.states for name, limit in store._limits.items() if name != "new")
    assert store.limit_keys == 2 * len(steps) + 1


async def test_a_planned_decision_is_the_decision_of_decide_all_with_its_field_numbers() -> None:
    """`decide_planned` admits, refuses and rolls back as `decide_all` does, and answers the
    `RateLimit` numbers: the remaining quota rounded down, the seconds to full rounded up."""
    clock = Clock()
    planned, general = MemoryStore(clock=clock), MemoryStore(clock=clock)
    specs: list[LimitSpec] = [
        ("bucket", TokenBucket(rate=3, period=MINUTE), 1.0, False),
        ("window", FixedWindow(rate=2, period=MINUTE, start=0), 1.0, False),
    ]
    plan = LimitPlan(specs)
    for key in ["a", "a", "b", "a", "a"]:
        clock.now += 7_001
        ok, decisions, numbers, now = planned.decide_planned(plan, [key, None])
        assert (ok, decisions, now) == general.decide_all(specs, [key, None])
        # As the field prints them (`%d`, of ints): the remaining quota rounded down, the
        # seconds up.
        assert all(type(n) is int for n in numbers)
        assert numbers == [
            n
            for _, _, remaining, reset in decisions
            for n in (math.floor(remaining), math.ceil(Fraction(reset) / 1000))
        ]
    assert not ok  # the window's two were spent: the bucket's token given back
    assert planned._limits["bucket"].states == general._limits["bucket"].states


@given(st.floats(min_value=-0.5, max_value=1e15, allow_nan=False))
def test_the_seconds_to_full_are_the_exact_ceiling_of_the_milliseconds(reset: float) -> None:
    """The field's seconds, computed in integers from a decision's milliseconds, are the exact
    ceiling of the quotient (0 for a rounding error below zero), never one rounded first."""
    store = MemoryStore(clock=Clock())
    plan = LimitPlan([("x", FixedWindow(rate=1, period=MINUTE, start=0), 1.0, False)])
    store._resolve(plan)
    (states, _, _, count, reserve, slot) = plan.steps[0]
    verdict = (True, 0.0, 0.0, reset)
    plan.steps = ((states, lambda *_: verdict, lambda *_: verdict, count, reserve, slot),)
    plan.version = store._version
    _, _, numbers, _ = store.decide_planned(plan, ["k"])
    assert numbers[1] == max(0, math.ceil(Fraction(reset) / 1000))


async def test_a_plans_slots_pick_each_limits_key_from_the_callers_values() -> None:
    """With `slots`, each limit decides the key at its slot of the values it is handed, so
    two limits may share a key and a value may serve none; a rollback restores those keys."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    window = FixedWindow(rate=1, period=MINUTE, start=0)
    specs: list[LimitSpec] = [
        ("per-ip", TokenBucket(rate=5, period=MINUTE), 1.0, False),
        ("per-user", window, 1.0, False),
    ]
    plan = LimitPlan(specs, slots=(2, 0))
    assert plan.keys(["u", "unused", "1.2.3.4"]) == ("1.2.3.4", "u")
    assert store.decide_planned(plan, ["u", "unused", "1.2.3.4"])[0]
    assert set(store._limits["per-ip"].states) == {"1.2.3.4"}
    assert set(store._limits["per-user"].states) == {"u"}
    before = store._limits["per-ip"].states["1.2.3.4"]
    assert not store.decide_planned(plan, ["u", "other", "1.2.3.4"])[0]
    assert store._limits["per-ip"].states["1.2.3.4"] == before  # given back
    with pytest.raises(ValueError, match="2 limits need as many slots, not 1"):
        LimitPlan(specs, slots=(0,))
    assert LimitPlan(specs[:1], slots=(1,)).keys(["a", "b"]) == ("b",)
    assert LimitPlan([]).keys(["a"]) == ()


async def test_a_plan_follows_its_limits_when_the_store_drops_or_reconfigures_them() -> None:
    """A plan's entries are kept between calls, yet a limit the expiry queue dropped (all
    its states full) and made again, or decided meanwhile by another config, is decided by
    the store's current entry and the plan's own config."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    config = TokenBucket(rate=10, period=1_000)
    plan = LimitPlan([("ip", config, 1.0, False)])
    assert store.decide_planned(plan, ["k"])[0]
    clock.now += 2_000  # "k" is full again: the next new key's sweep drops it, and "ip"
    await store.limit("other", config, key="new")
    assert "ip" not in store._limits
    ok, decisions, _, _ = store.decide_planned(plan, ["k"])
    assert ok and store._limits["ip"].states["k"][0] == 9.0
    assert store.limit_keys == 2
    wider = TokenBucket(rate=100, period=1_000)
    await store.limit("ip", wider, key="k")  # the same name by another config
    ok, decisions, _, _ = store.decide_planned(plan, ["k"])
    assert ok and decisions[0][2] <= 10.0  # decided by the plan's config, capacity 10
    assert store._limits["ip"].config is config
