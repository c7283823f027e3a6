"""RFC 9457 problem details: every response the guard itself sends."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types"
QUOTA_EXCEEDED = f"{PROBLEM_TYPES}#quota-exceeded"
ABNORMAL_USAGE = f"{PROBLEM_TYPES}#abnormal-usage-detected"
#: The title of a 429 for a spent quota (the words of the problem type's registration).
QUOTA_TITLE = "Request cannot be satisfied as assigned quota has been exceeded"
#: A spent cost budget: no registered type says it, so it is a type of this package's own,
#: a tag URI (RFC 4151), which RFC 9457 suggests for a type with no page to resolve to.
BUDGET_EXCEEDED = "tag:convex-guard,2026:budget-exceeded"
BUDGET_TITLE = "Request cannot be satisfied as the cost budget has been spent"


def problem(
    status: int,
    title: str,
    *,
    type: str = "about:blank",
    detail: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    extra: Mapping[str, object] | None = None,
) -> Response:
    """A `application/problem+json` response; an ASGI app, awaited directly by middlewares."""
    body: dict[str, object] = {"type": type, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if extra:
        body.update(extra)
    response = Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/problem+json",
    )
    for name, value in headers:
        response.headers.append(name, value)
    return response


def retry_after(ms: float) -> str:
    """`Retry-After` for a wait of `ms` milliseconds: whole seconds, rounded up, at least 1
    (a 0 would invite the client straight back)."""
    return str(max(1, math.ceil(ms / 1000)))


def quota_exceeded(
    title: str,
    policies: Sequence[str],
    *,
    retry: str | None = None,
    detail: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    """429 of type `quota-exceeded` naming the `violated-policies`; `retry` (from
    `retry_after`) is sent as `Retry-After`, before any other `headers`."""
    if retry is not None:
        headers = [("Retry-After", retry), *headers]
    return problem(
        429,
        title,
        type=QUOTA_EXCEEDED,
        detail=detail,
        headers=headers,
        extra={"violated-policies": list(policies)},
    )


def budget_exceeded(
    policies: Sequence[str],
    *,
    retry: str,
    detail: str,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    """429 of type `budget-exceeded` naming the `violated-policies`, with `Retry-After`."""
    return problem(
        429,
        BUDGET_TITLE,
        type=BUDGET_EXCEEDED,
        detail=detail,
        headers=[("Retry-After", retry), *headers],
        extra={"violated-policies": list(policies)},
    )


def unavailable(title: str, detail: str) -> Response:
    """503 for a check that could not run and fails closed; worth retrying in a second."""
    return problem(503, title, detail=detail, headers=[("Retry-After", "1")])


#: The ASGI extension through which a server lets an app answer a WebSocket handshake with
#: an HTTP response (uvicorn's websockets, websockets-sansio and wsproto protocols offer it).
WEBSOCKET_DENIAL = "websocket.http.response"
#: Close codes for a refused handshake when the server cannot send an HTTP answer
#: (RFC 6455 §7.4.1): 1008 policy violation, 1013 try again later.
_CLOSE_CODES = {429: 1013, 500: 1011, 503: 1013}
_POLICY_VIOLATION = 1008


async def refuse(answer: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve the guard's refusal (`problem(...)`, or the bot challenge app) on any scope.

    An HTTP request gets it as it is. A WebSocket handshake is refused before accept: with
    the same status, headers and body through the server's `websocket.http.response`
    extension where it is offered, else with a close frame whose code says why (1008 for
    401/403, 1013 for 429/503, 1011 for a 500) and whose reason is the problem's title.
    """
    if scope["type"] != "websocket":
        await answer(scope, receive, send)
        return
    if WEBSOCKET_DENIAL in (scope.get("extensions") or {}):

        async def denial_send(message: Message) -> None:
            kind = message["type"]
            if kind.startswith("http.response."):  # an app that is not a Starlette Response
                message = {**message, "type": "websocket." + kind}
            await send(message)

        await answer(scope, receive, denial_send)
        return
    status = 403
    body = bytearray()

    async def capture(message: Message) -> None:
        nonlocal status
        if message["type"].endswith("http.response.start"):
            status = message["status"]
        elif message["type"].endswith("http.response.body"):
            body.extend(message.get("body", b""))

    await answer(scope, receive, capture)
    try:
        title = str(json.loads(body)["title"])
    except (ValueError, KeyError, TypeError):
        title = ""
    # A close frame's reason holds at most 123 bytes of UTF-8.
    reason = title.encode()[:123].decode("utf-8", "ignore")
    await send(
        {
            "type": "websocket.close",
            "code": _CLOSE_CODES.get(status, _POLICY_VIOLATION),
            "reason": reason,
        }
    )
