"""The bot check's verdict memo on a repeated client's headers: the default classifier is
asked once per header set, a classifier of your own on every request, and the memo never
answers for another agent or another classifier."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from convex_guard import GuardMiddleware, GuardSettings, MemoryStore
from convex_guard.core.useragent import UserAgentVerdict, classify_user_agent
from convex_guard.middleware import botdetection
from convex_guard.middleware.context import guard_context

from .conftest import serve

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
BLOCK_AI: dict[Any, Any] = {"ai_crawler": "block"}


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hi")


def guarded(**options: Any) -> Starlette:
    settings = GuardSettings(store=MemoryStore(), rules=[], key_routes=(), **options)
    app = Starlette(routes=[Route("/", hello)])
    app.add_middleware(GuardMiddleware, settings=settings)
    return app


async def get(app: Starlette, agent: str, times: int) -> list[int]:
    """`times` requests with `agent` to `app` served by uvicorn, over one keep-alive
    connection: a repeated client, as the memo serves it."""

    def run() -> list[int]:
        with serve(app) as running, httpx.Client(base_url=running.url, timeout=10) as client:
            return [
                client.get("/", headers={"user-agent": agent}).status_code for _ in range(times)
            ]

    return await asyncio.to_thread(run)


class Counting:
    """The default classifier, counting its calls."""

    def __init__(self, answer: Any = classify_user_agent) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, ua: str) -> UserAgentVerdict:
        self.calls += 1
        verdict: UserAgentVerdict = self.answer(ua)
        return verdict


async def test_the_default_classifier_is_asked_once_per_repeated_header_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counting = Counting()
    # The middleware knows the default classifier by identity: count the default's calls.
    monkeypatch.setattr(botdetection, "classify_user_agent", counting)
    app = guarded(bot_classifier=counting)
    agent = BROWSER.replace("131", "977")  # a header set no other test has read
    assert await get(app, agent, 5) == [200] * 5
    assert counting.calls == 1


async def test_a_classifier_of_your_own_is_asked_on_every_request() -> None:
    answers = iter(
        [UserAgentVerdict(False, None, None)] * 2 + [UserAgentVerdict(True, "scanner", "x")]
    )
    counting = Counting(lambda ua: next(answers))
    app = guarded(bot_classifier=counting)
    agent = BROWSER.replace("131", "978")
    # Its third answer (a blocklist it reloaded, say) holds at once for a known header set.
    assert await get(app, agent, 3) == [200, 200, 403]
    assert counting.calls == 3


async def test_a_memo_another_classifier_left_is_not_this_checks_answer() -> None:
    seen: list[Any] = []

    async def spy(request: Request) -> PlainTextResponse:
        seen.append(guard_context(request.scope).headers)
        return PlainTextResponse("hi")

    settings = GuardSettings(store=MemoryStore(), rules=[], key_routes=(), bot_policy=BLOCK_AI)
    app = Starlette(routes=[Route("/", spy)])
    app.add_middleware(GuardMiddleware, settings=settings)
    agent = BROWSER.replace("131", "979")
    assert await get(app, agent, 1) == [200]
    headers = seen[0]
    assert headers.verdict is not None and headers.verdict[0] is classify_user_agent
    # Another check's memo on the shared headers, saying "AI crawler": not this one's answer.
    headers.verdict = (object(), headers.user_agent, UserAgentVerdict(True, "ai_crawler", "x"))
    assert await get(app, agent, 1) == [200]
    # This classifier's own memo is its answer (what makes a repeated client cheap).
    headers.verdict = (
        classify_user_agent,
        headers.user_agent,
        UserAgentVerdict(True, "ai_crawler", "x"),
    )
    assert await get(app, agent, 1) == [403]
