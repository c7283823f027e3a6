"""The step interface (`middleware/steps.py`): what a step answers before the app, what the
runner does with it, and that a request with nothing to decide in the store awaits nothing."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import httpx
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from convex_guard import (
    HOUR,
    ApiKeyMiddleware,
    BotDetectionMiddleware,
    FixedWindow,
    GuardMiddleware,
    KeyRoute,
    MemoryStore,
    RateLimitMiddleware,
    Rule,
)
from convex_guard.core.limits import LimitResult
from convex_guard.core.problem import problem
from convex_guard.middleware.body import BodyTooLarge, read_body
from convex_guard.middleware.context import ROUTE_CACHE_SIZE, GuardContext, LogEntry, route_of
from convex_guard.middleware.order import (
    API_KEYS,
    BOT,
    FINGERPRINT,
    LOGGER,
    RATE_LIMIT,
)
from convex_guard.middleware.steps import (
    Before,
    FinishingStep,
    Refusal,
    StepMiddleware,
    StepRunner,
)

from .conftest import serve
from .e2e_checks import BROWSER, GPTBOT


class Deny(StepMiddleware):
    """Refuses a request carrying `x-deny` (synchronously, or after an await with `x-later`)."""

    marker = "Deny"

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        headers = dict(scope["headers"])
        if b"x-deny" in headers:
            return problem(418, "Denied")
        if b"x-later" in headers:
            return self._later()
        return None

    async def _later(self) -> Refusal | None:
        return problem(451, "Denied later")


class Tag(StepMiddleware):
    """Asks for a response header, and records what it saw after the app."""

    marker = "Tag"

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.seen: list[tuple[int, str | None]] = []

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> None:
        ctx.response_headers = [(b"x-tag", b"1")]
        ctx.log_entry = LogEntry(None)

    def after(self, scope: Scope, ctx: GuardContext, raised: BaseException | None) -> None:
        assert ctx.log_entry is not None
        self.seen.append((ctx.status, type(raised).__name__ if raised else None))


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def boom(request: Request) -> PlainTextResponse:
    raise RuntimeError("boom")


def app() -> Starlette:
    return Starlette(routes=[Route("/", hello), Route("/boom", boom)])


def test_the_first_refusal_wins_and_later_steps_do_not_run() -> None:
    inner = app()
    tag = Tag(inner)
    runner = StepRunner(inner, [Deny(inner), tag])
    assert isinstance(tag, FinishingStep) and not isinstance(Deny(inner), FinishingStep)
    with serve(runner) as server, httpx.Client(base_url=server.url) as client:
        denied = client.get("/", headers={"x-deny": "1"})
        later = client.get("/", headers={"x-later": "1"})
        passed = client.get("/")
    assert denied.status_code == 418 and "x-tag" not in denied.headers
    assert later.status_code == 451 and later.json()["title"] == "Denied later"
    assert passed.status_code == 200 and passed.headers["x-tag"] == "1"
    # Only the request that got to the tag step was finished by it: with the status sent.
    assert tag.seen == [(200, None)]


def test_a_finishing_step_gets_the_status_and_what_was_raised() -> None:
    inner = app()
    tag = Tag(inner)
    with serve(tag) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/").headers["x-tag"] == "1"
        assert client.get("/boom").status_code == 500
    assert tag.seen == [(200, None), (500, "RuntimeError")]


def scope_for(path: str, agent: str, **headers: str) -> dict[str, Any]:
    raw = [(b"user-agent", agent.encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "headers": raw,
        "client": ("203.0.113.7", 4000),
    }


async def no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def test_nothing_to_decide_in_the_store_awaits_nothing() -> None:
    store = MemoryStore()
    keys = ApiKeyMiddleware(None, store=store, routes=[KeyRoute("/api/ai", required=False)])  # type: ignore[arg-type]
    bots = BotDetectionMiddleware(None, store=store)  # type: ignore[arg-type]
    limiter = RateLimitMiddleware(
        None,  # type: ignore[arg-type]
        store=store,
        rules=[Rule("ai", FixedWindow(rate=10, period=HOUR), path="/api/ai")],
    )
    person = scope_for("/api/ai/openai/chat", BROWSER)
    ctx = GuardContext(route_of(person), fingerprint="f", client_ip="203.0.113.7")
    # Anonymous on an optional-key route, and a browser: synchronous, nothing to await.
    assert keys.before(person, no_body, ctx) is None
    assert bots.before(person, no_body, ctx) is None
    # A presented key and a crawler each need the store: a decision, which the runner awaits.
    keyed = scope_for("/api/ai/openai/chat", BROWSER, authorization="Bearer cg_ai_x")
    # A context per request: it holds the headers read from its own request.
    keyed_ctx = GuardContext(route_of(keyed), fingerprint="f", client_ip="203.0.113.7")
    decision = keys.before(keyed, no_body, keyed_ctx)
    assert inspect.iscoroutine(decision)
    refusal = await decision
    assert callable(refusal) and keyed_ctx.rejected == "api_key_invalid"
    flagged = scope_for("/api/ai/openai/chat", GPTBOT)
    crawler = bots.before(flagged, no_body, GuardContext(route_of(flagged), fingerprint="g"))
    assert inspect.iscoroutine(crawler) and callable(await crawler)
    # A MemoryStore's limits are decided in the call itself, with nothing to await (its
    # decision core waits for nothing); off the limited routes the limiter does nothing.
    assert limiter.before(person, no_body, ctx) is None
    assert ctx.limits["ai"].ok and ctx.limits["ai"].remaining == 9
    assert [name for name, _ in ctx.response_headers or ()] == [b"ratelimit-policy", b"ratelimit"]
    elsewhere = scope_for("/x", BROWSER)
    assert limiter.before(elsewhere, no_body, GuardContext(route_of(elsewhere))) is None


class Peek(StepMiddleware):
    """Reads the body before the app (at most 16 bytes), twice, as two steps would."""

    marker = "Peek"

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.seen: list[bytes] = []

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        return self._read(receive, ctx) if scope["type"] == "http" else None

    async def _read(self, receive: Receive, ctx: GuardContext) -> Refusal | None:
        try:
            first = await read_body(ctx, receive, 16)
        except BodyTooLarge as exc:
            return problem(413, f"over {exc.limit}")
        again = await read_body(ctx, receive, 16)
        assert again is first  # read once, whoever asks
        self.seen.append(first)
        return None


async def echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse((await request.body()).decode())


def test_a_step_that_reads_the_body_hands_the_app_the_same_bytes() -> None:
    peek = Peek(Starlette(routes=[Route("/", echo, methods=["POST"])]))

    def chunks(*parts: bytes) -> Any:
        yield from parts  # sent chunked: the body arrives in several messages

    with serve(peek) as server, httpx.Client(base_url=server.url) as client:
        whole = client.post("/", content=b"hello")
        streamed = client.post("/", content=chunks(b"he", b"ll", b"o!"))
        big = client.post("/", content=chunks(b"x" * 10, b"y" * 10, b"z" * 10))
    assert whole.text == "hello" and streamed.text == "hello!"
    assert big.status_code == 413 and big.json()["title"] == "over 16"
    assert peek.seen == [b"hello", b"hello!"]


class Counted(StepMiddleware):
    """A step with something to do only under `/only`: counts what it is asked and runs."""

    marker = "Counted"

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.asked: list[tuple[str, str]] = []
        self.ran: list[str] = []

    def applies_to(self, route: tuple[str, str]) -> bool:
        self.asked.append(route)
        return route[1].startswith("/only")

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        self.ran.append(scope["path"])
        return None


@given(paths=st.lists(st.sampled_from(["/", "/only", "/only/x", "/other"]), max_size=12))
def test_a_step_runs_only_where_it_applies_and_is_asked_once_per_route(paths: list[str]) -> None:
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        pass

    async def run() -> None:
        for path in paths:
            await step(
                {"type": "http", "method": "GET", "path": path, "headers": []}, receive, send
            )

    step = Counted(inner)
    asyncio.run(run())
    assert step.ran == [path for path in paths if path.startswith("/only")]
    assert step.asked == list(dict.fromkeys(("GET", path) for path in paths))


def test_the_plan_cache_stays_bounded() -> None:
    step = Counted(None)
    for number in range(ROUTE_CACHE_SIZE + 5):
        step.plan(("GET", f"/only/{number}"))
    assert len(step._plans) <= ROUTE_CACHE_SIZE
    assert step.plan(("GET", "/only/1")).steps == (step,)


def test_each_route_of_a_guard_runs_only_the_steps_with_something_to_do() -> None:
    guard = GuardMiddleware(
        app(),
        store=MemoryStore(),
        rules=[Rule("ai", FixedWindow(rate=10, period=HOUR), path="/api/ai")],
        bot_allow_paths=["/status"],
    )
    stack = guard.guard
    validating = stack.validation
    assert stack.keys and stack.bots and stack.limiter and validating is not None

    def planned(method: str, path: str) -> set[str]:
        plan = guard.plan((method, path))
        # The app behind validation's answering wrapper only where validation runs.
        assert (plan.app is validating.app) == (validating in plan.steps)
        return {step.marker for step in plan.steps}

    validation = validating.marker
    everything = {LOGGER, FINGERPRINT, API_KEYS, BOT, RATE_LIMIT, validation}
    assert planned("POST", "/api/ai/openai/chat") == everything
    assert planned("POST", "/api/embeddings") == everything
    # No provider in the path: not logged, while the key route and body rule still hold.
    assert planned("POST", "/api/ai") == everything - {LOGGER}
    # Off every configured route: the client's address, bots and the limiter only.
    assert planned("GET", "/elsewhere") == {FINGERPRINT, BOT, RATE_LIMIT}
    # Not checked for bots there; and the limiter stays wherever a bot check may be
    # deferred to it.
    assert planned("GET", "/status") == {FINGERPRINT, RATE_LIMIT}
    for route in guard._plans:
        markers = {step.marker for step in guard._plans[route].steps}
        assert BOT not in markers or RATE_LIMIT in markers


def test_two_recorded_decisions_both_reach_limits() -> None:
    """Two rate limiters deciding one request (stacked by hand): each one's results are in
    `ctx.limits`, with what another middleware put there, whenever it is read."""
    ctx = GuardContext(("GET", "/"))
    ctx.limits["apiKey"] = LimitResult(True, None, 4.0, 10.0)
    ctx.decide(("a",), [(True, None, 9.0, 100.0)])
    ctx.decide(("b", "c"), [(True, None, 1.0, 5.0), (False, 30.0, 0.0, 60.0)])
    assert {name: result.remaining for name, result in ctx.limits.items()} == {
        "apiKey": 4.0,
        "a": 9.0,
        "b": 1.0,
        "c": 0.0,
    }
    assert ctx.limits["c"] == LimitResult(False, 30.0, 0.0, 60.0)
    ctx.limits = {}  # replaced by an app: nothing recorded comes back
    assert dict(ctx.limits) == {}
