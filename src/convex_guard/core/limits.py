"""Limit algorithms: the sans-IO core, decided exactly as `@convex-dev/rate-limiter` does."""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from convex_guard.core.errors import ConfigurationError

SECOND = 1000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR


#: A finite number above zero: an infinite rate or period would make every formula NaN.
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]

#: What is stored per (name, key): (tokens left, the epoch ms they were counted at).
#: An immutable tuple of floats: the garbage collector stops tracking it, so a store holding
#: many keys adds nothing to every full collection (a list per key did: 65 ms each at 100,000
#: keys).
LimitState = tuple[float, float]

#: A store's states of one limit name, by key.
States = MutableMapping[str | None, LimitState]

#: One limit's answer as flat numbers: (ok, retry_after, remaining, reset_after), the fields of
#: `LimitResult` in order. Deciders answer this, not a `LimitResult`: a tuple costs no
#: `__init__` call, and a request admitted by every rule only needs the last two numbers (its
#: `RateLimit` field). A `LimitResult` is made from it where one is handed out.
Decision = tuple[bool, float | None, float, float]

#: `decider(states, key, state, now, count, reserve) -> decision`: decides against `state`
#: and, when and only when it admits, stores the new state as `states[key]`. See `decide` for
#: the pure form.
Decider = Callable[[States, str | None, LimitState, float, float, bool], Decision]

#: `first(states, key, now, count, reserve, random) -> decision`: the decider's answer for a
#: key with no state yet, against a new, full one (`fresh(now, random)`), stored as the
#: decider stores it. A full state admits every count the decider does not refuse.
FirstDecider = Callable[[States, str | None, float, float, bool, Callable[[], float]], Decision]


class _LimitBase(BaseModel):
    # Frozen and strict about unknown fields: a typo such as `capcity=5` must fail at start-up,
    # not silently leave the default in force.
    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: _Positive
    period: _Positive
    capacity: _Positive | None = None
    max_reserved: _Positive | None = None
    shards: Annotated[int, Field(ge=1)] | None = None

    @field_validator("period", mode="wrap")
    @classmethod
    def _period_in_ms(cls, value: object, handler: ValidatorFunctionWrapHandler) -> float:
        # Periods are milliseconds, as in the component, so `period=60` meant for a minute
        # would silently be a 60 ms window. A number under one second is refused; a period
        # that short must be asked for explicitly, as a timedelta.
        if isinstance(value, timedelta):
            return float(handler(value.total_seconds() * SECOND))
        period = float(handler(value))
        if period < SECOND:
            raise ValueError(
                f"period is in milliseconds: {value!r} would be a {period:g} ms window. "
                f"Write seconds as {period:g} * SECOND (or MINUTE, HOUR, DAY), or a period "
                f"under one second as timedelta(milliseconds={period:g})"
            )
        return period

    @cached_property
    def max(self) -> float:
        """The most tokens the limit holds: `capacity`, else `rate` (as in the component).

        Cached because it is read on every decision.
        """
        return self.capacity if self.capacity is not None else self.rate

    @cached_property
    def fresh(self) -> Callable[[float, Callable[[], float]], LimitState]:
        """`fresh(now, random)`: a new, full state (see `initial_state`)."""
        return _fresh(self)  # type: ignore[arg-type]

    @cached_property
    def first(self) -> FirstDecider:
        """This config's decision for a new key (see `FirstDecider`), built once."""
        return _first(self)  # type: ignore[arg-type]

    @cached_property
    def decider(self) -> Decider:
        """This config's decision function, built once with its numbers bound as locals."""
        return _compile(self)  # type: ignore[arg-type]

    @cached_property
    def full_at(self) -> Callable[[LimitState], float]:
        """`full_at(state)`: the epoch ms from which a limit in `state` is full again, so the
        state can be forgotten. Built once, as the decider is: a store asks it of every state
        it may forget."""
        return _full_at(self)  # type: ignore[arg-type]

    def to_convex(self) -> dict[str, object]:
        """The component's own config object, so both stores are handed the same numbers."""
        out: dict[str, object] = {
            "kind": self.kind,  # type: ignore[attr-defined]
            "rate": float(self.rate),
            "period": float(self.period),
        }
        if self.capacity is not None:
            out["capacity"] = float(self.capacity)
        if self.max_reserved is not None:
            out["maxReserved"] = float(self.max_reserved)
        if self.shards is not None:
            out["shards"] = float(self.shards)
        return out


class TokenBucket(_LimitBase):
    """Tokens refill continuously at `rate` per `period`, up to `capacity`.

    `period` is milliseconds (`SECOND`, `MINUTE`, `HOUR`, `DAY`) or a `datetime.timedelta`; a
    number under one second (1000) is refused as a likely unit slip, so a shorter period is
    given as a timedelta.
    """

    kind: Literal["token bucket"] = "token bucket"


class FixedWindow(_LimitBase):
    """`rate` tokens are added at the start of each `period` window, up to `capacity`.

    `period` is milliseconds or a `datetime.timedelta`, as for `TokenBucket`.

    Windows are aligned to `start` (epoch ms) when given; otherwise each key's first window
    begins at a random point of the last period, so that keys do not all reset at once.
    """

    kind: Literal["fixed window"] = "fixed window"
    start: float | None = None

    @model_validator(mode="after")
    def _start_is_whole_milliseconds(self) -> FixedWindow:
        # The Convex component turns `start` into a BigInt: a fraction of a millisecond would
        # fail every request there, so it is refused here, on every store alike.
        if self.start is not None and not (
            math.isfinite(self.start) and float(self.start).is_integer()
        ):
            raise ValueError("start must be a finite epoch time in whole milliseconds")
        return self

    def to_convex(self) -> dict[str, object]:
        out = super().to_convex()
        if self.start is not None:
            out["start"] = float(self.start)
        return out


LimitConfig = TokenBucket | FixedWindow


# Not frozen: a frozen dataclass's `__init__` sets each field through `object.__setattr__`, and
# one result is built for every limit of every request. Treat it as read-only all the same.
@dataclass(slots=True)
class LimitResult:
    """The answer to one limit.

    `retry_after` (ms) is set when the call was denied, or admitted against reserved tokens.
    `remaining` and `reset_after` (ms until the limit is full again) feed the `RateLimit`
    header; they are derived from the state, never stored.
    """

    ok: bool
    retry_after: float | None
    remaining: float
    reset_after: float

    @property
    def decision(self) -> Decision:
        """The same answer as the flat numbers deciders give (see `Decision`)."""
        return (self.ok, self.retry_after, self.remaining, self.reset_after)


def check_count(name: str | None, config: LimitConfig, count: float, reserve: bool) -> None:
    """Reject a request that no amount of waiting could satisfy, as the component does.

    A silent deny would retry forever; a raise surfaces the misconfiguration at once. Every
    decider runs this for a count outside [0, capacity], so no store can skip it. With 3 or
    more `shards` the component decides one call on (at most) two shards, so a call may count
    at most `capacity / (shards / 2)` (its `validateRequest`): a larger count would make every
    request on Convex throw, so it is rejected here, at start-up, on every store alike.
    """
    limit = f"Rate limit {name!r}" if name else "Rate limit"
    if not math.isfinite(count) or (count < 0 and not reserve):
        # A negative count hands tokens back (the component's refund). Only a settlement
        # asks for one, with `reserve`; a request's own count (a rule's) is never negative.
        raise ConfigurationError(f"{limit}: count must be a finite number >= 0")
    factor = shard_factor(config)
    cap = config.max / factor
    per = f" per call over {config.shards} shards" if factor > 1 else ""
    if reserve:
        if config.max_reserved is not None and count > cap + config.max_reserved / factor:
            raise ConfigurationError(
                f"{limit}: count {count:g} exceeds capacity plus max_reserved "
                f"({cap + config.max_reserved / factor:g}{per}); it could never be admitted"
            )
    elif count > cap:
        hint = "use fewer shards" if factor > 1 else "use reserve=True to queue ahead"
        raise ConfigurationError(
            f"{limit}: count {count:g} exceeds capacity {cap:g}{per}; "
            f"it could never be admitted ({hint})"
        )


def shard_factor(config: LimitConfig) -> float:
    """What the component divides capacity by for one call: `shards / 2` from 3 shards on."""
    shards = config.shards or 1
    return shards / 2 if shards >= 3 else 1.0


def initial_state(config: LimitConfig, now: float, random: Callable[[], float]) -> LimitState:
    """A full limit; a fixed window's phase is `start` or a random point of the last period."""
    return config.fresh(now, random)


def _fresh(config: LimitConfig) -> Callable[[float, Callable[[], float]], LimitState]:
    # Built once per config, like the decider: a store creates a state for every new key.
    cap = config.max
    if config.kind == "token bucket":
        return lambda now, random: (cap, now)
    start = config.start
    if start is not None:
        return lambda now, random: (cap, start)
    period = config.period
    return lambda now, random: (cap, now - random() * period)


def _first(config: LimitConfig) -> FirstDecider:
    # A store creates a state for every new key: this spares it building the full state and
    # reading it back. The arithmetic is the decider's on `fresh(now, random)`, term for term
    # (so the numbers are the same to the last bit); any other count goes to the decider.
    # A request's own count is 1 unless it says otherwise, and what that count leaves of a full
    # limit is the same for every key: it is worked out here, once, not per new key.
    cap = config.max
    rate = config.rate
    period = config.period
    decider = config.decider
    ceil = math.ceil
    one_fits = cap >= 1.0
    one_left = cap - 1.0
    if config.kind == "token bucket":
        per_ms = rate / period
        # What every new key is answered for a count of 1: nothing refills in no time.
        one_answer: Decision = (True, None, one_left, (cap - one_left) / per_ms)

        def token_bucket(
            states: States,
            key: str | None,
            now: float,
            count: float,
            reserve: bool,
            random: Callable[[], float],
        ) -> Decision:
            if count == 1.0 and one_fits:
                states[key] = (one_left, now)
                return one_answer
            if not 0.0 <= count <= cap:
                return decider(states, key, (cap, now), now, count, reserve)
            value = cap - count  # nothing refills in no time: `available` is `cap`
            states[key] = (value, now)
            return (True, None, value, (cap - value) / per_ms)

        return token_bucket
    start = config.start
    if start is not None:  # an aligned window may start after `now`: the decider's own case
        return lambda states, key, now, count, reserve, random: decider(
            states, key, (cap, start), now, count, reserve
        )
    # How long a count of 1 keeps a new window from full, from the window's start.
    one_span = period * ceil((cap - one_left) / rate) if one_left < cap else 0.0

    def fixed_window(
        states: States,
        key: str | None,
        now: float,
        count: float,
        reserve: bool,
        random: Callable[[], float],
    ) -> Decision:
        ts = now - random() * period
        if count == 1.0 and one_fits:
            value, span = one_left, one_span
        elif 0.0 <= count <= cap:
            value = cap - count
            span = period * ceil((cap - value) / rate) if value < cap else 0.0
        else:
            return decider(states, key, (cap, ts), now, count, reserve)
        # The phase is in [0, 1), so `now` is in the drawn window, unless rounding puts it on
        # the next one's start (the decider's `windows`, then 1).
        if now - ts >= period:
            ts += ((now - ts) // period) * period
        states[key] = (value, ts)
        # `available` is `cap` in any window: no token was taken yet.
        return (True, None, value, ts + span - now if value < cap else 0.0)

    return fixed_window


def decide(
    config: LimitConfig,
    state: LimitState,
    now: float,
    count: float = 1.0,
    reserve: bool = False,
) -> tuple[LimitResult, LimitState]:
    """Decide one request against one limit (`calculateRateLimit` + `_checkRateLimitInternal`).

    Returns the result and the state to store; on denial that is the state passed in, since a
    denied call consumes nothing. A negative `count` with `reserve` hands tokens back, as the
    component takes it: the value may stand above capacity until the next decision cuts it.
    Pure: stores call `config.decider` with their own mapping instead, which saves building a
    pair for every request.
    """
    box: dict[str | None, LimitState] = {}
    decision = config.decider(box, None, state, now, count, reserve)
    return LimitResult(*decision), box.get(None, state)


def _compile(config: LimitConfig) -> Decider:
    # One closure per config, with its numbers as closure locals: this runs for every limit of
    # every request, and reading fields off the model costs more than the arithmetic. The
    # closure stores the new state under its key when, and only when, it admits.
    cap = config.max
    rate = config.rate
    period = config.period
    max_reserved = config.max_reserved
    ceil = math.ceil

    def over(
        states: States,
        key: str | None,
        available: float,
        value: float,
        ts: float,
        now: float,
        retry: float,
    ) -> Decision:
        """Below zero: admitted against reserved tokens, or denied."""
        if reserve_ok(value):
            states[key] = (value, ts)
            return (True, retry, 0.0, _until_full(config, value, ts, now))
        # Denied: report what the caller still has, the tokens available before this count.
        still = available if available > 0 else 0.0
        return (False, retry, still, _until_full(config, still, ts, now))

    def reserve_ok(value: float) -> bool:
        return max_reserved is None or -value <= max_reserved

    if config.kind == "token bucket":
        per_ms = rate / period

        def token_bucket(
            states: States,
            key: str | None,
            state: LimitState,
            now: float,
            count: float,
            reserve: bool,
        ) -> Decision:
            if not 0.0 <= count <= cap:
                check_count(None, config, count, reserve)
            value, ts = state
            available = value + (now - ts) * per_ms
            if available > cap:
                available = cap
            value = available - count
            if value >= 0.0:
                states[key] = (value, now)
                return (True, None, value, (cap - value) / per_ms)
            if reserve:
                return over(states, key, available, value, now, now, -value / per_ms)
            still = available if available > 0 else 0.0
            return (False, -value / per_ms, still, (cap - still) / per_ms)

        return token_bucket

    def fixed_window(
        states: States, key: str | None, state: LimitState, now: float, count: float, reserve: bool
    ) -> Decision:
        if not 0.0 <= count <= cap:
            check_count(None, config, count, reserve)
        available, ts = state
        if not 0.0 <= now - ts < period:  # another window (most calls fall in the same one)
            windows = (now - ts) // period
            available += rate * windows
            ts += windows * period
        if available > cap:
            available = cap
        value = available - count
        if value >= 0.0:
            states[key] = (value, ts)
            missing = cap - value
            if missing <= rate:  # one window's tokens fill it (the usual case): no division
                return (True, None, value, ts + period - now if missing > 0.0 else 0.0)
            return (True, None, value, ts + period * ceil(missing / rate) - now)
        retry = ts + period * ceil(-value / rate) - now
        if reserve:
            return over(states, key, available, value, ts, now, retry)
        still = available if available > 0 else 0.0
        return (False, retry, still, _until_full(config, still, ts, now))

    return fixed_window


def _until_full(config: LimitConfig, value: float, ts: float, now: float) -> float:
    """Milliseconds until a limit holding `value` at `ts` is full again (the header's `t`)."""
    missing = config.max - value
    if missing <= 0:
        return 0.0
    if config.kind == "token bucket":
        return missing * config.period / config.rate
    return ts + config.period * math.ceil(missing / config.rate) - now


def full_at(config: LimitConfig, state: LimitState) -> float:
    """The epoch ms from which the limit is full again, so its state can be forgotten."""
    return config.full_at(state)


def _full_at(config: LimitConfig) -> Callable[[LimitState], float]:
    # `_until_full` from the state's own time, with the config's numbers bound as locals.
    cap = config.max
    rate = config.rate
    period = config.period
    if config.kind == "token bucket":

        def token_bucket(state: LimitState) -> float:
            value, ts = state
            missing = cap - value
            return ts + missing * period / rate if missing > 0.0 else ts

        return token_bucket
    ceil = math.ceil

    def fixed_window(state: LimitState) -> float:
        value, ts = state
        missing = cap - value
        if missing <= rate:  # one window's tokens fill it (the usual case): no division
            return ts + period if missing > 0.0 else ts
        return ts + period * ceil(missing / rate)

    return fixed_window


def refund_applies(config: LimitConfig, state: LimitState | None, now: float, since: float) -> bool:
    """Whether tokens taken at `since` (epoch ms) may still go back to a limit in `state`.

    Never to a state that is gone (a full limit: they would be cut at capacity anyway), and
    for a fixed window only within the window they were taken in: a past window's tokens are
    gone for everyone, and handing them to a later window would let it admit more than its
    rate. A token bucket takes them back at any time (its next decision caps it).
    """
    if state is None:
        return False
    if config.kind == "token bucket":
        return True
    ts = state[1]
    window = ts + ((now - ts) // config.period) * config.period
    return since >= window
