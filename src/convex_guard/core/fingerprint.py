"""Request fingerprint (sans-IO): an xxh3-64 hash of a canonical form of identifying headers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Final

import xxhash

__all__ = ["DEFAULT_FIELDS", "canonical_form", "fingerprint"]

# The seed's fields: what a browser sends on every request and a script rarely bothers to vary.
DEFAULT_FIELDS: Final[tuple[bytes, ...]] = (
    b"user-agent",
    b"accept-language",
    b"accept-encoding",
    b"accept",
    b"dnt",
)


@lru_cache(maxsize=64)
def _layout(fields: tuple[bytes, ...]) -> tuple[dict[bytes, int], tuple[bytes, ...]]:
    # Built once per configured field list, not per request: where each field's value goes in
    # the output, and the output with every value empty (b"name:" then b"" then b"\n" ...).
    index = {name.lower(): 3 * position + 1 for position, name in enumerate(fields)}
    template: list[bytes] = []
    for name in fields:
        template += [name.lower() + b":", b"", b"\n"]
    return index, tuple(template)


_DEFAULT_LAYOUT: Final = _layout(DEFAULT_FIELDS)


def canonical_form(
    headers: Sequence[tuple[bytes, bytes]], fields: Sequence[bytes] = DEFAULT_FIELDS
) -> bytes:
    """The bytes that are hashed, so the form is testable and documented in one place.

    One line ``name:value`` per configured field, in the configured order (not arrival order, so
    header order cannot change the fingerprint), names lower-cased; a value is stripped of
    surrounding whitespace, repeated headers are joined with ``", "`` in arrival order (as
    RFC 9110 allows a recipient to combine them; an empty value adds nothing) and a missing field
    gives an empty value. Values
    stay bytes: nothing is decoded, so bytes that are not UTF-8 cannot raise.
    """
    if fields is DEFAULT_FIELDS:
        index, template = _DEFAULT_LAYOUT
    else:
        index, template = _layout(tuple(fields))
    parts = list(template)  # runs once per request: filling a copy beats building lines
    for name, value in headers:
        slot = index.get(name)
        if slot is None:
            if name.islower():  # ASGI names are lower-case: the common miss costs no copy
                continue
            slot = index.get(name.lower())
            if slot is None:
                continue
        seen = parts[slot]
        value = value.strip()
        parts[slot] = seen + b", " + value if seen else value
    return b"".join(parts)


def fingerprint(
    headers: Sequence[tuple[bytes, bytes]], fields: Sequence[bytes] = DEFAULT_FIELDS
) -> str:
    """16 hex characters identifying a client across requests, whatever its IP address.

    Equal to ``xxhash.xxh3_64(canonical_form(headers, fields)).hexdigest()``; the one-shot
    function avoids creating a hasher object on every request.
    """
    return xxhash.xxh3_64_hexdigest(canonical_form(headers, fields))
