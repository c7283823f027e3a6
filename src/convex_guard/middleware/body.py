"""Reading a request body before the app, and handing the app the same bytes.

A step that must see the body to decide (a JSON route's well-formedness, a token estimate)
reads it once, within a size limit, and puts a replay in `ctx.receive`; the runner gives the
app that replay instead of the server's `receive`, so the app reads the body as sent.
"""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive

from convex_guard.middleware.context import GuardContext


class BodyTooLarge(Exception):
    """The body grew past the limit: `received` bytes had arrived when reading stopped."""

    def __init__(self, limit: int, received: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit
        self.received = received


async def read_body(ctx: GuardContext, receive: Receive, limit: int) -> bytes:
    """The whole body, at most `limit` bytes, read once per request and replayed to the app.

    A second step asking gets the bytes already read. Raises `BodyTooLarge` as soon as the
    body passes `limit` (the rest is never read), and Starlette's `ClientDisconnect` when the
    client goes away first (the runner takes that as the request's end).
    """
    if ctx.body is not None:
        if len(ctx.body) > limit:
            raise BodyTooLarge(limit, len(ctx.body))
        return ctx.body
    source = ctx.receive or receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await source()
        kind = message["type"]
        if kind == "http.disconnect":
            raise ClientDisconnect()
        if kind != "http.request":
            continue
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit, size)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = ctx.body = b"".join(chunks)
    ctx.receive = replay(body, source)
    return body


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that answers `body` in one message, then what the server's answers
    (`http.disconnect` when the client goes)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


__all__ = ["BodyTooLarge", "read_body", "replay"]
