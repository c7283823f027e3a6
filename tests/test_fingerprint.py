"""Fingerprint: canonical form, order/case independence, and bytes that never raise."""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from convex_guard import FingerprintMiddleware
from convex_guard.core.fingerprint import DEFAULT_FIELDS, canonical_form, fingerprint
from convex_guard.middleware.context import GuardContext

BROWSER = [
    (b"host", b"example.com"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0"),
    (b"accept", b"text/html"),
    (b"accept-language", b"en-GB,en;q=0.5"),
    (b"accept-encoding", b"gzip, br"),
    (b"dnt", b"1"),
    (b"cookie", b"session=abc"),
]


def test_is_sixteen_hex_of_xxh3_64_over_the_canonical_form() -> None:
    digest = fingerprint(BROWSER)
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    assert digest == xxhash.xxh3_64(canonical_form(BROWSER)).hexdigest()
    assert canonical_form(BROWSER) == (
        b"user-agent:Mozilla/5.0 (X11; Linux x86_64) Firefox/125.0\n"
        b"accept-language:en-GB,en;q=0.5\n"
        b"accept-encoding:gzip, br\n"
        b"accept:text/html\n"
        b"dnt:1\n"
    )


def test_unrelated_headers_do_not_matter_and_fields_do() -> None:
    assert fingerprint(BROWSER) == fingerprint([*BROWSER, (b"x-request-id", b"42")])
    assert fingerprint(BROWSER) != fingerprint([*BROWSER[:-2], (b"dnt", b"0")])
    # A value moved to another field is a different client.
    assert fingerprint([(b"accept", b"x")]) != fingerprint([(b"dnt", b"x")])


def test_whitespace_duplicates_and_missing_fields() -> None:
    assert fingerprint([(b"user-agent", b"  ua \t")]) == fingerprint([(b"user-agent", b"ua")])
    joined = [(b"accept", b"a, b")]
    assert fingerprint([(b"accept", b"a"), (b"accept", b"b")]) == fingerprint(joined)
    assert fingerprint([(b"accept", b"b"), (b"accept", b"a")]) != fingerprint(joined)
    assert (
        fingerprint([])
        == xxhash.xxh3_64(b"".join(name + b":\n" for name in DEFAULT_FIELDS)).hexdigest()
    )


def test_configured_fields() -> None:
    fields = [b"X-Client", b"user-agent"]
    headers = [(b"x-client", b"app"), (b"user-agent", b"ua"), (b"accept", b"anything")]
    assert canonical_form(headers, fields) == b"x-client:app\nuser-agent:ua\n"
    assert fingerprint(headers, fields) != fingerprint(headers)


field_names = st.sampled_from([*DEFAULT_FIELDS, b"host", b"cookie", b"x-forwarded-for"])
header_lists = st.lists(st.tuples(field_names, st.binary(max_size=40)), max_size=12)


def distinct_fields(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    seen: dict[bytes, bytes] = {}
    for name, value in headers:
        seen.setdefault(name, value)
    return list(seen.items())


@given(header_lists, st.randoms(use_true_random=False), st.lists(st.booleans(), min_size=12))
def test_order_and_name_case_do_not_matter(
    headers: list[tuple[bytes, bytes]], rng: random.Random, upper: list[bool]
) -> None:
    headers = distinct_fields(headers)  # repeated fields keep their relative order by design
    shuffled = list(headers)
    rng.shuffle(shuffled)
    recased = [(n.upper() if u else n, v) for (n, v), u in zip(shuffled, upper, strict=False)]
    assert fingerprint(recased) == fingerprint(headers)


@given(st.lists(st.tuples(st.binary(max_size=30), st.binary(max_size=200)), max_size=20))
def test_any_bytes_never_raise(headers: list[tuple[bytes, bytes]]) -> None:
    assert len(fingerprint(headers)) == 16
    assert len(fingerprint(headers, [b"\xff", b""])) == 16


@pytest.mark.parametrize("client", [None, ("", 0), (None, 0)])
def test_a_request_without_a_usable_peer_is_the_unknown_client(client: Any) -> None:
    ctx = GuardContext()
    scope = {"headers": [], "client": client}
    FingerprintMiddleware(None).before(scope, None, ctx)  # type: ignore[arg-type]
    assert (ctx.client_ip, ctx.client_key) == ("unknown", "unknown")
    assert ctx.fingerprint and ctx.user_agent == ""
