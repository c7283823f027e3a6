"""Convex at scale, small: two app instances (uvicorn processes of the example gateway) on the
loopback server with its optimistic-concurrency emulation on, 1,000 requests from 64 clients and
200 addresses. The invariants `benchmarks/convex_scale.py` reports, asserted; no timings."""

from __future__ import annotations

import pytest
from benchmarks.convex_scale import run

INSTANCES = 2


@pytest.mark.slow
def test_instances_share_limits_without_a_hot_document_or_a_failure() -> None:
    result = run(INSTANCES, 1000, occ=True)
    print("\n" + result.summary())
    # No request failed. (The test server may still have answered a conflicting mutation 503
    # after its retries; ConvexStore sends such a mutation again, since it committed nothing.)
    assert result.failed == 0, result.statuses
    # No document every request writes: the most written one takes a twentieth of them at most.
    assert result.writes_per_request <= 0.05, (result.hottest_name, result.hottest)
    # The global limit ran out mid-run and admitted no more than its bound ...
    assert result.admitted <= result.bound
    # ... and no fewer than it holds, less what the other instance's last lease kept unused.
    block = (result.bound - result.global_limit) / INSTANCES
    assert result.admitted >= result.global_limit - INSTANCES * block
    # Every request was answered: admitted, or refused with 429 by a limit.
    for counts in result.statuses.values():
        assert set(counts) <= {200, 429}, counts
    assert sum(sum(c.values()) for c in result.statuses.values()) == result.requests
