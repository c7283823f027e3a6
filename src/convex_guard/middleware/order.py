"""Start-up checks of the middleware order, carried by the ASGI lifespan.

The lifespan scope passes through every middleware, outermost first, before the server takes
a request. Each guard middleware appends its name to a list in the lifespan scope's `state`;
one that needs another outside it (the bot check needs a fingerprint, an `"api_key"` rule needs
the key middleware) finds the list lacking that name and fails the start-up with
`lifespan.startup.failed`, naming the middleware to add and where. A middleware that needs one
inside it (a deferred bot check needs the rate limiter) checks when the startup message goes
by, since every inner middleware has marked itself by then.

Without lifespan (`--lifespan off`, or a server that has none) nothing is checked: the
middlewares then do what they can per request (the bot check logs an error once and escalates
per client IP; an `"api_key"` or `"fingerprint"` rule never applies).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import Message, Receive, Scope, Send

from convex_guard.core.errors import ConfigurationError

STACK_KEY = "convex_guard.stack"

LOGGER = "RequestLoggerMiddleware"
FINGERPRINT = "FingerprintMiddleware"
API_KEYS = "ApiKeyMiddleware"
BOT = "BotDetectionMiddleware"
RATE_LIMIT = "RateLimitMiddleware"

#: The order of docs/architecture.md ("The request flow"), outermost first, for messages.
ORDER = (LOGGER, FINGERPRINT, API_KEYS, BOT, RATE_LIMIT)

HINT = (
    "With Starlette/FastAPI `app.add_middleware`, the middleware added LAST runs outermost; "
    "GuardMiddleware stacks all five in the right order."
)


def mark(scope: Scope, name: str) -> list[str]:
    """Record `name` as present in this lifespan's stack; returns the stack so far (outer first)."""
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    stack: list[str] = state.setdefault(STACK_KEY, [])
    stack.append(name)
    return stack


def missing_outside(stack: list[str], name: str, needs: str, why: str) -> str | None:
    """The error message when `needs` does not run outside `name`, else None."""
    if needs in stack[:-1]:
        return None
    return f"{name} {why}: add {needs} outside (before) it. {HINT}"


async def fail_startup(message: str, receive: Receive, send: Send) -> None:
    """Refuse the server's start-up: answer `lifespan.startup.failed`, then raise.

    Answering (rather than only raising) matters: uvicorn's default `lifespan="auto"` takes an
    exception before any answer to mean "no lifespan support" and would serve anyway.
    """
    first = await receive()
    if first["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": message})
    raise ConfigurationError(message)


def check_inside(
    stack: list[str], check: Callable[[list[str]], str | None], receive: Receive, send: Send
) -> Receive:
    """A `receive` that runs `check` on the whole stack when the startup message goes by."""
    position = len(stack)

    async def checked_receive() -> Message:
        message = await receive()
        if message["type"] == "lifespan.startup":
            problem = check(stack[position:])
            if problem is not None:
                await send({"type": "lifespan.startup.failed", "message": problem})
                raise ConfigurationError(problem)
        return message

    return checked_receive
