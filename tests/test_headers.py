"""Raw ASGI headers: reading every value of a name, and writing the IETF `RateLimit` field."""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from convex_guard import LimitResult
from convex_guard.core.headers import header_value
from convex_guard.middleware.rules import ratelimit_field, ratelimit_template

names = st.sampled_from([b"user-agent", b"User-Agent", b"USER-AGENT", b"accept", b"x-api-key"])
headers = st.lists(st.tuples(names, st.binary(max_size=40)), max_size=8)


@given(headers=headers)
def test_header_value_joins_every_value_of_the_name_in_order(
    headers: list[tuple[bytes, bytes]],
) -> None:
    values = [value for name, value in headers if name.lower() == b"user-agent"]
    expected = b", ".join(values).decode("latin-1") if values else None
    assert header_value(headers, b"user-agent") == expected


def test_header_value_of_a_missing_or_repeated_header() -> None:
    assert header_value([(b"accept", b"*/*")], b"user-agent") is None
    repeated = [(b"user-agent", b"a"), (b"accept", b"*/*"), (b"User-Agent", b"\xff")]
    assert header_value(repeated, b"user-agent") == "a, \xff"


amounts = st.floats(min_value=0, max_value=1e12, allow_nan=False)
policy_names = st.text(
    st.characters(min_codepoint=32, max_codepoint=255, exclude_characters='"\\'), min_size=1
)


@given(items=st.lists(st.tuples(policy_names, amounts, amounts), min_size=1, max_size=4))
def test_ratelimit_field_floors_remaining_and_ceils_seconds(
    items: list[tuple[str, float, float]],
) -> None:
    # Written out item by item, as the draft defines it: r rounded down, t in whole seconds
    # rounded up, computed exactly (a float division would round 5e-324 ms down to 0 s).
    # Names may hold "%", which the template must keep literal.
    expected = ", ".join(
        f'"{name}";r={math.floor(remaining)};t={math.ceil(Fraction(reset) / 1000)}'
        for name, remaining, reset in items
    )
    results = [LimitResult(True, None, remaining, reset) for _, remaining, reset in items]
    template = ratelimit_template([name for name, _, _ in items])
    assert ratelimit_field(template, [r.decision for r in results]) == expected.encode("latin-1")


def test_ratelimit_field_of_a_spent_limit() -> None:
    spent = LimitResult(False, 1500.0, 0.0, 1500.0)
    fresh = LimitResult(True, None, 10.0, 0.0)
    field = ratelimit_field(ratelimit_template(["a%d", "b"]), [spent.decision, fresh.decision])
    assert field == b'"a%d";r=0;t=2, "b";r=10;t=0'
