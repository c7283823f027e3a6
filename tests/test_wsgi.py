"""WSGI: Flask behind GuardWSGIMiddleware, served by a real WSGI server thread."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from examples.flask_app import create_app

from convex_guard import ConfigurationError, MemoryStore
from convex_guard.wsgi import GuardWSGIMiddleware

from .e2e_checks import (
    ThreadRecordingStore,
    chats_share_one_loop_thread,
    check_logs,
    create_key,
    exercise,
    settings_for,
)
from .wsgi_server import serve_wsgi


def test_flask_end_to_end_under_a_wsgi_server() -> None:
    store = MemoryStore()
    key = create_key(store)
    app = create_app(settings_for(store))
    guard: GuardWSGIMiddleware = app.extensions["convex_guard"]
    with serve_wsgi(app) as url:
        exercise(url, key)
    guard.close()  # flushes the writer (also registered with atexit)
    check_logs(store, key)
    guard.close()  # twice is harmless


def test_sync_requests_share_one_loop_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ThreadRecordingStore()
    app = create_app(settings_for(store))
    guard: GuardWSGIMiddleware = app.extensions["convex_guard"]
    chats_share_one_loop_thread(monkeypatch, store, app, "/api/ai/openai/chat", guard.close)
    assert len(store.ai_logs) == 20


def plain_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """A bare WSGI app: a generator that starts its response on first iteration."""
    if environ["PATH_INFO"].endswith("/boom"):
        raise RuntimeError("app failure")
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"hello "
    yield b"world"


def test_any_wsgi_app_streams_and_app_errors_propagate() -> None:
    store = MemoryStore()
    guard = GuardWSGIMiddleware(plain_app, settings_for(store, ai_path="/api/ai"))
    with serve_wsgi(guard) as url, httpx.Client(base_url=url) as c:
        ok = c.get("/api/ai/groq/x")
        assert ok.text == "hello world" and "groqRequests" in ok.headers["RateLimit-Policy"]
        assert c.get("/api/ai/groq/x", headers={"X-API-Key": "cg_ai_nope"}).status_code == 401
        assert c.get("/boom").status_code == 500  # the server's answer to the app's own error
        assert c.get("/api/ai/groq/boom").status_code == 500
    guard.close()
    errors = [row.error for row in store.ai_logs]
    assert errors == [None, "api_key_invalid", "RuntimeError"]


def test_a_wrong_configuration_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="Unknown GuardMiddleware option"):
        GuardWSGIMiddleware(plain_app, rulez=[])
