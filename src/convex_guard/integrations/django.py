"""Django: a native middleware over the same guard stack and store, sync and async.

    # settings.py
    MIDDLEWARE = ["convex_guard.django.DjangoGuardMiddleware", ...]   # first: it runs outermost
    CONVEX_GUARD = {"trusted_proxies": ["10.0.0.0/8"]}                # GuardSettings fields

Under WSGI (runserver, gunicorn) Django calls it synchronously: the checks run on the
process-wide guard loop thread (never a new loop per request) while the view runs in the
request's own thread. Under ASGI Django calls it as a coroutine: the checks still run on the
guard loop, so the store's clients and the log writer stay on one loop, and the view runs on
Django's. Views report usage with `report_usage(guard_scope(request), model=…, tokens=…)`.

The ASGI alternative needs no Django middleware at all: wrap the ASGI application,
`application = GuardMiddleware(get_asgi_application())` (then `guard_scope(request)` returns
`request.scope`, which the guard filled).

The log writer is flushed at process exit (`atexit`); `close_all()` flushes it earlier, e.g.
from a server's worker-exit hook.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings as django_settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from convex_guard.core.errors import ConfigurationError
from convex_guard.integrations.bridge import SCOPE_KEY, GuardBridge, Outcome, scope_from_environ
from convex_guard.middleware.context import route_of
from convex_guard.middleware.guard import GuardSettings

SETTINGS_NAME = "CONVEX_GUARD"
_SKIPPED_HEADERS = frozenset(("content-length",))

_instances: list[DjangoGuardMiddleware] = []
_instances_lock = threading.Lock()


def guard_settings() -> GuardSettings:
    """`settings.CONVEX_GUARD` (a dict of `GuardSettings` fields, or a `GuardSettings`)."""
    value = getattr(django_settings, SETTINGS_NAME, None)
    if value is None:
        return GuardSettings()
    if isinstance(value, GuardSettings):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"settings.{SETTINGS_NAME} must be a dict of GuardSettings fields")
    return GuardSettings.from_mapping(value)


def guard_scope(request: HttpRequest) -> MutableMapping[str, Any]:
    """The guard's scope for this request, for `report_usage` and `guard_context`."""
    scope = request.META.get(SCOPE_KEY)
    if scope is None:
        scope = getattr(request, "scope", None)  # the ASGI way: GuardMiddleware filled it
    if scope is None:
        raise LookupError("This request did not pass through convex-guard")
    assert isinstance(scope, MutableMapping)
    return scope


def _scope_for(request: HttpRequest) -> dict[str, Any]:
    asgi = getattr(request, "scope", None)
    if isinstance(asgi, Mapping) and asgi.get("type") == "http":
        # Under ASGI: Django's own scope has the headers and the peer exactly as received.
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": asgi.get("http_version", "1.1"),
            "method": request.method or "GET",
            "scheme": asgi.get("scheme", "http"),
            # As ASGI has it: the script prefix Django stripped, then the route path.
            "path": request.META.get("SCRIPT_NAME", "") + request.path_info,
            "raw_path": asgi.get("raw_path", request.path_info.encode()),
            "query_string": asgi.get("query_string", b""),
            "root_path": request.META.get("SCRIPT_NAME", ""),
            "headers": list(asgi.get("headers", ())),
            "client": asgi.get("client"),
            "server": asgi.get("server"),
            "state": {},
        }
    return scope_from_environ(request.META)


def _finish(outcome: Outcome[HttpResponseBase]) -> HttpResponseBase:
    if outcome.called:
        response = outcome.result
        assert response is not None
        for name, value in outcome.headers:
            current = response.get(name)
            response[name] = value if current is None else f"{current}, {value}"
        return response
    answer = HttpResponse(outcome.body, status=outcome.status)
    for name, value in outcome.headers:
        if name.lower() in _SKIPPED_HEADERS:
            continue
        current = answer.get(name) if name.lower() != "content-type" else None
        answer[name] = value if current is None else f"{current}, {value}"
    return answer


class DjangoGuardMiddleware:
    """Logger → fingerprint → API keys → bot detection → rate limits, as Django middleware.

    Put it first in `MIDDLEWARE` so that it sees every request and its final response.
    """

    sync_capable = True
    async_capable = True

    def __init__(
        self, get_response: Callable[[HttpRequest], Any], settings: GuardSettings | None = None
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        self.bridge = GuardBridge(settings or guard_settings())
        self.store = self.bridge.store
        self.writer = self.bridge.writer
        with _instances_lock:
            _instances.append(self)

    def close(self) -> None:
        """Flush the log writer now (also done at process exit)."""
        self.bridge.close()

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        scope = _scope_for(request)
        if self.bridge.is_exempt(route_of(scope)[1]):
            return self.get_response(request)
        request.META[SCOPE_KEY] = scope

        def call_view() -> tuple[int, HttpResponseBase]:
            response: HttpResponseBase = self.get_response(request)
            return response.status_code, response

        return _finish(self.bridge.run(scope, call_view))

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        scope = _scope_for(request)
        get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response
        if self.bridge.is_exempt(route_of(scope)[1]):
            return await get_response(request)
        request.META[SCOPE_KEY] = scope

        async def call_view() -> tuple[int, HttpResponseBase]:
            response = await get_response(request)
            return response.status_code, response

        return _finish(await self.bridge.arun(scope, call_view))


def close_all() -> None:
    """Flush every Django guard's log writer in this process (e.g. at worker exit)."""
    with _instances_lock:
        instances = list(_instances)
        _instances.clear()
    for instance in instances:
        instance.close()


__all__ = ["DjangoGuardMiddleware", "close_all", "guard_scope", "guard_settings"]
