"""WSGI: the guard around any WSGI app (Flask, Bottle, Falcon, Django's WSGI handler).

    from convex_guard.wsgi import GuardWSGIMiddleware
    app.wsgi_app = GuardWSGIMiddleware(app.wsgi_app)            # Flask

The checks run on the process-wide guard loop (one event loop thread, never a loop per
request); the app runs in the server's own thread, and its response streams as usual. The app
reports usage with `report_usage(environ["convex_guard.scope"], model=…, tokens=…)` (or
`report_usage(guard_scope(environ), …)`). The log writer is flushed at process exit
(`atexit`); call `close()` to flush it earlier, e.g. from a server's worker-exit hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from http import HTTPStatus
from typing import Any

from convex_guard.integrations.bridge import SCOPE_KEY, GuardBridge, Outcome, scope_from_environ
from convex_guard.middleware.context import route_of
from convex_guard.middleware.guard import GuardSettings

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def guard_scope(environ: Mapping[str, Any]) -> MutableMapping[str, Any]:
    """The guard's scope for this request, for `report_usage` and `guard_context`."""
    scope: MutableMapping[str, Any] = environ[SCOPE_KEY]
    return scope


class GuardWSGIMiddleware:
    """Logger → fingerprint → API keys → bot detection → rate limits around a WSGI app.

    Takes the same `GuardSettings` (or its fields as keyword options) as `GuardMiddleware`.
    """

    def __init__(self, app: WSGIApp, settings: GuardSettings | None = None, **options: Any) -> None:
        self.app = app
        self.settings = (settings or GuardSettings()).with_options(options)
        self.bridge = GuardBridge(self.settings)
        self.store = self.bridge.store
        self.writer = self.bridge.writer

    def close(self) -> None:
        """Flush the log writer now (also done at process exit)."""
        self.bridge.close()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        scope = scope_from_environ(environ)
        if self.bridge.is_exempt(route_of(scope)[1]):
            return self.app(environ, start_response)
        environ[SCOPE_KEY] = scope
        captured: dict[str, Any] = {}

        def capture_start(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], Any]:
            captured["args"] = (status, headers, exc_info)

            def write(data: bytes) -> Any:
                # Legacy `write()` apps: hold the bytes until the real response has started.
                captured.setdefault("written", []).append(data)

            return write

        def call_app() -> tuple[int, Iterable[bytes]]:
            body = self.app(environ, capture_start)
            if "args" not in captured:
                # The app starts its response on the first iteration (a generator app).
                iterator = iter(body)
                try:
                    first = next(iterator)
                except StopIteration:
                    first = b""
                body = _chain(first, iterator, body)
            status_line: str = captured["args"][0]
            return int(status_line.split(" ", 1)[0]), body

        outcome: Outcome[Iterable[bytes]] = self.bridge.run(scope, call_app)
        if not outcome.called:
            try:
                reason = HTTPStatus(outcome.status).phrase
            except ValueError:
                reason = "Error"
            start_response(f"{outcome.status} {reason}", outcome.headers)
            return [outcome.body]
        status, headers, exc_info = captured["args"]
        write = start_response(status, [*headers, *outcome.headers], exc_info)
        for data in captured.get("written", ()):
            write(data)
        assert outcome.result is not None
        return outcome.result


class _chain:
    """The app's body with its first chunk put back; keeps `close()` for the WSGI server."""

    def __init__(self, first: bytes, rest: Iterable[bytes], original: Iterable[bytes]) -> None:
        self._first: bytes | None = first
        self._rest = iter(rest)
        self._original = original

    def __iter__(self) -> _chain:
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return next(self._rest)

    def close(self) -> None:
        close = getattr(self._original, "close", None)
        if close is not None:
            close()


__all__ = ["GuardWSGIMiddleware", "guard_scope"]
