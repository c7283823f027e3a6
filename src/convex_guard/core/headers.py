"""Reading raw ASGI headers without ever raising on what a client sends."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Message, Send

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
