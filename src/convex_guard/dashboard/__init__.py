"""A live dashboard over a store's analytics: `app(store)` is a mountable ASGI app.

The page (`static/`, shipped in the wheel, no CDN) reads one `DashboardSnapshot` per refresh:
`GET api/snapshot?window=1h` as JSON, and `GET api/events?window=1h` as server-sent events
that push a new snapshot when the data changes (`GET api/bots?window=1h` lists the window's
latest bot events, for the bot list, each with what it was taken for and whether its claim
was verified or spoofed) — on Convex when the store's subscription
fires (at most one push per `throttle` seconds), on any other store by polling it every
`poll_interval` seconds. Every route asks for the token: a `dashboard_token` cookie (set
when the page is opened with `?token=…`), `Authorization: Bearer …` or `?token=…`, compared
in constant time; anything else is a bare 401. The page never shows a key or its hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from convex_guard.core.errors import StoreError
from convex_guard.core.logs import printable
from convex_guard.stores.base import (
    BotEvent,
    DashboardSnapshot,
    DashboardStore,
    dashboard_feed,
    require,
)

logger = logging.getLogger("convex_guard.dashboard")

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
#: The window the page opens with, and the longest one it may ask for.
DEFAULT_WINDOW = HOUR
MAX_WINDOW = 30 * DAY
#: About this many buckets per chart, whatever the window.
TARGET_BUCKETS = 60
#: Up to this window buckets are whole minutes (the minute rollups); beyond, whole hours.
MINUTE_BUCKETS_UP_TO = 6 * HOUR
COOKIE = "dashboard_token"
#: The bot list shows the window's latest events, at most this many.
BOT_LIST_SIZE = 50
#: An idle event stream sends a comment this often, so a dead connection is noticed.
KEEPALIVE_SECONDS = 15.0

_WINDOW = re.compile(r"^(\d{1,4})(m|h|d)$")
#: What a token may hold: it goes in a cookie and an address as it is.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{16,1024}")
_UNITS = {"m": MINUTE, "h": HOUR, "d": DAY}
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # The token may be in the address the page was opened with: never send it on.
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}

Clock = Callable[[], float]


def _wall_ms() -> float:
    return time.time() * 1000.0


class BadWindowError(ValueError):
    """A `window` the dashboard does not offer."""


def parse_window(text: str | None, default: float = DEFAULT_WINDOW) -> float:
    """`15m`, `1h`, `7d` → milliseconds (at least a minute, at most `MAX_WINDOW`)."""
    if text is None or text == "":
        return default
    match = _WINDOW.match(text)
    if match is None:
        raise BadWindowError("window must be a duration such as 15m, 1h or 7d")
    window = int(match.group(1)) * _UNITS[match.group(2)]
    if not MINUTE <= window <= MAX_WINDOW:
        raise BadWindowError("window must be between 1m and 30d")
    return window


def window_label(window: float) -> str:
    """A window as `parse_window` reads it and the page's buttons say it (`6h`, `24h`, `7d`;
    minutes rounded up)."""
    if window % DAY == 0 and window > DAY:
        return f"{int(window // DAY)}d"
    if window % HOUR == 0:
        return f"{int(window // HOUR)}h"
    return f"{math.ceil(window / MINUTE)}m"


def window_range(window: float, now: float) -> tuple[float, float, float]:
    """`(start, end, bucket_ms)` of the window ending with the bucket that holds `now`.

    Buckets are whole minutes up to `MINUTE_BUCKETS_UP_TO`, whole hours beyond (what the
    Convex rollups hold), about `TARGET_BUCKETS` of them.
    """
    unit = MINUTE if window <= MINUTE_BUCKETS_UP_TO else HOUR
    bucket = unit * max(1, math.ceil(window / unit / TARGET_BUCKETS))
    end = (now // bucket + 1) * bucket
    start = end - math.ceil(window / bucket) * bucket
    return float(start), float(end), float(bucket)


class Dashboard:
    """The dashboard's ASGI app: the token check in front of its routes (see the module).

    Options are checked once, here; `token` is the one the page asks for (generated when
    none is given: read it from this attribute to hand it on, it is never logged).
    """

    def __init__(
        self,
        store: DashboardStore,
        *,
        token: str | None = None,
        window: float = DEFAULT_WINDOW,
        poll_interval: float = 5.0,
        throttle: float = 1.0,
        clock: Clock = _wall_ms,
    ) -> None:
        require(store, {DashboardStore: "the dashboard"}, "convex_guard.dashboard")
        if token is not None and _TOKEN.fullmatch(token) is None:
            raise ValueError(
                "the dashboard token must be at least 16 characters of A-Z a-z 0-9 . _ ~ + / = -"
            )
        if not 0 < poll_interval < math.inf or not 0 <= throttle < math.inf:
            raise ValueError("poll_interval must be positive and throttle not negative")
        if not MINUTE <= window <= MAX_WINDOW:
            raise ValueError("window must be between one minute and 30 days")
        self.store = store
        self.token = token if token is not None else secrets.token_urlsafe(24)
        self._token = self.token.encode()
        self.window = window
        self.poll_interval = poll_interval
        self.throttle = throttle
        self.clock = clock
        static = resources.files(__package__) / "static"
        # The page opens with this app's window (the CLI's --window), and polls as often as
        # this app polls its store when its event stream fails.
        self._index = (
            (static / "index.html")
            .read_bytes()
            .replace(b'data-window="1h"', f'data-window="{window_label(window)}"'.encode(), 1)
            .replace(b'data-poll="5000"', f'data-poll="{round(poll_interval * 1000)}"'.encode(), 1)
        )
        self._assets = {
            name: ((static / name).read_bytes(), kind) for name, kind in _ASSETS.items()
        }
        self._router = Router(
            routes=[
                Route("/", self._page),
                Route("/static/{name}", self._asset),
                Route("/api/snapshot", self._snapshot),
                Route("/api/events", self._events),
                Route("/api/bots", self._bots),
            ]
        )

    def __repr__(self) -> str:
        return f"Dashboard(store={type(self.store).__name__}, token='**********')"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._router(scope, receive, send)
            return
        given, from_query = self._presented(scope)
        if given is None or not hmac.compare_digest(given.encode(), self._token):
            client = scope.get("client")
            logger.warning(
                "Dashboard refused %s %s from %s: %s token",
                printable(scope["method"]),
                printable(scope["path"]),
                printable(client[0]) if client else "unknown",
                "no" if given is None else "a wrong",
            )
            response: ASGIApp = JSONResponse(
                {"title": "Unauthorized", "status": 401},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="dashboard"', **_SECURITY_HEADERS},
                media_type="application/problem+json",
            )
        elif from_query and _route_path(scope) in ("", "/") and scope["method"] == "GET":
            # Trade the token in the address for a cookie, and drop it from the address bar.
            root = scope.get("root_path", "") + "/"
            kept = [
                (k, v)
                for k, v in parse_qsl(scope["query_string"].decode("latin-1"))
                if k != "token"
            ]
            target = root + ("?" + urlencode(kept) if kept else "")
            response = RedirectResponse(target, status_code=303, headers=_SECURITY_HEADERS)
            response.set_cookie(COOKIE, self.token, path=root, httponly=True, samesite="strict")
        else:
            response = self._router
        await response(scope, receive, send)

    @staticmethod
    def _presented(scope: Scope) -> tuple[str | None, bool]:
        """The token the request presents, and whether it came in the query string."""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    return credentials.strip(), False
            elif name == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    key, _, cookie = part.strip().partition("=")
                    if key == COOKIE and cookie:
                        return cookie, False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        tokens = query.get("token")
        return (tokens[0], True) if tokens else (None, False)

    # -- routes ------------------------------------------------------------------------------
    async def _page(self, request: Request) -> Response:
        return Response(
            self._index, media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS
        )

    async def _asset(self, request: Request) -> Response:
        asset = self._assets.get(request.path_params["name"])
        if asset is None:
            return _problem(404, "Not Found")
        body, kind = asset
        return Response(body, media_type=kind, headers=_SECURITY_HEADERS)

    def _window(self, request: Request) -> float | Response:
        """The window asked for, or the 400 to answer."""
        text = request.query_params.get("window")
        try:
            return parse_window(text, self.window)
        except BadWindowError as exc:
            logger.warning("Dashboard: bad window %s", printable(text or "", 40))
            return _problem(400, "Bad Request", str(exc))

    async def _snapshot(self, request: Request) -> Response:
        window = self._window(request)
        if isinstance(window, Response):
            return window
        try:
            snapshot = await self.store.dashboard(*window_range(window, self.clock()))
        except StoreError as exc:
            logger.warning("Dashboard: the store failed: %s", exc)
            return _problem(503, "Store unavailable", "The store did not answer; retry shortly.")
        return Response(_encode(snapshot), media_type="application/json", headers=_SECURITY_HEADERS)

    async def _bots(self, request: Request) -> Response:
        window = self._window(request)
        if isinstance(window, Response):
            return window
        read = getattr(self.store, "bot_events", None)
        if read is None:
            return _problem(404, "Not Found", "This store keeps no bot events.")
        try:
            events = await read(since=self.clock() - window, limit=BOT_LIST_SIZE)
        except StoreError as exc:
            logger.warning("Dashboard: the store failed: %s", exc)
            return _problem(503, "Store unavailable", "The store did not answer; retry shortly.")
        body = json.dumps({"events": [_bot_json(e) for e in events]}, separators=(",", ":"))
        return Response(body, media_type="application/json", headers=_SECURITY_HEADERS)

    async def _events(self, request: Request) -> Response:
        window = self._window(request)
        if isinstance(window, Response):
            return window
        return StreamingResponse(
            self._stream(window),
            media_type="text/event-stream",
            headers={**_SECURITY_HEADERS, "X-Accel-Buffering": "no"},
        )

    # -- live updates ------------------------------------------------------------------------
    async def _stream(self, window: float) -> AsyncIterator[bytes]:
        """Server-sent events: a `snapshot` event per change, comments to keep alive; a store
        failure is an `unavailable` event (the page then polls) and ends the stream."""
        try:
            async for body in self._updates(window):
                yield b"event: snapshot\ndata: " + body + b"\n\n" if body else b": idle\n\n"
        except StoreError as exc:
            logger.warning("Dashboard: live updates stopped, the store failed: %s", exc)
            yield b"event: unavailable\ndata: {}\n\n"

    async def _updates(self, window: float) -> AsyncIterator[bytes]:
        """Each new snapshot's JSON once (b"" when nothing changed for a while)."""
        watch = dashboard_feed(self.store)
        last = b""
        while True:
            start, end, bucket = window_range(window, self.clock())
            if watch is None:
                body = _encode(await self.store.dashboard(start, end, bucket))
                yield body if body != last else b""
                last = body
                await asyncio.sleep(self.poll_interval)
                continue
            # Follow the subscription until the window moves on to a new bucket.
            until = time.monotonic() + max(0.0, (end - self.clock()) / 1000.0)
            async for body in self._followed(watch(start, end, bucket), until):
                if body and body == last:
                    continue
                yield body
                if body:
                    last = body

    async def _followed(
        self, updates: AsyncIterator[DashboardSnapshot], until: float
    ) -> AsyncIterator[bytes]:
        """The latest of `updates` at most once per `throttle` seconds, until `until`
        (monotonic seconds); b"" after `KEEPALIVE_SECONDS` without one."""
        latest: list[DashboardSnapshot] = []
        arrived = asyncio.Event()
        failed: list[BaseException] = []

        async def consume() -> None:
            try:
                async for snapshot in updates:
                    latest[:] = [snapshot]
                    arrived.set()
            except Exception as exc:  # handed to the stream, which reports it
                failed.append(exc)
                arrived.set()

        task = asyncio.create_task(consume())
        sent = time.monotonic()
        try:
            while (left := until - time.monotonic()) > 0:
                quiet = KEEPALIVE_SECONDS - (time.monotonic() - sent)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), max(0.0, min(left, quiet)))
                if failed:
                    raise failed[0]
                if not arrived.is_set():
                    if time.monotonic() - sent >= KEEPALIVE_SECONDS:
                        yield b""
                        sent = time.monotonic()
                    continue
                arrived.clear()
                yield _encode(latest[0])
                sent = time.monotonic()
                await asyncio.sleep(self.throttle)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _bot_json(event: BotEvent) -> dict[str, object]:
    """One row of the bot list: the decision, what the user-agent was taken for, the claim's
    verification and its evidence. Texts the client chose are made printable and cut short
    (the page puts them in as text, never as markup)."""
    meta = event.metadata or {}

    def text(value: object, limit: int) -> str | None:
        return printable(str(value), limit) if value not in (None, "") else None

    return {
        "timestamp": event.timestamp,
        "ip": text(event.ip, 64),
        "userAgent": text(event.user_agent, 200),
        "type": event.detection_type,
        "action": event.action,
        "category": text(meta.get("category"), 40),
        "agent": text(meta.get("agent"), 80),
        "verification": text(meta.get("verification"), 20),
        "verifiedName": text(meta.get("verifiedName"), 80),
        "evidence": text(meta.get("evidence"), 200),
    }


def _route_path(scope: Scope) -> str:
    """The path inside this app: mounted (`Mount("/ops", app)`), the full path starts with
    the mount's `root_path`."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _encode(snapshot: DashboardSnapshot) -> bytes:
    return json.dumps(snapshot.to_json(), separators=(",", ":"), allow_nan=False).encode()


def _problem(status: int, title: str, detail: str | None = None) -> Response:
    body: dict[str, Any] = {"title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(
        body, status_code=status, headers=_SECURITY_HEADERS, media_type="application/problem+json"
    )


def app(
    store: DashboardStore,
    *,
    token: str | None = None,
    window: float = DEFAULT_WINDOW,
    poll_interval: float = 5.0,
    throttle: float = 1.0,
    clock: Clock = _wall_ms,
) -> Dashboard:
    """The dashboard over `store`, to mount or serve (see `Dashboard`)."""
    return Dashboard(
        store,
        token=token,
        window=window,
        poll_interval=poll_interval,
        throttle=throttle,
        clock=clock,
    )


__all__ = ["Dashboard", "app", "parse_window", "window_label", "window_range"]
