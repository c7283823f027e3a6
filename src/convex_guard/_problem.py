"""RFC 9457 problem details: every response the guard itself sends."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from starlette.responses import Response

PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types"
QUOTA_EXCEEDED = f"{PROBLEM_TYPES}#quota-exceeded"
ABNORMAL_USAGE = f"{PROBLEM_TYPES}#abnormal-usage-detected"


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
