"""The rate limiter's fast path for token and cost rules (body estimated, one call of the
MemoryStore's decision core) held equal to its general path (`store.check`)."""

from __future__ import annotations

import inspect
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import Response

from convex_guard import MINUTE, FixedWindow, MemoryStore, RateLimitMiddleware, Rule, TokenBucket
from convex_guard.core.limits import LimitConfig
from convex_guard.middleware.context import GuardContext, route_of
from convex_guard.middleware.rules import KeyKind, RateLimitItems, Unit

from .test_ratelimit_plan import Clock, GeneralPath

_configs: st.SearchStrategy[LimitConfig] = st.one_of(
    st.builds(TokenBucket, rate=st.sampled_from([300, 1_000]), period=st.just(MINUTE)),
    st.builds(
        FixedWindow,
        rate=st.sampled_from([300, 1_000]),
        period=st.just(MINUTE),
        start=st.sampled_from([None, 0]),
    ),
)
_keys: st.SearchStrategy[KeyKind] = st.sampled_from(["global", "ip", "user", "fingerprint"])


@st.composite
def _rules(draw: st.DrawFn) -> list[Rule]:
    rules = [
        Rule(f"r{i}", FixedWindow(rate=draw(st.integers(1, 4)), period=MINUTE), key=draw(_keys))
        for i in range(draw(st.integers(0, 2)))
    ]
    for i in range(draw(st.integers(1, 2))):
        unit: Unit = draw(st.sampled_from(["tokens", "cost"]))
        rules.append(
            Rule(
                f"t{i}",
                draw(_configs),
                key=draw(_keys),
                unit=unit,
                prices={"m": 2.0} if unit == "cost" else None,
                shadow=draw(st.booleans()),
                max_body=draw(st.sampled_from([64, 4096])),
            )
        )
    return rules


_bodies = st.sampled_from(
    [
        b"",
        b"not json",
        b"[1, 2]",
        json.dumps({"model": "m", "max_tokens": 40, "prompt": "hello"}).encode(),
        json.dumps({"model": "x", "max_tokens": 400, "messages": [{"content": "hi"}]}).encode(),
        json.dumps({"max_tokens": 2_000}).encode(),
        json.dumps({"model": "m", "prompt": "y" * 200}).encode(),
    ]
)
_requests = st.lists(
    st.tuples(
        st.sampled_from([0, 250, 5_000, 61_000]),  # ms elapsed before
        st.sampled_from(["198.51.100.1", "198.51.100.2"]),
        st.sampled_from([None, "u1"]),  # user
        st.sampled_from([None, "f1"]),  # fingerprint
        _bodies,
    ),
    min_size=1,
    max_size=20,
)


async def _decide(limiter: RateLimitMiddleware, step: tuple[Any, ...]) -> tuple[Any, ...]:
    """One POST through `limiter.before`: everything it answered and left in the context."""
    _, ip, user, fingerprint, body = step
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "root_path": "",
        "headers": [],
        "client": (ip, 4000),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    ctx = GuardContext(route_of(scope), client_key=ip, user_id=user, fingerprint=fingerprint)
    answer: Any = limiter.before(scope, receive, ctx)
    if inspect.iscoroutine(answer):
        answer = await answer
    refusal = None
    if answer is not None:
        assert isinstance(answer, Response)
        refusal = (answer.status_code, answer.headers.raw, bytes(answer.body))
    reservations = getattr(ctx, "reservations", None)
    return (
        refusal,
        ctx.response_headers,
        ctx.rejected,
        ctx.shadow,
        dict(ctx.limits),
        reservations,
        ctx.body,
    )


@settings(max_examples=120, deadline=None)
@given(rules=_rules(), steps=_requests, closest=st.booleans())
async def test_token_rules_on_the_fast_path_decide_as_on_the_general_path(
    rules: list[Rule], steps: list[tuple[Any, ...]], closest: bool
) -> None:
    """Over random token and cost rules beside request rules (every key kind but API keys,
    both algorithms, shadow rules, bodies too large, not JSON or priced by no model) and
    request sequences: the same 413s, 429s and admissions, the same fields, the same
    reservations (amounts, keys, times, models) and the same body kept for the app."""
    clock = Clock()
    items: RateLimitItems = "closest" if closest else "all"
    stores = (
        MemoryStore(clock=clock, random=lambda: 0.25),
        GeneralPath(clock=clock, random=lambda: 0.25),
    )
    fast, general = (
        RateLimitMiddleware(
            None,  # type: ignore[arg-type]
            store=store,
            rules=rules,
            ratelimit_items=items,
            writer=None,
        )
        for store in stores
    )
    assert fast._matching(("POST", "/chat")).plan is not None
    assert general._matching(("POST", "/chat")).plan is None
    for step in steps:
        clock.now += step[0]
        assert await _decide(fast, step) == await _decide(general, step)
