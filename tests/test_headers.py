"""Reading raw ASGI headers: every value of a name, in arrival order, whatever its case."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from convex_guard._headers import header_value

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
