"""Properties of reservations and settlements: what is charged is what was reported, and what
a token limit admits exceeds it by no more than the estimates of the requests in flight missed.

Time stands still in these runs (no refill), so the limit's state is exactly what was charged.
"""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from convex_guard import DAY, HOUR, FixedWindow, LimitRequest, MemoryStore, TokenBucket
from convex_guard.stores.base import LogBatch, Settlement

CAP = 1000
CONFIGS = (
    FixedWindow(rate=CAP, period=DAY, start=0),
    TokenBucket(rate=CAP, period=HOUR),
)
NOW = 12 * HOUR  # inside the first day's window; never moves

#: ("reserve", estimate, actual) arrives; ("settle", i) ends the i-th request in flight with
#: its actual usage reported; ("fail", i) ends it failed, nothing reported (refunded).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), st.integers(1, 400), st.integers(0, 600)),
        st.tuples(st.just("settle"), st.integers(0, 20)),
        st.tuples(st.just("fail"), st.integers(0, 20)),
    ),
    max_size=60,
)


class Run:
    def __init__(self, config: FixedWindow | TokenBucket) -> None:
        self.config = config
        self.store = MemoryStore(clock=lambda: NOW)
        self.in_flight: list[tuple[int, int, float]] = []  # (estimate, actual, reserved at)
        self.reported = 0
        self.admitted_actual = 0
        #: The estimate errors (actual - estimate, when positive) of the requests in flight
        #: at the last admission, that one included.
        self.error_at_last_admission = 0

    async def reserve(self, estimate: int, actual: int) -> bool:
        outcome = await self.store.check(
            [LimitRequest("tpm", self.config, "k", estimate, settled=True)]
        )
        if outcome.ok:
            assert outcome.now is not None
            self.in_flight.append((estimate, actual, outcome.now))
            self.admitted_actual += actual
            self.error_at_last_admission = sum(max(0, a - e) for e, a, _ in self.in_flight)
        return outcome.ok

    async def end(self, index: int, failed: bool) -> None:
        estimate, actual, at = self.in_flight.pop(index % len(self.in_flight))
        amount = -estimate if failed else actual - estimate
        if failed:
            self.admitted_actual -= actual  # it did no work (its error stays in the bound)
        else:
            self.reported += actual
        if amount:
            settlement = Settlement("tpm", self.config, "k", amount, at)
            await self.store.write_logs(LogBatch(id=uuid.uuid4().hex, settlements=[settlement]))

    def charged(self) -> float:
        limit = self.store._limits.get("tpm")  # the exact value, a debt included
        state = None if limit is None else limit.states.get("k")
        return 0.0 if state is None else CAP - state[0]


async def _play(config: FixedWindow | TokenBucket, steps: list[tuple[object, ...]]) -> Run:
    run = Run(config)
    for step in steps:
        if step[0] == "reserve":
            await run.reserve(int(step[1]), int(step[2]))  # type: ignore[call-overload]
        elif run.in_flight:
            await run.end(int(step[1]), failed=step[0] == "fail")  # type: ignore[call-overload]
    while run.in_flight:
        await run.end(0, failed=False)
    return run


@settings(max_examples=60, deadline=None)
@given(config=st.sampled_from(CONFIGS), steps=ops)
def test_charged_equals_reported_and_admitted_work_is_bounded(
    config: FixedWindow | TokenBucket, steps: list[tuple[object, ...]]
) -> None:
    run = asyncio.run(_play(config, steps))
    # Every reservation was settled: the limit holds exactly what the requests reported.
    assert run.charged() == run.reported
    # What was admitted fits the limit but for what the estimates of the requests in flight
    # together at the last admission missed.
    assert run.admitted_actual <= CAP + run.error_at_last_admission


@settings(max_examples=40, deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    requests=st.lists(
        st.tuples(st.integers(1, 400), st.integers(0, 600), st.booleans()), max_size=40
    ),
)
def test_one_at_a_time_admitted_work_exceeds_the_limit_by_one_estimate_error_at_most(
    config: FixedWindow | TokenBucket, requests: list[tuple[int, int, bool]]
) -> None:
    async def play() -> tuple[Run, int]:
        run = Run(config)
        worst = 0
        for estimate, actual, failed in requests:
            if await run.reserve(estimate, actual):
                if not failed:
                    worst = max(worst, actual - estimate)
                await run.end(0, failed=failed)
        return run, worst

    run, worst = asyncio.run(play())
    assert run.charged() == run.reported
    assert run.admitted_actual <= CAP + max(worst, 0)
