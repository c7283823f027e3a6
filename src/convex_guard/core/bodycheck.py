"""What a request body must be before the app sees it: declared size, media type, JSON shape.

Pure functions over header values and bytes; the request validation middleware
(`middleware/validation.py`) applies them.

The JSON check (`check_json`) costs a small multiple of the body's size, whatever the body:

1. *the container count*: `[` and `{` counted in C (`bytes.count`, strings included, so an
   upper bound). At most `max_depth` of them: the body cannot nest deeper, skip step 2. More
   than one per `MAX_CONTAINER_DENSITY` bytes of a body past `DENSITY_FLOOR` containers: refused,
   since `json.loads` builds a Python object of some 60 bytes per container (a 1 MiB body of
   `[],` would cost 20 times its size, and a tenth of a second);
2. *the bracket-pair scan*: the body without its strings (one regular expression that can
   always match, so it never backtracks) and without everything but brackets, then
   `bytes.replace(b"()", b"")` once per level, at most `max_depth` times: each pass removes
   the innermost pairs, so a pair left after `max_depth` passes sits deeper than that. No
   recursion, and each pass is a `memchr`-speed scan of a string that only shrinks;
3. `json.loads`, in C, for well-formedness: by now nothing in the body can make it recurse
   past `max_depth` or build more than a few times the body in objects, which it drops at once.
   `NaN` and `Infinity` (Python's extensions) are refused; so are numbers of more than 4300
   digits, which Python will not convert.
"""

from __future__ import annotations

import json
import re

#: A JSON string, well-formed or not, up to its closing quote or the end of the body: it can
#: match wherever it starts, so the engine never retries it from a later quote.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
#: `bytes.translate` tables: brackets as `(` and `)`, every other byte deleted.
_PARENS = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
#: Containers allowed per byte of body (one per 8 bytes), past `DENSITY_FLOOR` of them.
MAX_CONTAINER_DENSITY = 8
DENSITY_FLOOR = 1024


def _refuse_constant(name: str) -> None:
    raise ValueError(name)


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)

#: Media types are case-insensitive (RFC 9110 §8.3.1); parameters (`; charset=…`) follow `;`.
_PARAMETERS = re.compile(r"\s*;.*", re.DOTALL)


class BodyProblem(ValueError):
    """Why a body is refused, in words for the client (never the body itself)."""


def declared_length(values: list[bytes]) -> int | None:
    """The request's `Content-Length` (RFC 9110 §8.6), None when it has none.

    Repeated fields (or a list) of one same value are that value; anything else (a sign, a
    space inside, two different numbers) raises `BodyProblem`.
    """
    if not values:
        return None
    found: set[bytes] = set()
    for value in values:
        found.update(part.strip() for part in value.split(b","))
    if len(found) != 1:
        raise BodyProblem("Content-Length must be one number")
    (text,) = found
    if not text.isdigit() or len(text) > 20:  # bytes.isdigit: ASCII digits only
        raise BodyProblem("Content-Length must be a number of bytes")
    return int(text)


def media_type(value: str) -> str:
    """The media type of a `Content-Type` value, without parameters, in lower case."""
    return _PARAMETERS.sub("", value).strip().lower()


def type_matcher(allowed: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """What `type_allowed` compares with: the exact types and the `type/` of each `type/*`."""
    exact = frozenset(t for t in allowed if not t.endswith("/*"))
    ranges = tuple(t[:-1] for t in allowed if t.endswith("/*"))
    return exact, ranges


def type_allowed(kind: str, exact: frozenset[str], ranges: tuple[str, ...]) -> bool:
    return kind in exact or (bool(ranges) and kind.startswith(ranges))


def check_json(body: bytes, max_depth: int) -> None:
    """Raise `BodyProblem` unless `body` is one well-formed JSON text nested at most
    `max_depth` levels (`[]` is one level, `{"a": []}` two). See the module's docstring."""
    containers = body.count(b"[") + body.count(b"{")
    if containers > max_depth:
        if containers > DENSITY_FLOOR and containers * MAX_CONTAINER_DENSITY > len(body):
            raise BodyProblem("The JSON body holds too many arrays and objects for its size.")
        brackets = _STRING.sub(b"", body).translate(_PARENS, _NOT_BRACKETS)
        for _ in range(max_depth):
            size = len(brackets)
            brackets = brackets.replace(b"()", b"")
            if len(brackets) == size:
                break
        if b"()" in brackets:
            raise BodyProblem(f"The JSON body is nested more than {max_depth} levels deep.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyProblem("The body is not UTF-8 text.") from None
    try:
        _DECODER.decode(text)
    except (ValueError, RecursionError):  # RecursionError: unbalanced, e.g. a million `[`
        raise BodyProblem("The body is not well-formed JSON.") from None


__all__ = [
    "BodyProblem",
    "check_json",
    "declared_length",
    "media_type",
    "type_allowed",
    "type_matcher",
]
