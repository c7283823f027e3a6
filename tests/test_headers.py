"""Raw ASGI headers: reading every value of a name, the one pass the checks share, and writing
the IETF `RateLimit` field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from convex_guard import LimitResult
from convex_guard.core.fingerprint import DEFAULT_FIELDS, canonical_form
from convex_guard.core.headers import (
    AGENT_CACHE_SIZE,
    LONG_AGENT_CACHE_SIZE,
    HeaderReader,
    header_reader,
    header_value,
)
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


# -- the one pass over a request's headers ------------------------------------------------------

read_names = st.sampled_from(
    [
        b"user-agent",
        b"User-Agent",
        b"authorization",
        b"AUTHORIZATION",
        b"x-api-key",
        b"X-Api-Key",
        b"content-length",
        b"Content-Type",
        b"content-type",
        b"transfer-encoding",
        b"signature-input",
        b"Signature-Input",
        b"accept",
        b"Accept-Language",
        b"dnt",
        b"host",
        b"\xff",
    ]
)
request_headers = st.lists(
    st.tuples(read_names, st.binary(max_size=24) | st.sampled_from([b"", b" a ", b"\x00\xff"])),
    max_size=10,
)


def every_value(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes] | None:
    """What a check reading the header on its own would see: every value of `name`, in order."""
    values = [value for key, value in headers if key.lower() == name]
    return values or None


@given(headers=request_headers)
def test_one_pass_reads_what_a_pass_per_check_would(headers: list[tuple[bytes, bytes]]) -> None:
    found = header_reader(DEFAULT_FIELDS).read(headers)
    # Each check's own pass, written out plainly.
    assert found.fingerprint_form == reference_canonical_form(headers, DEFAULT_FIELDS)
    assert found.user_agent == (header_value(headers, b"user-agent") or "")
    assert found.authorization == every_value(headers, b"authorization")
    assert found.api_key == every_value(headers, b"x-api-key")
    assert found.content_length == every_value(headers, b"content-length")
    types = every_value(headers, b"content-type")
    assert found.content_type == (types[-1] if types else None)
    assert found.chunked == (every_value(headers, b"transfer-encoding") is not None)
    assert found.signed == (every_value(headers, b"signature-input") is not None)


@given(headers=request_headers, fields=st.lists(read_names, min_size=1, max_size=4))
def test_the_canonical_form_of_any_field_list_is_the_one_pass_s(
    headers: list[tuple[bytes, bytes]], fields: list[bytes]
) -> None:
    assert canonical_form(headers, fields) == reference_canonical_form(headers, fields)


def test_a_field_list_of_no_names_has_an_empty_canonical_form() -> None:
    """The form is its pieces joined: with no field there is no piece, not a lone line end."""
    headers = [(b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*")]
    assert canonical_form(headers, ()) == b""
    assert HeaderReader(()).read(headers).user_agent == "Mozilla/5.0"


def reference_canonical_form(headers: list[tuple[bytes, bytes]], fields: Sequence[bytes]) -> bytes:
    """`canonical_form` as its docstring states it: a line per field, values stripped and
    joined in arrival order (a field listed twice holds its values in its last place)."""
    lowered = [name.lower() for name in fields]
    last = {name: position for position, name in enumerate(lowered)}
    lines = []
    for position, name in enumerate(lowered):
        value = b""
        if last[name] == position:
            for key, raw in headers:
                if key.lower() == name:
                    value = value + b", " + raw.strip() if value else raw.strip()
        lines.append(name + b":" + value + b"\n")
    return b"".join(lines)


def test_a_repeated_user_agent_is_one_text_object_long_or_short() -> None:
    """Its hash is kept on the object: every cache keyed by it hashes it once, not per request."""
    reader = HeaderReader(DEFAULT_FIELDS)
    for agent in (b"Mozilla/5.0 short", b"Mozilla/5.0 " + b"x" * 8192):
        first = reader.read([(b"user-agent", bytes(agent))]).user_agent
        again = reader.read([(b"user-agent", bytes(bytearray(agent)))]).user_agent
        assert first == agent.decode("latin-1") and again is first
    # Two long agents alike at both ends but not in the middle never share a text.
    padded = b"A" * 100 + b"b" + b"A" * 400
    other = b"A" * 100 + b"c" + b"A" * 400
    assert reader.read([(b"user-agent", padded)]).user_agent == padded.decode()
    assert reader.read([(b"user-agent", other)]).user_agent == other.decode()


def test_the_agent_cache_stays_bounded() -> None:
    reader = HeaderReader(DEFAULT_FIELDS)
    for number in range(AGENT_CACHE_SIZE + 10):
        reader.read([(b"user-agent", b"agent %d" % number)])
    for number in range(LONG_AGENT_CACHE_SIZE + 10):
        reader.read([(b"user-agent", b"agent %d " % number + b"x" * 300)])
    assert reader.read([(b"user-agent", b"agent 1")]).user_agent == "agent 1"
    assert len(reader._agents) <= AGENT_CACHE_SIZE
    assert len(reader._long_agents) <= LONG_AGENT_CACHE_SIZE


def test_a_repeated_header_set_is_read_once_and_only_when_the_form_is_all_it_holds() -> None:
    reader = HeaderReader(DEFAULT_FIELDS)
    browser = [(b"user-agent", b"Mozilla/5.0"), (b"accept", b"*/*"), (b"host", b"a")]
    first = reader.read(list(browser))
    assert reader.read([(name, bytes(value)) for name, value in browser]) is first
    # Credentials, or an agent the form holds stripped, are not in the form: read each time.
    keyed = reader.read([*browser, (b"x-api-key", b"k1")])
    assert keyed is not first and keyed.api_key == [b"k1"]
    assert reader.read([*browser, (b"x-api-key", b"k2")]).api_key == [b"k2"]
    spaced = reader.read([(b"user-agent", b" Mozilla/5.0 "), (b"accept", b"*/*")])
    assert spaced.fingerprint == first.fingerprint and spaced.user_agent == " Mozilla/5.0 "
    # Long forms alike at both ends but not in the middle are told apart.
    padded = b"A" * 700 + b"b" + b"A" * 700
    other = b"A" * 700 + b"c" + b"A" * 700
    one = reader.read([(b"user-agent", padded)])
    two = reader.read([(b"user-agent", other)])
    assert one.user_agent == padded.decode() and two.user_agent == other.decode()
    assert one.fingerprint != two.fingerprint
    # The later one took their shared slot: kept, while the first is read again, alike.
    assert reader.read([(b"user-agent", bytes(bytearray(other)))]) is two
    again = reader.read([(b"user-agent", bytes(bytearray(padded)))])
    assert again.fingerprint == one.fingerprint and again.user_agent == one.user_agent
