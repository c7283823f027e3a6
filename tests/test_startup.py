"""A bad setting stops the app at start-up, naming the setting, under every adapter.

Under uvicorn (real processes, `examples.gateway:app`, whose guard Starlette builds lazily on
its first call): the process exits at start-up with one line naming the variable and no
traceback; with `--lifespan off` every request gets a 500 problem naming it, logged once.
The WSGI and Django adapters raise the same line at construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
import websockets.exceptions
import websockets.sync.client as ws_client
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message

from convex_guard import ConfigurationError, GuardMiddleware, MemoryStore, load_environment
from convex_guard.wsgi import GuardWSGIMiddleware

from .fault_tools import ROOT, free_port

#: Long enough for a loaded 2-core machine; a server that keeps running fails the test.
EXIT_WITHIN = 45.0

CASES = [
    pytest.param(
        {"RATE_LIMIT_GLOBAL_REQUESTS": "abc-s3cr3t"}, "RATE_LIMIT_GLOBAL_REQUESTS", id="rate"
    ),
    pytest.param({"RATE_LIMIT_WINDOW_HOURS": "inf"}, "RATE_LIMIT_WINDOW_HOURS", id="window"),
    pytest.param(
        {"CONVEX_SELF_HOSTED_URL": "http://ops:s3cr3t@127.0.0.1:9"},
        "CONVEX_SELF_HOSTED_ADMIN_KEY",
        id="url-without-admin-key",
    ),
]


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any convex-guard variable, plus `variables`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("CONVEX_", "RATE_LIMIT_", "DATABASE_URL"))
    }
    # The worktree's source first: the venv's editable install may point elsewhere.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return {**env, **variables}


def uvicorn_process(env: dict[str, str], *options: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "examples.gateway:app", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--no-access-log", *options],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, f"http://127.0.0.1:{port}"


def lines_naming(text: str, variable: str) -> list[str]:
    return [line for line in text.splitlines() if variable in line]


@pytest.mark.parametrize(("variables", "named"), CASES)
def test_uvicorn_exits_at_startup_naming_the_variable(
    variables: dict[str, str], named: str
) -> None:
    process, url = uvicorn_process(environment(**variables))
    started = time.monotonic()
    try:
        out, err = process.communicate(timeout=EXIT_WITHIN)
    except subprocess.TimeoutExpired:
        answer = httpx.get(url + "/health", timeout=5)
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"uvicorn kept serving ({answer.status_code} on /health):\n{err[-2000:]}")
    elapsed = time.monotonic() - started
    assert process.returncode == 3  # uvicorn's "startup failed"
    (line,) = lines_naming(err, named)
    assert line.startswith("ERROR:") and "convex-guard: " in line
    assert "Traceback" not in out + err and "s3cr3t" not in out + err
    assert "Application startup failed. Exiting." in err
    assert elapsed < EXIT_WITHIN


@pytest.mark.parametrize(("variables", "named"), CASES)
def test_without_lifespan_every_request_gets_a_problem_naming_the_variable(
    variables: dict[str, str], named: str
) -> None:
    process, url = uvicorn_process(environment(**variables), "--lifespan", "off")
    try:
        deadline = time.monotonic() + EXIT_WITHIN
        while True:
            try:
                health = httpx.get(url + "/health", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        chat = httpx.post(url + "/api/ai/openai/chat", json={"model": "m", "messages": []})
        for response in (health, chat):
            assert response.status_code == 500
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert problem["status"] == 500 and named in problem["detail"]
            assert "s3cr3t" not in response.text
        # A WebSocket handshake gets the same answer, before any accept.
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            ws_client.connect(url.replace("http", "ws") + "/ws", open_timeout=10)
        assert refused.value.response.status_code == 500
        assert named in json.loads(refused.value.response.body or b"{}")["detail"]
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    # Three refused requests, one log line.
    (line,) = lines_naming(out + err, named)
    assert line.startswith("convex-guard: ")
    assert "Traceback" not in out + err and "s3cr3t" not in out + err


# -- in process: options given in code, a real uvicorn server ----------------------------------


def health_app(started: list[bool]) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started.append(True)
        yield

    return Starlette(
        routes=[Route("/health", lambda request: PlainTextResponse("ok"))], lifespan=lifespan
    )


def test_a_bad_option_refuses_the_startup_of_a_real_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app_started: list[bool] = []
    app = health_app(app_started)
    app.add_middleware(GuardMiddleware, store=MemoryStore(), timeout=0)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="auto", log_config=None)
    server = uvicorn.Server(config)
    with caplog.at_level("INFO"), pytest.raises(SystemExit) as exited:
        asyncio.run(asyncio.wait_for(server.serve(), EXIT_WITHIN))
    assert exited.value.code == 3  # uvicorn's "startup failed"
    assert not server.started and not app_started  # the app's own start-up never ran
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert failures == [
        "convex-guard: timeout must be a positive number of seconds",
        "Application startup failed. Exiting.",
    ]


def test_a_guard_that_starts_has_no_error() -> None:
    guard = GuardMiddleware(PlainTextResponse("ok"), store=MemoryStore())
    assert guard.error is None and type(guard) is GuardMiddleware


async def test_misconfigured_websocket_without_http_response_extension_closes_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from convex_guard.middleware.guard import MisconfiguredGuard

    guard = GuardMiddleware(PlainTextResponse("ok"), stor=MemoryStore())
    assert isinstance(guard, MisconfiguredGuard)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    for _ in range(3):
        await guard({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
    closed = {"type": "websocket.close", "code": 1011, "reason": "Internal Server Error"}
    assert sent == [closed] * 3
    logged = [r.getMessage() for r in caplog.records if "Unknown GuardMiddleware" in r.getMessage()]
    assert len(logged) == 1


# -- WSGI and Django: raised at construction, the same line -------------------------------------


def plain_wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


@pytest.fixture
def bad_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in list(os.environ):
        if name.startswith(("CONVEX_", "RATE_LIMIT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RATE_LIMIT_GLOBAL_REQUESTS", "abc-s3cr3t")
    yield "RATE_LIMIT_GLOBAL_REQUESTS"


def asgi_line() -> str:
    from convex_guard.middleware.guard import MisconfiguredGuard

    guard = GuardMiddleware(PlainTextResponse("ok"))
    assert isinstance(guard, MisconfiguredGuard)
    return guard.message


def test_wsgi_raises_the_same_line_at_construction(bad_environment: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        GuardWSGIMiddleware(plain_wsgi)
    line = str(raised.value)
    assert bad_environment in line and "\n" not in line and "s3cr3t" not in line
    assert asgi_line() == f"convex-guard: {line}"


def test_django_raises_the_same_line_when_the_handler_is_built(bad_environment: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
    import django

    django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    native = ["convex_guard.django.DjangoGuardMiddleware"]
    with override_settings(MIDDLEWARE=native), pytest.raises(ConfigurationError) as raised:
        WSGIHandler()
    line = str(raised.value)
    assert bad_environment in line and "\n" not in line and "s3cr3t" not in line
    assert asgi_line() == f"convex-guard: {line}"


# -- the environment's messages ------------------------------------------------------------------

VARIABLES = ["RATE_LIMIT_GLOBAL_REQUESTS", "RATE_LIMIT_WINDOW_HOURS", "RATE_LIMIT_SHARDS"]


@settings(max_examples=150, deadline=None)
@given(
    variable=st.sampled_from(VARIABLES),
    value=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00")),
)
def test_a_bad_rate_limit_variable_is_named_never_echoed(variable: str, value: str) -> None:
    secret = "s3cr3t" + value
    saved = {name: os.environ.pop(name, None) for name in VARIABLES}
    os.environ[variable] = secret
    try:
        with pytest.raises(ConfigurationError) as raised:
            load_environment()
    finally:
        for name, old in saved.items():
            os.environ.pop(name, None)
            if old is not None:
                os.environ[name] = old
    message = str(raised.value)
    assert variable in message and "\n" not in message and "s3cr3t" not in message
