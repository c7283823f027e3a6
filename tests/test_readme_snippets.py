"""The README's framework snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from .conftest import serve
from .wsgi_server import serve_wsgi

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def snippet(heading: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, heading
    return match.group(1)


def run(code: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": __name__}  # Flask(__name__) needs a real module
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture(autouse=True)
def memory_store(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONVEX_SELF_HOSTED_URL", "CONVEX_URL"):
        monkeypatch.delenv(name, raising=False)


def test_fastapi_in_ten_lines() -> None:
    app = run(snippet("## FastAPI in ten lines"))["app"]
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        ok = c.post("/api/ai/openai/chat")
        assert ok.json() == {"provider": "openai"}
        assert "openaiRequests" in ok.headers["RateLimit-Policy"]
        assert (
            c.post("/api/ai/openai/chat", headers={"user-agent": "GPTBot/1.2"}).status_code == 403
        )
    guard = app.middleware_stack
    while not hasattr(guard, "writer"):
        guard = guard.app
    rows = [row for row in guard.store.ai_logs if row.success]
    assert [(r.model, r.tokens_used, r.cost) for r in rows] == [("gpt-4o-mini", 42, 0.0001)]


def test_flask_snippet() -> None:
    namespace = run(snippet("### Flask, or any WSGI app"))
    app = namespace["app"]
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as c:
        ok = c.post("/api/ai/groq/chat")
        assert ok.json() == {"provider": "groq"} and "groqRequests" in ok.headers["RateLimit"]
    app.wsgi_app.close()
    assert [(r.model, r.tokens_used) for r in app.wsgi_app.store.ai_logs] == [("gpt-4o-mini", 42)]


def test_starlette_snippet() -> None:
    app = run(snippet("### Starlette"))["app"]
    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        ok = c.post("/api/ai/groq/chat")
        assert ok.json() == {"provider": "groq"}
        assert "groqRequests" in ok.headers["RateLimit-Policy"]
        assert c.post("/api/ai/groq/chat", headers={"user-agent": "GPTBot/1.2"}).status_code == 403


def test_hand_stacked_snippet() -> None:
    namespace = run(snippet("### The five middlewares by hand"))
    app: FastAPI = namespace["app"]

    @app.post("/api/ai/{provider}/chat")
    async def chat(provider: str) -> dict[str, str]:
        return {"provider": provider}

    with serve(app, proxy_headers=False) as server, httpx.Client(base_url=server.url) as c:
        ok = c.post("/api/ai/openai/chat")  # the AI key route accepts anonymous callers
        assert ok.json() == {"provider": "openai"}
        assert "openaiRequests" in ok.headers["RateLimit-Policy"]
        assert c.post("/api/embeddings").status_code == 401  # the default routes: key required
        assert c.get("/api/admin/users").status_code == 401  # the snippet's own route
        assert (
            c.get("/api/admin/users", headers={"x-api-key": "cg_ai_" + "x" * 43}).status_code == 401
        )
        assert (
            c.post("/api/ai/openai/chat", headers={"user-agent": "GPTBot/1.2"}).status_code == 403
        )
    assert [row.provider for row in namespace["store"].ai_logs] == ["openai", "openai"]
