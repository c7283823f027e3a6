"""Django: the example project guarded natively (WSGI sync, ASGI async) and the ASGI way.

Django can be configured once per process, so this module configures it once, from the
example project's settings, and each test builds its handler under `override_settings`
(`CONVEX_GUARD` and `MIDDLEWARE` are read when a handler is built).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")

import django

django.setup()

from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.test import override_settings  # noqa: E402

from convex_guard import ConfigurationError, GuardMiddleware, MemoryStore  # noqa: E402
from convex_guard.django import DjangoGuardMiddleware, close_all, guard_settings  # noqa: E402
from convex_guard.integrations.django import _instances  # noqa: E402

from .conftest import serve  # noqa: E402
from .e2e_checks import (  # noqa: E402
    ThreadRecordingStore,
    chats_share_one_loop_thread,
    check_logs,
    create_key,
    exercise,
    settings_for,
    small_rules,
)
from .wsgi_server import serve_wsgi  # noqa: E402

NATIVE = ["convex_guard.django.DjangoGuardMiddleware", "django.middleware.common.CommonMiddleware"]
PLAIN = ["django.middleware.common.CommonMiddleware"]


def guard_config(store: MemoryStore) -> dict[str, Any]:
    """`settings.CONVEX_GUARD` as a project would write it: a dict of GuardSettings fields."""
    return {"store": store, "rules": small_rules(), "writer_interval": 0.05}


def test_native_middleware_sync_under_a_wsgi_server() -> None:
    store = MemoryStore()
    key = create_key(store)
    with override_settings(MIDDLEWARE=NATIVE, CONVEX_GUARD=guard_config(store)):
        handler = WSGIHandler()
    with serve_wsgi(handler) as url:
        exercise(url, key)
    close_all()
    check_logs(store, key)


def test_native_sync_path_uses_one_loop_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ThreadRecordingStore()
    with override_settings(MIDDLEWARE=NATIVE, CONVEX_GUARD=guard_config(store)):
        handler = WSGIHandler()
    chats_share_one_loop_thread(monkeypatch, store, handler, "/api/ai/groq/chat", close_all)
    assert [row.model for row in store.ai_logs] == ["gpt-4o-mini"] * 20


def test_native_middleware_async_under_uvicorn() -> None:
    store = MemoryStore()
    key = create_key(store)
    with override_settings(MIDDLEWARE=NATIVE, CONVEX_GUARD=guard_config(store)):
        handler = ASGIHandler()
    assert _instances[-1].is_async  # Django drives it as a coroutine under ASGI
    with serve(handler, proxy_headers=False) as server:
        exercise(server.url, key)
    close_all()
    check_logs(store, key)


def test_asgi_way_guard_middleware_around_django() -> None:
    store = MemoryStore()
    key = create_key(store)
    with override_settings(MIDDLEWARE=PLAIN):
        app = GuardMiddleware(ASGIHandler(), settings=settings_for(store))
    with serve(app, proxy_headers=False) as server:
        exercise(server.url, key)
    # Django's handler has no lifespan; the guard answered it, and flushed at shutdown.
    check_logs(store, key, bad_json="invalid_body:json")  # ASGI: the guard reads the body


def test_bad_settings_fail_when_the_handler_is_built() -> None:
    with override_settings(CONVEX_GUARD={"rulez": []}), pytest.raises(ConfigurationError):
        guard_settings()
    with override_settings(CONVEX_GUARD=["not", "a", "dict"]), pytest.raises(ConfigurationError):
        guard_settings()
    assert DjangoGuardMiddleware.sync_capable and DjangoGuardMiddleware.async_capable
