"""Request fingerprint (sans-IO): an xxh3-64 hash of a canonical form of identifying headers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from convex_guard.core.headers import fingerprint_of_form, header_reader

__all__ = ["DEFAULT_FIELDS", "canonical_form", "fingerprint", "fingerprint_of_form"]

# The seed's fields: what a browser sends on every request and a script rarely bothers to vary.
DEFAULT_FIELDS: Final[tuple[bytes, ...]] = (
    b"user-agent",
    b"accept-language",
    b"accept-encoding",
    b"accept",
    b"dnt",
)


def canonical_form(
    headers: Sequence[tuple[bytes, bytes]], fields: Sequence[bytes] = DEFAULT_FIELDS
) -> bytes:
    """The bytes that are hashed, so the form is testable and documented in one place.

    One line ``name:value`` per configured field, in the configured order (not arrival order, so
    header order cannot change the fingerprint), names lower-cased; a value is stripped of
    surrounding whitespace, repeated headers are joined with ``", "`` in arrival order (as
    RFC 9110 allows a recipient to combine them; an empty value adds nothing) and a missing field
    gives an empty value. Values
    stay bytes: nothing is decoded, so bytes that are not UTF-8 cannot raise. The request
    path reads it with the other headers in one pass (`core.headers.HeaderReader`), which is
    what this answers from.
    """
    return header_reader(tuple(fields)).read(headers).fingerprint_form


def fingerprint(
    headers: Sequence[tuple[bytes, bytes]], fields: Sequence[bytes] = DEFAULT_FIELDS
) -> str:
    """16 hex characters identifying a client across requests, whatever its IP address.

    Equal to ``xxhash.xxh3_64(canonical_form(headers, fields)).hexdigest()``
    (`fingerprint_of_form`), which the one pass over the headers computes with the form.
    """
    return header_reader(tuple(fields)).read(headers).fingerprint
