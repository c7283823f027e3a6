"""The README's framework snippets run as written, and every Python snippet type-checks."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from .conftest import serve
from .wsgi_server import serve_wsgi

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def snippet(heading: str) -> str:
    section = README.split(heading, 1)[1]
    match = PYTHON_BLOCK.search(section)
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


def test_store_snippet() -> None:
    asyncio.run(run(snippet("## The store"))["main"]())


def as_module(code: str) -> str:
    """A snippet as the module a reader would write. One that adds to an `app` it does not make
    continues the headline snippet (which makes it); one that imports Django allows Django's
    untyped decorators, as the project's own Django example does (Django ships no type hints)."""
    prelude = ""
    if "django" in code:
        prelude += "# mypy: allow-untyped-decorators\n"
    if re.search(r"^app\.", code, re.M) and not re.search(r"^app\s*[:=]", code, re.M):
        prelude += snippet("## FastAPI in ten lines")
    return prelude + code


@pytest.mark.slow
def test_every_python_snippet_type_checks(tmp_path: Path) -> None:
    """One `mypy --strict` run, with the project's configuration, over every Python snippet."""
    where: dict[str, tuple[int, int]] = {}  # file name: (README line of the snippet, prelude lines)
    files = []
    for number, match in enumerate(PYTHON_BLOCK.finditer(README)):
        module = as_module(match.group(1))
        name = f"readme_snippet_{number:02d}.py"
        (tmp_path / name).write_text(module)
        line = README.count("\n", 0, match.start(1)) + 1
        where[name] = (line, module.count("\n") - match.group(1).count("\n"))
        files.append(str(tmp_path / name))
    assert len(files) >= 9, "the README's Python snippets were not found"
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "pyproject.toml", *files],
        cwd=ROOT,  # the project's mypy cache: a warm run takes seconds
        env={**os.environ, "MYPYPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    def readme_line(found: re.Match[str]) -> str:
        line, prelude = where[found.group(1)]
        number = int(found.group(2)) - prelude
        return f"README.md:{line + number - 1}" if number > 0 else f"{found.group(1)} (prelude)"

    report = re.sub(r"\S*(readme_snippet_\d+\.py):(\d+)", readme_line, result.stdout)
    assert result.returncode == 0, report + result.stderr


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
