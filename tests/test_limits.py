"""Hand-worked cases of both algorithms, checked against the component's formulas by hand."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from pydantic import ValidationError

from convex_guard import (
    DAY,
    HOUR,
    MINUTE,
    SECOND,
    ConfigurationError,
    FixedWindow,
    Rule,
    TokenBucket,
)
from convex_guard.core.limits import check_count, decide, full_at, initial_state


def test_units_are_milliseconds() -> None:
    assert (SECOND, MINUTE, HOUR, DAY) == (1000, 60_000, 3_600_000, 86_400_000)


# -- token bucket ----------------------------------------------------------------------------


def test_token_bucket_starts_full_and_consumes() -> None:
    config = TokenBucket(rate=10, period=MINUTE)  # capacity defaults to rate
    state = initial_state(config, 0.0, lambda: 0.0)
    assert state == (10, 0.0)
    result, state = decide(config, state, 0.0, count=3)
    assert result.ok and result.retry_after is None
    assert state == (7, 0.0)
    assert result.remaining == 7
    # 3 tokens missing at 10/min: full again in 18 s.
    assert result.reset_after == pytest.approx(18_000)


def test_token_bucket_refills_continuously_up_to_capacity() -> None:
    config = TokenBucket(rate=10, period=MINUTE, capacity=12)
    _, state = decide(config, (0.0, 0.0), 6_000, count=0)  # 6 s at 1 token / 6 s
    assert state[0] == pytest.approx(1.0)
    _, state = decide(config, (0.0, 0.0), 10 * MINUTE, count=0)
    assert state[0] == 12  # capped


def test_token_bucket_denial_reports_retry_and_keeps_state() -> None:
    config = TokenBucket(rate=10, period=MINUTE)
    state = (0.5, 1_000.0)
    result, after = decide(config, state, 1_000.0, count=1)
    assert not result.ok
    # Missing 0.5 tokens at 1 token per 6,000 ms.
    assert result.retry_after == pytest.approx(3_000)
    assert after is state
    assert result.remaining == 0.5


def test_token_bucket_reserve_without_max_reserved_goes_negative() -> None:
    config = TokenBucket(rate=10, period=MINUTE)
    result, state = decide(config, (0.0, 0.0), 0.0, count=5, reserve=True)
    assert result.ok
    assert result.retry_after == pytest.approx(30_000)  # 5 tokens at 6 s each
    assert state == (-5, 0.0)
    # The next caller waits behind the reservation.
    result, _ = decide(config, state, 0.0, count=1)
    assert not result.ok and result.retry_after == pytest.approx(36_000)


def test_token_bucket_reserve_respects_max_reserved() -> None:
    config = TokenBucket(rate=10, period=MINUTE, max_reserved=4)
    ok, state = decide(config, (0.0, 0.0), 0.0, count=4, reserve=True)
    assert ok.ok and state[0] == -4
    too_far, after = decide(config, state, 0.0, count=1, reserve=True)
    assert not too_far.ok
    assert too_far.retry_after == pytest.approx(30_000)
    assert after is state


# -- fixed window ----------------------------------------------------------------------------


def test_fixed_window_counts_within_window_and_rolls_over() -> None:
    config = FixedWindow(rate=3, period=MINUTE, start=0)
    state = initial_state(config, 5_000.0, lambda: 0.5)
    assert state == (3, 0)  # start given: no jitter
    for expected in (2, 1, 0):
        result, state = decide(config, state, 10_000.0)
        assert result.ok and state[0] == expected
    result, after = decide(config, state, 59_999.0)
    assert not result.ok
    assert result.retry_after == pytest.approx(1.0)  # the next window starts at 60,000
    assert after is state
    result, state = decide(config, state, 60_000.0)
    assert result.ok and state == (2, 60_000)


def test_fixed_window_adds_rate_per_elapsed_window_up_to_capacity() -> None:
    config = FixedWindow(rate=2, period=SECOND, capacity=5, start=0)
    _, state = decide(config, (0.0, 0.0), 1_500.0, count=0)
    assert state == (2, 1_000)
    _, state = decide(config, (0.0, 0.0), 10_000.0, count=0)
    assert state == (5, 10_000)


def test_fixed_window_retry_counts_the_windows_needed() -> None:
    config = FixedWindow(rate=2, period=SECOND, capacity=10, start=0)
    result, _ = decide(config, (0.0, 0.0), 250.0, count=5)
    # 5 missing at 2 per window: ceil(5/2) = 3 windows from 0, minus the 250 ms elapsed.
    assert not result.ok
    assert result.retry_after == pytest.approx(2_750)


def test_fixed_window_jitter_uses_injected_random() -> None:
    config = FixedWindow(rate=5, period=MINUTE)
    assert initial_state(config, 100_000.0, lambda: 0.25) == (5, 100_000 - 15_000)


def test_fixed_window_reserve() -> None:
    config = FixedWindow(rate=2, period=SECOND, start=0, max_reserved=3)
    result, state = decide(config, (0.0, 0.0), 100.0, count=3, reserve=True)
    assert result.ok
    assert result.retry_after == pytest.approx(1_900)  # ceil(3/2) windows → 2,000 - 100
    assert state == (-3, 0)
    result, _ = decide(config, state, 100.0, count=1, reserve=True)
    assert not result.ok


def test_full_at_tells_when_state_can_be_forgotten() -> None:
    bucket = TokenBucket(rate=10, period=MINUTE)
    assert full_at(bucket, (4.0, 1_000.0)) == pytest.approx(1_000 + 6 * 6_000)
    window = FixedWindow(rate=2, period=SECOND, capacity=5)
    assert full_at(window, (0.0, 0.0)) == 3_000  # ceil(5/2) windows
    assert full_at(window, (5.0, 7.0)) == 7.0
    # Missing no more than one window's tokens: full at the next window, however few.
    assert full_at(window, (3.0, 7.0)) == 1_007.0
    assert full_at(window, (4.5, 7.0)) == 1_007.0
    assert full_at(window, (2.5, 7.0)) == 2_007.0  # 2.5 missing: two windows
    assert full_at(window, (-1.0, 7.0)) == 3_007.0  # reserved below zero: ceil(6/2)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate": 0, "period": SECOND}, "rate"),
        ({"rate": -1, "period": SECOND}, "rate"),
        ({"rate": 1, "period": 0}, "period"),
        ({"rate": 1, "period": math.inf}, "period"),
        ({"rate": 30, "period": 60}, "period"),  # meant as a minute: a 60 ms window
        ({"rate": math.nan, "period": SECOND}, "rate"),
        ({"rate": 1, "period": SECOND, "capacity": 0}, "capacity"),
        ({"rate": 1, "period": SECOND, "max_reserved": -2}, "max_reserved"),
        ({"rate": 1, "period": SECOND, "shards": 0}, "shards"),
        ({"rate": 1, "period": SECOND, "capcity": 3}, "capcity"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, float], field: str) -> None:
    for kind in (TokenBucket, FixedWindow):
        with pytest.raises(ValidationError) as info:
            kind(**kwargs)
        assert field in str(info.value)


@pytest.mark.parametrize("kind", [TokenBucket, FixedWindow])
def test_a_period_under_a_second_must_be_a_timedelta(kind: type[TokenBucket | FixedWindow]) -> None:
    with pytest.raises(ValidationError, match=r"timedelta\(milliseconds=60\)"):
        kind(rate=30, period=60)
    with pytest.raises(ValidationError, match="period"):
        kind(rate=30, period=999.5)
    assert kind(rate=30, period=timedelta(milliseconds=60)).period == 60.0
    assert kind(rate=30, period=SECOND).period == 1_000.0
    assert kind(rate=30, period=1_500).period == 1_500.0  # a second or more: taken as ms


@pytest.mark.parametrize("kind", [TokenBucket, FixedWindow])
def test_a_timedelta_period_is_milliseconds_everywhere(
    kind: type[TokenBucket | FixedWindow],
) -> None:
    assert kind(rate=30, period=timedelta(minutes=1)) == kind(rate=30, period=MINUTE)
    assert kind(rate=1, period=timedelta(hours=2)).to_convex()["period"] == 2 * HOUR
    for bad in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValidationError, match="period"):
            kind(rate=1, period=bad)


@pytest.mark.parametrize("start", [math.inf, math.nan, 1_796_182_520_705.5])
def test_fixed_window_start_must_be_finite_whole_milliseconds(start: float) -> None:
    with pytest.raises(ValidationError, match="whole milliseconds"):
        FixedWindow(rate=1, period=SECOND, start=start)
    assert FixedWindow(rate=1, period=SECOND, start=1_796_182_520_705.0).start is not None


def test_configs_are_immutable() -> None:
    config = TokenBucket(rate=1, period=SECOND)
    with pytest.raises(ValidationError):
        config.rate = 5  # type: ignore[misc]


def test_count_over_capacity_is_a_configuration_error() -> None:
    config = TokenBucket(rate=10, period=MINUTE, capacity=5)
    with pytest.raises(ConfigurationError, match="exceeds capacity 5"):
        check_count("x", config, 6, reserve=False)
    check_count("x", config, 6, reserve=True)  # no max_reserved: may queue any amount
    reserved = TokenBucket(rate=10, period=MINUTE, capacity=5, max_reserved=2)
    check_count("x", reserved, 7, reserve=True)
    with pytest.raises(ConfigurationError, match="max_reserved"):
        check_count("x", reserved, 7.5, reserve=True)
    with pytest.raises(ConfigurationError, match=">= 0"):
        check_count("x", config, -1, reserve=False)


def test_to_convex_matches_the_component_validator_fields() -> None:
    config = FixedWindow(rate=5, period=MINUTE, capacity=7, max_reserved=2, shards=3, start=10)
    assert config.to_convex() == {
        "kind": "fixed window",
        "rate": 5.0,
        "period": 60_000.0,
        "capacity": 7.0,
        "maxReserved": 2.0,
        "shards": 3.0,
        "start": 10.0,
    }
    assert TokenBucket(rate=1, period=timedelta(milliseconds=2)).to_convex() == {
        "kind": "token bucket",
        "rate": 1.0,
        "period": 2.0,
    }


@pytest.mark.parametrize(
    "config", [TokenBucket(rate=10, period=SECOND), FixedWindow(rate=10, period=SECOND, start=0)]
)
def test_an_admitted_result_reports_remaining_and_time_to_full(
    config: TokenBucket | FixedWindow,
) -> None:
    state = initial_state(config, 0.0, lambda: 0.0)
    result, _ = decide(config, state, 250.0, count=3)
    assert result.ok
    assert result.retry_after is None
    assert result.remaining == pytest.approx(7)
    # A bucket refills the 3 tokens in 300 ms; a window refills at its end, 750 ms away.
    expected_reset = 300.0 if isinstance(config, TokenBucket) else 750.0
    assert result.reset_after == pytest.approx(expected_reset)


def test_a_constant_rule_cost_is_kept_as_a_float() -> None:
    rule = Rule("r", FixedWindow(rate=10, period=SECOND), count=2)
    assert type(rule.count) is float and rule.count == 2.0
    assert rule.fixed_request is not None and type(rule.fixed_request.count) is float
