"""Reading raw ASGI headers without ever raising on what a client sends.

`HeaderReader.read` is the request path's one pass over a request's headers: what the
fingerprint, the user-agent screening, the key screening and the body checks look at, read
together into a `RequestHeaders` that every step takes from the guard context, instead of
each walking the list again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Final, TypeVar

import xxhash
from starlette.types import Message, Send

if TYPE_CHECKING:
    from convex_guard.core.useragent import UserAgentVerdict

_K = TypeVar("_K")
_V = TypeVar("_V")

#: The messages that carry a response's headers: an HTTP response's start, the 101 of an
#: accepted WebSocket handshake.
_STARTS = frozenset(("http.response.start", "websocket.accept"))
#: Longest header value we keep for logs and stored rows; the rest is cut, never rejected.
MAX_STORED = 512


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """All values of header `name` (lower-case) joined by ", ", decoded as latin-1.

    Latin-1 maps every byte to a character, so no client bytes can make decoding fail.
    """
    # ASGI servers send lower-case names: only a name that is not needs a lower-cased copy.
    # A plain loop: a header is rarely repeated, and a list to join costs more than the scan.
    found: bytes | None = None
    for key, value in headers:
        if key == name or (not key.islower() and key.lower() == name):
            found = value if found is None else found + b", " + value
    return None if found is None else found.decode("latin-1")


#: What a name is read for besides a fingerprint field (`HeaderReader`); a name's code in the
#: reader's table is its fingerprint position (0 and up) or the complement of one of these.
_AGENT, _AUTHORIZATION, _API_KEY, _LENGTH, _TYPE, _CODING, _SIGNATURE = range(7)
_READ: Final = {
    b"user-agent": _AGENT,
    b"authorization": _AUTHORIZATION,
    b"x-api-key": _API_KEY,
    b"content-length": _LENGTH,
    b"content-type": _TYPE,
    b"transfer-encoding": _CODING,
    b"signature-input": _SIGNATURE,
}
#: Up to this many bytes a user-agent is its own key in the agent cache; a longer one is found
#: by its length and its ends, which cost the same to hash whatever its length.
_WHOLE_AGENT: Final = 256
_AGENT_EDGE: Final = 64
#: Distinct user-agents kept as text: short ones, and (fewer: each may be kilobytes) long ones.
AGENT_CACHE_SIZE: Final = 4096
LONG_AGENT_CACHE_SIZE: Final = 256
#: Distinct header sets kept read (`HeaderReader`): up to `_WHOLE_FORM` bytes of canonical
#: form, the form is its own key; a longer one is found as a long agent is.
KNOWN_CACHE_SIZE: Final = 4096
LONG_KNOWN_CACHE_SIZE: Final = 256
_WHOLE_FORM: Final = 1024


#: A canonical form's fingerprint: its xxh3-64 hex digest (the C function itself, so a read
#: pays no Python call for it; `core.fingerprint` exports it).
fingerprint_of_form: Final = xxhash.xxh3_64_hexdigest


class RequestHeaders:
    """What the guard's checks read from one request's headers, from one pass over them.

    Values stay as the client sent them (bytes), in arrival order, except `user_agent`: the
    header as text (every value joined by ", ", latin-1, so no byte can fail to decode; ""
    when absent). `fingerprint_form` is the fingerprint's canonical form
    (`core.fingerprint.canonical_form`) and `fingerprint` its xxh3-64 hex digest. Repeated
    credentials and lengths are kept apart (`authorization`, `api_key`, `content_length`:
    each a list, None when absent), since several of them is itself what the checks refuse;
    `content_type` is the last one sent. `chunked`: a `Transfer-Encoding` header was sent
    (whatever its value); `signed`: a `Signature-Input` header was (a Web Bot Auth signature
    to verify).

    `verdict` is the bot check's memo: (classifier, the agent it read, its verdict). A
    repeated client's `RequestHeaders` are shared by its requests (`HeaderReader`), so its
    next request is answered from them without asking the classifier's cache again.
    """

    __slots__ = (
        "api_key",
        "authorization",
        "chunked",
        "content_length",
        "content_type",
        "fingerprint",
        "fingerprint_form",
        "signed",
        "user_agent",
        "verdict",
    )

    def __init__(
        self,
        fingerprint_form: bytes,
        user_agent: str,
        authorization: list[bytes] | None,
        api_key: list[bytes] | None,
        content_length: list[bytes] | None,
        content_type: bytes | None,
        chunked: bool = False,
        signed: bool = False,
    ) -> None:
        self.fingerprint_form = fingerprint_form
        self.fingerprint = fingerprint_of_form(fingerprint_form)
        self.user_agent = user_agent
        self.authorization = authorization
        self.api_key = api_key
        self.content_length = content_length
        self.content_type = content_type
        self.chunked = chunked
        self.signed = signed
        self.verdict: tuple[object, str, UserAgentVerdict] | None = None


class HeaderReader:
    """Reads `RequestHeaders` in one pass; built once per fingerprint field list.

    Names are matched case-insensitively (ASGI servers send them lower-case: only a name
    that is not costs a lower-cased copy). A fingerprint field that is nothing else (most
    of a browser's headers) costs one lookup and its value's strip, into its place among
    the canonical form's pieces (`_pieces`: each field's name, then its value, then the
    line's end): the form is one join of them at the end.

    A client sends the same headers on every request: when they hold nothing but
    fingerprint fields and a user-agent (no credentials, no body headers), the form and the
    agent as sent say all there is, and the `RequestHeaders` read from them are kept by the
    form with the agent beside them, compared before they are used (`KNOWN_CACHE_SIZE`,
    oldest out first; a form of over `_WHOLE_FORM` bytes by its length and ends,
    `LONG_KNOWN_CACHE_SIZE` of them, and compared whole): its next request costs the loop, one
    join and one lookup, not a new object and its fingerprint. They are never changed once
    read, so requests share them. Otherwise the user-agent's text is cached per distinct value
    (`AGENT_CACHE_SIZE` short ones, `LONG_AGENT_CACHE_SIZE` long ones, oldest out first), so a
    repeated agent is one bytes comparison. Either way every request with one agent carries the
    same `str` object: its hash, which Python keeps on the object, is computed once for every
    cache a check keys by it, not once per request (an 8 kB agent costs ~24 k instructions to
    hash).
    """

    __slots__ = (
        "_agents",
        "_codes",
        "_known",
        "_long_agents",
        "_long_known",
        "_pieces",
        "_slots",
    )

    def __init__(self, fields: Sequence[bytes]) -> None:
        lowered = [name.lower() for name in fields]
        # A name listed twice holds its values in its last place; the others stay empty.
        # A field's value goes at its place among the form's pieces (see `_pieces`).
        positions = {name: 2 * position + 1 for position, name in enumerate(lowered)}
        self._codes: dict[bytes, int] = {name: ~kind for name, kind in _READ.items()}
        self._codes.update(
            (name, position) for name, position in positions.items() if name not in _READ
        )
        #: By `_READ` kind: the place of that header's value in `_pieces`, -1 when not a field.
        slots = [-1] * len(_READ)
        for name, kind in _READ.items():
            slots[kind] = positions.get(name, -1)
        self._slots = tuple(slots)
        # The canonical form in pieces, each field's value (empty here) between its name and
        # the line's end: b"user-agent:", value, b"\naccept-language:", value, ..., b"\n".
        pieces: list[bytes] = []
        for position, name in enumerate(lowered):
            pieces += [(b"\n" if position else b"") + name + b":", b""]
        self._pieces = tuple([*pieces, b"\n"] if pieces else pieces)
        self._agents: dict[bytes, str] = {}
        self._long_agents: dict[tuple[int, bytes, bytes], tuple[bytes, str]] = {}
        self._known: dict[bytes, tuple[bytes | None, RequestHeaders]] = {}
        self._long_known: dict[tuple[int, bytes, bytes], tuple[bytes | None, RequestHeaders]] = {}

    def read(self, headers: Iterable[tuple[bytes, bytes]]) -> RequestHeaders:
        codes = self._codes
        pieces = list(self._pieces)  # the form's, each field's value put in its place
        agent: bytes | None = None
        authorization: list[bytes] | None = None
        api_key: list[bytes] | None = None
        length: list[bytes] | None = None
        content_type: bytes | None = None
        chunked = signed = False
        plain = True  # nothing read but fingerprint fields and the user-agent
        for name, value in headers:
            code = codes.get(name)
            if code is None:
                if name.islower():  # the common miss costs no copy
                    continue
                code = codes.get(name.lower())
                if code is None:
                    continue
            if code >= 0:  # a fingerprint field and nothing else
                seen = pieces[code]
                pieces[code] = seen + b", " + value.strip() if seen else value.strip()
                continue
            kind = ~code
            slot = self._slots[kind]
            if slot >= 0:
                seen = pieces[slot]
                pieces[slot] = seen + b", " + value.strip() if seen else value.strip()
            if kind == _AGENT:
                agent = value if agent is None else agent + b", " + value
                continue
            plain = False
            if kind == _AUTHORIZATION:
                authorization = [value] if authorization is None else [*authorization, value]
            elif kind == _API_KEY:
                api_key = [value] if api_key is None else [*api_key, value]
            elif kind == _LENGTH:
                length = [value] if length is None else [*length, value]
            elif kind == _TYPE:
                content_type = value
            elif kind == _CODING:
                chunked = True
            else:
                signed = True
        form = b"".join(pieces)
        if not plain:
            return RequestHeaders(
                form,
                self._text(agent),
                authorization,
                api_key,
                length,
                content_type,
                chunked,
                signed,
            )
        # The headers of `form` and `agent` read before (made now if not), when they are
        # all the headers hold. A short form, the common case, is looked up here: a repeated
        # client's request costs no further call.
        if len(form) > _WHOLE_FORM:
            return self._long_known_by(form, agent)
        entry = self._known.get(form)
        if entry is not None and entry[0] == agent:
            return entry[1]
        found = RequestHeaders(form, self._text(agent), None, None, None, None)
        _keep(self._known, form, (agent, found), KNOWN_CACHE_SIZE)
        return found

    def _long_known_by(self, form: bytes, agent: bytes | None) -> RequestHeaders:
        """`read`'s cache of plain header sets for a form over `_WHOLE_FORM` bytes: found by
        its length and ends, compared whole."""
        key = (len(form), form[:_AGENT_EDGE], form[-_AGENT_EDGE:])
        long_entry = self._long_known.get(key)
        if (
            long_entry is not None
            and long_entry[1].fingerprint_form == form
            and long_entry[0] == agent
        ):
            return long_entry[1]
        found = RequestHeaders(form, self._text(agent), None, None, None, None)
        _keep(self._long_known, key, (agent, found), LONG_KNOWN_CACHE_SIZE)
        return found

    def _text(self, agent: bytes | None) -> str:
        if agent is None:
            return ""
        # A short agent seen before, the common case, without another call.
        known = self._agents.get(agent) if len(agent) <= _WHOLE_AGENT else None
        return known if known is not None else self.agent_text(agent)

    def agent_text(self, raw: bytes) -> str:
        """`raw` decoded as latin-1: the same `str` object for the same bytes while cached."""
        if len(raw) <= _WHOLE_AGENT:
            text = self._agents.get(raw)
            if text is None:
                text = raw.decode("latin-1")
                _keep(self._agents, raw, text, AGENT_CACHE_SIZE)
            return text
        key = (len(raw), raw[:_AGENT_EDGE], raw[-_AGENT_EDGE:])
        entry = self._long_agents.get(key)
        if entry is not None and entry[0] == raw:
            return entry[1]
        text = raw.decode("latin-1")
        _keep(self._long_agents, key, (raw, text), LONG_AGENT_CACHE_SIZE)
        return text


def _keep(entries: dict[_K, _V], key: _K, value: _V, size: int) -> None:
    if key not in entries and len(entries) >= size:
        # The oldest makes room. The WSGI and Django adapters read headers from several
        # threads: one that made room first leaves nothing to do here, never an error.
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            del entries[next(iter(entries))]
    entries[key] = value


@lru_cache(maxsize=64)
def header_reader(fields: tuple[bytes, ...]) -> HeaderReader:
    """The reader for a fingerprint field list, one per distinct list."""
    return HeaderReader(fields)


def bounded(value: str | None, limit: int = MAX_STORED) -> str:
    """A value safe to store: at most `limit` characters."""
    if not value:
        return ""
    return value if len(value) <= limit else value[:limit]


def adding_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """`send`, with `headers` appended to the response start (or a WebSocket's accept)."""

    async def send_with_headers(message: Message) -> None:
        if message["type"] in _STARTS:
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)

    return send_with_headers
