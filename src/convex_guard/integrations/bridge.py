"""Run the ASGI guard stack for callers that are not ASGI apps: WSGI servers and Django.

The stack runs on the process-wide guard loop (`loopthread`), never on a loop of its own per
request. The app itself does NOT run there: when a request gets past every check, the stack's
innermost app hands control back to the caller (the WSGI server's thread, or Django's own
event loop), which calls the real app where it would have been called anyway (thread-locals,
database connections and Flask's contexts behave as usual), then hands the status back. The
stack then finishes on the loop: the limiter adds its `RateLimit` fields, the logger records the
status and its latency (up to the response headers: the body is streamed by the caller, not
buffered), and the caller gets the headers to add. When a check refuses the request, the
caller gets the guard's own response (status, headers, body) and the app is never called.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from starlette.types import Message, Receive, Scope, Send

from convex_guard.core.errors import ConfigurationError
from convex_guard.core.logs import logger
from convex_guard.integrations import loopthread
from convex_guard.middleware.guard import GuardSettings, GuardStack

T = TypeVar("T")

#: Where the adapters put the guard's scope for the app (`report_usage(environ[SCOPE_KEY])`).
SCOPE_KEY = "convex_guard.scope"
_HANDOFF_KEY = "convex_guard.handoff"
_STARTUP_TIMEOUT = 30.0


@dataclass
class Outcome(Generic[T]):
    """How a guarded request ended.

    `called` says whether the app ran; then `result` is what it returned and `headers` are the
    fields the guard adds (`RateLimit`, `RateLimit-Policy`). Otherwise the guard answered
    itself with `status`, `headers` and `body`.
    """

    called: bool
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    result: T | None = None


@dataclass
class _Handoff:
    """The meeting point of the loop (the stack) and the caller (the app), for one request."""

    reached: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)
    status: asyncio.Future[int] | None = None
    loop: asyncio.AbstractEventLoop | None = None


async def _handoff_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The innermost ASGI app: let the caller run the real app, then answer with its status."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    handoff: _Handoff = scope[_HANDOFF_KEY]
    handoff.loop = asyncio.get_running_loop()
    handoff.status = handoff.loop.create_future()
    handoff.reached.set_result(None)
    status = await handoff.status  # raises the app's exception, if it raised
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def scope_from_environ(environ: Mapping[str, Any]) -> dict[str, Any]:
    """An ASGI HTTP scope describing a WSGI request (or a Django request's `META`)."""
    headers: list[tuple[bytes, bytes]] = []
    for name, value in environ.items():
        if not isinstance(value, str):
            continue
        if name.startswith("HTTP_"):
            header = name[5:].replace("_", "-").lower()
        elif name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            header = name.replace("_", "-").lower()
        else:
            continue
        headers.append((header.encode("latin-1"), value.encode("latin-1", "replace")))
    path_info: str = environ.get("PATH_INFO", "") or "/"
    # PEP 3333 hands PATH_INFO over as latin-1-decoded bytes; ASGI wants the UTF-8 text.
    try:
        path = path_info.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        path = path_info
    remote = environ.get("REMOTE_ADDR") or None
    try:
        port = int(environ.get("REMOTE_PORT") or 0)
    except ValueError:
        port = 0
    try:
        server_port = int(environ.get("SERVER_PORT") or 0)
    except ValueError:
        server_port = 0
    protocol = str(environ.get("SERVER_PROTOCOL", "HTTP/1.1"))
    # ASGI's path holds the root_path (WSGI's SCRIPT_NAME) in front: the guard takes the
    # route path back out of it as Starlette does, so a PATH_INFO that happens to begin
    # with SCRIPT_NAME keeps its own prefix.
    script_name = str(environ.get("SCRIPT_NAME", ""))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": protocol.partition("/")[2] or "1.1",
        "method": str(environ.get("REQUEST_METHOD", "GET")).upper(),
        "scheme": str(environ.get("wsgi.url_scheme", "http")),
        "path": script_name + path,
        "raw_path": (script_name + path_info).encode("latin-1", "replace"),
        "query_string": str(environ.get("QUERY_STRING", "")).encode("latin-1", "replace"),
        "root_path": script_name,
        "headers": headers,
        "client": (remote, port) if remote else None,
        "server": (str(environ.get("SERVER_NAME", "")), server_port),
        "state": {},
    }


async def _no_body() -> Message:
    # The guard reads headers only; the body stays for the app, unread.
    return {"type": "http.request", "body": b"", "more_body": False}


class GuardBridge:
    """A guard stack on the guard loop, for sync (`run`) and async (`arun`) callers.

    Start-up runs the stack's lifespan once on the loop (so the order checks and the log
    writer's start happen as under an ASGI server); `close()` runs its shutdown, which flushes
    the log writer. `close()` is registered with `atexit`, and is safe to call twice.
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.guard = GuardStack.build(_handoff_app, settings)
        self.store = self.guard.store
        self.writer = self.guard.writer
        self.is_exempt = self.guard.is_exempt
        self._closed = False
        self._shutdown: asyncio.Queue[Message] | None = None
        self._lifespan: concurrent.futures.Future[None] | None = None
        self._close_lock = threading.Lock()
        self._start()
        atexit.register(self.close)

    # -- lifespan ---------------------------------------------------------------------------
    def _start(self) -> None:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def lifespan() -> None:
            queue: asyncio.Queue[Message] = asyncio.Queue()
            self._shutdown = queue
            await queue.put({"type": "lifespan.startup"})

            async def send(message: Message) -> None:
                kind = message["type"]
                if kind == "lifespan.startup.complete":
                    started.set_result(None)
                elif kind == "lifespan.startup.failed" and not started.done():
                    started.set_exception(ConfigurationError(message.get("message", "")))

            try:
                await self.guard.app({"type": "lifespan", "state": {}}, queue.get, send)
            except Exception as exc:
                if not started.done():
                    started.set_exception(exc)
                    return
                raise

        self._lifespan = loopthread.submit(lifespan())
        started.result(_STARTUP_TIMEOUT)

    def close(self) -> None:
        """Flush the log writer (and close a store the guard created); safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        queue, lifespan = self._shutdown, self._lifespan
        if queue is None or lifespan is None or lifespan.done():
            return
        loop = loopthread.loop()
        loop.call_soon_threadsafe(queue.put_nowait, {"type": "lifespan.shutdown"})
        try:
            lifespan.result(self.writer.shutdown_timeout + 5)
        except Exception as exc:
            logger.warning("convex-guard: shutdown did not complete: %r", exc)
        if self.guard.owns_store:
            try:
                loopthread.run(self.store.close(), timeout=5)
            except Exception as exc:
                logger.warning("convex-guard: closing the store failed: %r", exc)

    # -- requests ---------------------------------------------------------------------------
    def _prepare(self, scope: dict[str, Any]) -> tuple[_Handoff, _Capture]:
        handoff = _Handoff()
        scope[_HANDOFF_KEY] = handoff
        return handoff, _Capture()

    async def _drive(self, scope: dict[str, Any], capture: _Capture) -> None:
        await self.guard.app(scope, _no_body, capture.send)

    def run(self, scope: dict[str, Any], call_app: Callable[[], tuple[int, T]]) -> Outcome[T]:
        """Guard one request from a sync caller; `call_app()` runs the app, returns (status, x)."""
        handoff, capture = self._prepare(scope)
        done = loopthread.submit(self._drive(scope, capture))
        concurrent.futures.wait((handoff.reached, done), return_when="FIRST_COMPLETED")
        if not handoff.reached.done():
            done.result()
            return capture.outcome(called=False)
        try:
            status, result = call_app()
        except BaseException as exc:  # the stack must end (and log) whatever the app did
            self._resume(handoff, exc=exc)
            _wait_quietly(done)
            raise
        self._resume(handoff, status=status)
        done.result()
        return capture.outcome(called=True, result=result)

    async def arun(
        self, scope: dict[str, Any], call_app: Callable[[], Awaitable[tuple[int, T]]]
    ) -> Outcome[T]:
        """Guard one request from an async caller (its own loop); the app runs on that loop."""
        handoff, capture = self._prepare(scope)
        done = asyncio.wrap_future(loopthread.submit(self._drive(scope, capture)))
        reached = asyncio.wrap_future(handoff.reached)
        await asyncio.wait((reached, done), return_when=asyncio.FIRST_COMPLETED)
        if not reached.done():
            reached.cancel()
            await done
            return capture.outcome(called=False)
        try:
            status, result = await call_app()
        except BaseException as exc:  # cancelled included: the request log says so
            self._resume(handoff, exc=exc)
            await asyncio.gather(done, return_exceptions=True)
            raise
        self._resume(handoff, status=status)
        await done
        return capture.outcome(called=True, result=result)

    @staticmethod
    def _resume(handoff: _Handoff, *, status: int = 0, exc: BaseException | None = None) -> None:
        waiter, loop = handoff.status, handoff.loop
        assert waiter is not None and loop is not None

        def resume() -> None:
            if waiter.done():
                return
            if isinstance(exc, asyncio.CancelledError):
                waiter.cancel()
            elif exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(status)

        loop.call_soon_threadsafe(resume)


def _wait_quietly(done: concurrent.futures.Future[None]) -> None:
    # The stack re-raises the app's exception after logging it; the caller raises it already.
    try:
        done.result()
    except Exception:
        logger.debug("guard stack ended with the app's exception", exc_info=True)


#: Hop-by-hop fields (RFC 9110 §7.6.1) are the server's to send: PEP 3333 forbids a WSGI app
#: to set them (wsgiref refuses the response), so the guard's `Connection: close` stays here.
_HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    ]
)


class _Capture:
    """The outermost `send`: what the guard said (its own response, or the headers it adds)."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", ())
                if name.lower() not in _HOP_BY_HOP
            ]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    def outcome(self, *, called: bool, result: T | None = None) -> Outcome[T]:
        return Outcome(
            called=called,
            status=self.status,
            headers=self.headers,
            body=bytes(self.body),
            result=result,
        )


def merge_headers(existing: MutableMapping[str, str], added: Iterable[tuple[str, str]]) -> None:
    """Add the guard's fields to a response's headers, joining repeated names with commas."""
    for name, value in added:
        current = existing.get(name)
        existing[name] = value if current is None else f"{current}, {value}"
