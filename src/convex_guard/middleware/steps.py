"""The one code path of a guarded request: each middleware is a `Step`, run by `StepRunner`.

A step does its part of a request before the app (fill the guard context, or refuse), and
the logger's also after it (the request's row). `StepRunner` runs a sequence of steps around an
app: each middleware runs its own one step (`StepMiddleware`), `GuardMiddleware` the steps of
the whole stack in one loop, so a stack built by hand and the guard answer alike.

Which steps run is decided once per route, not per request: a step says where it has
something to do (`applies_to`), and the runner keeps, per (method, path), the `Plan` of the
steps that do (`StepRunner.plan`), so a route runs only those.

A step's `before` is synchronous, so a request with nothing to decide in the store awaits
nothing: when it has something to await (a store call), it answers the coroutine that decides
it, and the runner awaits that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any, Protocol, runtime_checkable

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convex_guard.core.logs import ThrottledLog, logger, printable
from convex_guard.core.problem import refuse
from convex_guard.core.streamusage import UsageReader
from convex_guard.middleware.context import (
    GuardContext,
    Route,
    Usage,
    guard_context,
    remember,
)
from convex_guard.middleware.logwriter import LogWriter, run_lifespan
from convex_guard.middleware.order import check_inside, fail_startup, mark

#: What a step answers instead of the app: an ASGI app (a problem response, a challenge page).
Refusal = ASGIApp
#: A decision a step awaits (a store call); it answers the refusal, or None to go on.
Decision = Coroutine[Any, Any, Refusal | None]
#: What a step's `before` answers: None to go on, the refusal to send, or a decision to await.
#: A refusal is callable (an ASGI app) and a decision is not, which is how they are told apart.
Before = Refusal | Decision | None


class Step(Protocol):
    """One middleware's part of a request, and of the lifespan.

    `before` runs before the app, in the stack's order; the first refusal wins and the steps
    after it do not run. A step that wants response headers added (the rate limiter's
    `RateLimit-Policy`/`RateLimit`) puts them in `ctx.response_headers`.
    """

    #: The name the lifespan's order checks know this step by (`middleware/order.py`).
    marker: str

    def applies_to(self, route: Route) -> bool:
        """Whether the step has anything to do on requests to `route` (method, path as
        `context.route_of` names them). Asked once per route, when its plan is made: it must
        depend on the route alone. `before` (and `after`) run only where it is true."""
        ...

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        """Fill the context; None to go on, a refusal, or a decision to await (see `Before`)."""
        ...

    def order_problem(self, outside: list[str]) -> str | None:
        """What is wrong with the middlewares outside this one (`outside`: outermost first,
        this one last), checked as the lifespan passes in; None when nothing is."""
        ...

    def inside_problem(self, inside: list[str]) -> str | None:
        """What is wrong with the middlewares inside this one, checked when the startup
        message goes by (every inner one has marked itself then); None when nothing is."""
        ...

    def writers(self) -> tuple[LogWriter, ...]:
        """The log writers this step fills: started at lifespan startup, flushed at shutdown."""
        ...


@runtime_checkable
class FinishingStep(Step, Protocol):
    """A step with a part after the app too: the request logger's row.

    A runner with such a step records the response's status in `ctx.status`, and takes a
    client gone mid-body (Starlette's `ClientDisconnect`) as the request's end: one debug line,
    not an exception for the server to log. For a `text/event-stream` response it reads the
    stream as it is sent (`core.streamusage`) and, before any `after` runs, fills what the
    app did not report in `ctx.usage` from it (see `stream_usage`).
    """

    def after(self, scope: Scope, ctx: GuardContext, raised: BaseException | None) -> None:
        """The request is over: `raised` is what the app (or a step) raised, else None."""
        ...


class StepRunner:
    """Runs `steps` around `app` on HTTP requests and WebSocket handshakes.

    The before-steps in order, the first refusal wins (sent with `core.problem.refuse`, so a
    WebSocket handshake is refused before accept); one wrapped `send` adds the headers the
    steps asked for to the response start (or the WebSocket accept) and records the status for
    the after-steps, which run in `finally` with what was raised: each one whose before-step
    ran, as each middleware of a stack finishes only the requests that reached it. Other
    scopes pass through to `app`, the lifespan through `lifespan`.
    """

    def __init__(self, app: ASGIApp, steps: Sequence[Step]) -> None:
        self.app = app
        self.steps = tuple(steps)
        self._plans: dict[Route, Plan] = {}
        # With a finishing step anywhere, a client gone mid-body is the request's end on
        # every route, logged or not (see `FinishingStep`).
        self._finishing = any(isinstance(step, FinishingStep) for step in self.steps)
        self._stream_trouble = ThrottledLog()

    def plan(self, route: Route) -> Plan:
        """The steps that run on `route`, decided on its first request and kept."""
        plans = self._plans
        found = plans.get(route)
        if found is None:
            steps = [step for step in self.steps if step.applies_to(route)]
            found = remember(plans, route, self._make_plan(steps))
        return found

    def _make_plan(self, steps: list[Step]) -> Plan:
        """The plan of `steps` around this runner's app (a subclass may pick another app)."""
        return Plan(steps, self.app)

    def context(self, scope: Scope) -> GuardContext | None:
        """The request's guard context, or None to hand the request to the app unguarded."""
        return guard_context(scope)

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                await self.lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        ctx = self.context(scope)
        if ctx is None:
            await self.app(scope, receive, send)
            return
        route = ctx.route
        plan = self._plans.get(route) or self.plan(route)  # a known route costs no call
        if not plan.befores and not self._finishing:  # nothing to do: as if it were not there
            await plan.app(scope, receive, send)
            return
        afters = plan.afters
        raised: BaseException | None = None
        started = 0  # the before-steps started: as far as a stack of middlewares would get
        try:
            refusal: Refusal | None = None
            for before in plan.befores:
                started += 1
                outcome = before(scope, receive, ctx)
                if outcome is None:
                    continue
                if not callable(outcome):  # a decision to await
                    outcome = await outcome
                    if outcome is None:
                        continue
                refusal = outcome
                break
            headers = ctx.response_headers
            if headers is not None:
                ctx.response_headers = None  # this runner adds them; an outer one must not
            logged = ctx.log_entry is not None if afters else False
            if logged or headers is not None:
                send = partial(
                    _response_send if kind == "http" else _handshake_send,
                    send,
                    logged,
                    headers,
                    ctx,
                )
            if refusal is None:
                replaced = ctx.receive
                if replaced is not None:
                    ctx.receive = None  # this runner hands it on; an outer one must not
                    receive = replaced
                await plan.app(scope, receive, send)
            else:
                await refuse(refusal, scope, receive, send)
        except ClientDisconnect as exc:
            if not self._finishing:
                raise
            raised = exc
            client_gone(scope)
        except BaseException as exc:
            raised = exc
            raise
        finally:
            stream = ctx.stream
            if stream is not None:
                # The innermost runner to finish reads it, before its own after-steps (a
                # settlement needs the usage); the runners outside find the usage filled.
                ctx.stream = None
                stream_usage(ctx, stream, self._stream_trouble)
            for position, after in afters:
                if position < started:
                    after(scope, ctx, raised)


class Plan:
    """What a runner does on one route: the steps with something to do there, in order.

    `befores` are their bound `before` methods; `afters` each finishing step's `after` with
    its position among them (it runs when its own before-step did); `app` what the request
    goes to once they let it through.
    """

    __slots__ = ("afters", "app", "befores", "steps")

    def __init__(self, steps: Sequence[Step], app: ASGIApp) -> None:
        self.steps = tuple(steps)
        self.app = app
        # The bound methods, taken once per route: read on every request.
        self.befores: tuple[Callable[[Scope, Receive, GuardContext], Before], ...] = tuple(
            step.before for step in self.steps
        )
        self.afters: tuple[
            tuple[int, Callable[[Scope, GuardContext, BaseException | None], None]], ...
        ] = tuple(
            (position, step.after)
            for position, step in enumerate(self.steps)
            if isinstance(step, FinishingStep)
        )


async def _response_send(
    send: Send,
    logged: bool,
    headers: list[tuple[bytes, bytes]] | None,
    ctx: GuardContext,
    message: Message,
) -> None:
    """The `send` a runner hands on when it logs the request or adds headers (bound with
    `partial`: one C object per request, no class of our own to build): it records the
    status in `ctx` and adds `headers` to the response start.

    A logged event-stream response (`Content-Type: text/event-stream`) gets a `UsageReader`
    in `ctx.stream`, fed each body chunk after it is handed on (nothing is held back: the
    client gets every chunk as the app sends it); other logged responses pay a look at
    their content type.
    """
    if message["type"] == "http.response.start":
        ctx.status = message["status"]
        if logged:
            # Inline: every logged response passes here. ASGI header names are
            # lower case; a media type may be in any case.
            for name, value in message.get("headers", ()):
                if name == b"content-type":
                    if value[:17].lower() == b"text/event-stream":
                        ctx.stream = UsageReader()
                    break
        if headers is not None:
            message["headers"] = [*message.get("headers", ()), *headers]
        await send(message)
        return
    await send(message)
    # The logging runner's alone: in a stack of middlewares every runner wrapping `send`
    # sees each chunk, and the stream's reader is the request's, fed once.
    reader = ctx.stream if logged else None
    if reader is not None:
        try:
            if reader.feed(message.get("body", b"")):
                ctx.first_output = time.perf_counter()
        except Exception:  # a bug in the reader must not break the app's stream
            logger.exception("Stream usage reader failed; the stream is not read")
            ctx.stream = None


async def _handshake_send(
    send: Send,
    logged: bool,
    headers: list[tuple[bytes, bytes]] | None,
    ctx: GuardContext,
    message: Message,
) -> None:
    """`_response_send` for a WebSocket handshake: refused before accept, or accepted (the
    fields go on the accept). A logged handshake's status is its first message's."""
    if logged and not ctx.status:
        ctx.status = handshake_status(message)
    if headers is not None and message["type"] == "websocket.accept":
        message["headers"] = [*message.get("headers", ()), *headers]
    await send(message)


def stream_usage(ctx: GuardContext, reader: UsageReader, trouble: ThrottledLog) -> None:
    """Fill what the app did not report (`report_usage` wins) in `ctx.usage` from a stream.

    `tokens` is the usage event's `total_tokens` (or prompt + completion); without a valid
    usage event (the client went away first, the upstream was not asked for one, or its
    numbers were not token counts: logged, then ignored) it is the completion tokens the
    text sent amounts to (`UsageReader.estimated_completion_tokens`, four characters a
    token; 0 when it was cut off before any), once the stream was seen to be of that shape;
    the prompt is not in it (`completion_only`: a settlement adds the prompt's estimate).
    `model` is the stream's own.
    """
    if reader.problem is not None:
        trouble.warning("Stream usage event ignored: %s", reader.problem)
    usage = ctx.usage
    if usage is None:
        usage = ctx.usage = Usage()
    if usage.model is None and reader.model is not None:
        usage.model = reader.model
    if usage.tokens is None:
        read = reader.usage
        if read is not None:
            total = read.total_tokens
            if total is None:  # one of the two alone (the reader adds them up when both came)
                total = read.completion_tokens
                if total is None:
                    total = read.prompt_tokens
            usage.tokens = total
        elif reader.chunks or reader.tokens_seen or reader.done:
            usage.tokens = reader.estimated_completion_tokens
            usage.completion_only = True


def handshake_status(message: Message) -> int:
    """The status a WebSocket handshake's row records from the first message the app sends.

    101 when accepted (a connection accepted and later closed stays one row, of 101), the
    HTTP answer's status when refused through the `websocket.http.response` extension, 403
    for a close before accept (the server answers 403 to it). 0 for anything else.
    """
    kind = message["type"]
    if kind == "websocket.accept":
        return 101
    if kind == "websocket.http.response.start":
        status: int = message["status"]
        return status
    if kind == "websocket.close":
        return 403
    return 0


def client_gone(scope: Scope) -> None:
    """One debug line for a request whose client went away mid-body (Starlette raises
    `ClientDisconnect`): routine on the internet, not an error worth a traceback."""
    logger.debug(
        "Client disconnected mid-request: %s %s",
        printable(scope.get("method", "")),
        printable(scope.get("path", "")),
    )


class StepMiddleware(StepRunner):
    """A middleware that is one step: its `__call__` runs that step around `app`.

    Its lifespan part is the same for every middleware: mark itself in the lifespan scope,
    fail the start-up on an order problem, and start and flush its writers around the app's
    lifespan. Subclasses implement `before` (and the logger `after`).
    """

    marker: str

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, (self,))

    def applies_to(self, route: Route) -> bool:
        return True

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        raise NotImplementedError

    def order_problem(self, outside: list[str]) -> str | None:
        return None

    def inside_problem(self, inside: list[str]) -> str | None:
        return None

    def writers(self) -> tuple[LogWriter, ...]:
        return ()

    async def lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        stack = mark(scope, self.marker)
        problem = self.order_problem(stack)
        if problem is not None:
            await fail_startup(problem, receive, send)
        receive = check_inside(stack, self.inside_problem, receive, send)
        writers = self.writers()
        if writers:
            await run_lifespan(self.app, writers, scope, receive, send)
        else:
            await self.app(scope, receive, send)


__all__ = [
    "Before",
    "Decision",
    "FinishingStep",
    "Plan",
    "Refusal",
    "Step",
    "StepMiddleware",
    "StepRunner",
]
