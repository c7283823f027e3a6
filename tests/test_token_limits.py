"""Token limits and cost budgets through a real uvicorn server, on MemoryStore and on Convex.

A request reserves its estimate on arrival (characters / 4 of the prompt plus `max_tokens`),
and the reservation is settled on what the app reports when the request ends: charged up,
refunded down, or given back whole when the request fails. Settlements ride in the log
writer's batches, so on Convex a settled request makes no store call of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from convex_guard import (
    DAY,
    HOUR,
    ApiKeys,
    FixedWindow,
    GuardMiddleware,
    GuardSettings,
    KeyQuota,
    KeyRoute,
    LimitRequest,
    LogWriter,
    MemoryStore,
    Rule,
    report_usage,
)
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.estimates import TokenEstimate
from convex_guard.stores.base import Settlement
from convex_guard.stores.convex import ConvexStore
from convex_guard.stores.keys import check_quotas

from .conftest import ConvexTestServer, serve

PATH = "/api/ai/openai/chat/completions"
#: The windows begin a second before the module: no test crosses a window's end.
START = float(int(time.time() * 1000) - 1000)
TOKENS = FixedWindow(rate=1000, period=HOUR, start=START)
BUDGET = FixedWindow(rate=1, period=DAY, start=START)
#: 1000 per million tokens: 0.001 a token, so the 1.0 budget is 1000 tokens of "small".
PRICES = {"small": 1000.0}


def _team(request: Request) -> str | None:
    return request.headers.get("x-team")


def _payer(request: Request) -> str | None:
    return request.headers.get("x-payer")


#: What a key without a tier of its own may use; a key's record may say otherwise.
KEY_TOKENS = FixedWindow(rate=10_000, period=DAY, start=START)

RULES = [
    Rule("teamTokens", TOKENS, key=_team, unit="tokens", path="/api/ai"),
    Rule("teamBudget", BUDGET, key=_payer, unit="cost", prices=PRICES, path="/api/ai"),
    Rule("keyTokens", KEY_TOKENS, key="api_key", unit="tokens", tier=True, path="/api/ai"),
]


async def chat(request: Request) -> JSONResponse:
    """Echoes what the test asks: usage to report, a status, or a raise."""
    body = await request.json()  # the guard read it first: this is its replay
    test = body.get("test", {})
    if "tokens" in test or "cost" in test:
        report_usage(
            request, model=body.get("model"), tokens=test.get("tokens"), cost=test.get("cost")
        )
    if test.get("raise"):
        raise RuntimeError("upstream blew up")
    return JSONResponse(
        {"echo": len(body.get("messages", []))}, status_code=test.get("status", 200)
    )


def _app(store: Any) -> Starlette:
    settings = GuardSettings(
        store=store,
        rules=RULES,
        bot_detection=False,
        key_routes=[KeyRoute("/api/ai", required=False)],  # anonymous callers pass
        writer_interval=0.05,
        store_fallback=False,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if isinstance(store, ConvexStore):
            await store.close()  # in the server's loop, which its connections belong to

    app = Starlette(routes=[Route(PATH, chat, methods=["POST"])], lifespan=lifespan)
    app.add_middleware(GuardMiddleware, settings=settings)
    return app


def _body(prompt_chars: int = 396, max_tokens: int = 200, **test: Any) -> dict[str, Any]:
    # 396 characters of content and 4 of role are 100 tokens: with max_tokens 200, 300.
    return {
        "model": "small",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "x" * prompt_chars}],
        "test": test,
    }


class Served:
    def __init__(
        self,
        url: str,
        peek: Callable[[str, FixedWindow, str], float],
        keys: ApiKeys,
        run: Callable[[Coroutine[Any, Any, Any]], Any],
        convex: ConvexTestServer | None = None,
    ) -> None:
        self.url = url
        self.peek = peek
        self.keys = keys
        self.run = run
        self.convex = convex

    def post(
        self, team: str, body: dict[str, Any], payer: str | None = None, key: str | None = None
    ) -> httpx.Response:
        headers = {"x-team": team, **({"x-payer": payer} if payer else {})}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(self.url + PATH, json=body, headers=headers, timeout=10)

    def settles_to(self, name: str, config: FixedWindow, key: str, expected: float) -> None:
        """Wait (the writer flushes every 50 ms) until the limit holds `expected`."""
        deadline = time.monotonic() + 5
        while True:
            left = self.peek(name, config, key)
            if left == pytest.approx(expected) or time.monotonic() > deadline:
                assert left == pytest.approx(expected)
                return
            time.sleep(0.02)


@pytest.fixture(scope="module")
def memory_served() -> Iterator[Served]:
    store = MemoryStore()

    def peek(name: str, config: FixedWindow, key: str) -> float:
        # A MemoryStore answers without awaiting anything: read from this thread.
        return asyncio.run(store.peek(name, config, key=key)).remaining

    with serve(_app(store)) as server:
        yield Served(server.url, peek, ApiKeys(store), asyncio.run)


@pytest.fixture(scope="module")
def convex_served(convex_server: ConvexTestServer) -> Iterator[Served]:
    convex_server.reset()
    guard_store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
    reader = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def peek(name: str, config: FixedWindow, key: str) -> float:
        coro = reader.peek(name, config, key=key)
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10).remaining

    try:
        with serve(_app(guard_store)) as server:
            # The served store's connections belong to the server's loop, gone with it.
            yield Served(
                server.url,
                peek,
                ApiKeys(reader),
                lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(10),
                convex_server,
            )
    finally:
        asyncio.run_coroutine_threadsafe(reader.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture(params=["memory", "convex"])
def served(request: pytest.FixtureRequest) -> Served:
    return request.getfixturevalue(f"{request.param}_served")  # type: ignore[no-any-return]


def test_the_estimate_is_reserved_and_shown_in_tokens(served: Served) -> None:
    team = uuid.uuid4().hex
    response = served.post(team, _body())
    assert response.status_code == 200 and response.json() == {"echo": 1}
    assert '"teamTokens";q=1000;w=3600;qu="tokens"' in response.headers["ratelimit-policy"]
    # 1000 - 300 reserved; nothing reported by a success: the estimate stands.
    assert '"teamTokens";r=700;' in response.headers["ratelimit"]
    served.settles_to("teamTokens", TOKENS, team, 700)


def test_reported_usage_settles_down_and_up(served: Served) -> None:
    team = uuid.uuid4().hex
    assert served.post(team, _body(tokens=50)).status_code == 200
    served.settles_to("teamTokens", TOKENS, team, 950)
    assert served.post(team, _body(tokens=650)).status_code == 200  # 350 over its estimate
    served.settles_to("teamTokens", TOKENS, team, 300)
    # 300 left: a 300 estimate fits, a 301 does not, until the usage is known.
    assert served.post(team, _body(prompt_chars=400, tokens=0)).status_code == 429
    assert served.post(team, _body(tokens=300)).status_code == 200
    served.settles_to("teamTokens", TOKENS, team, 0)


@pytest.mark.parametrize("failure", [{"status": 502}, {"status": 400}, {"raise": True}])
def test_a_failed_request_gets_its_reservation_back(
    served: Served, failure: dict[str, Any]
) -> None:
    team = uuid.uuid4().hex
    response = served.post(team, _body(**failure))
    assert response.status_code == failure.get("status", 500)
    served.settles_to("teamTokens", TOKENS, team, 1000)


def test_a_failed_request_that_reported_usage_is_charged_it(served: Served) -> None:
    team = uuid.uuid4().hex
    assert served.post(team, _body(tokens=120, status=503)).status_code == 503
    served.settles_to("teamTokens", TOKENS, team, 880)


def test_an_estimate_that_can_never_fit_is_413_at_once(served: Served) -> None:
    team = uuid.uuid4().hex
    response = served.post(team, _body(max_tokens=5000))
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["title"] == "Request exceeds what the limit can ever admit"
    assert problem["violated-policies"] == ["teamTokens"]
    assert served.peek("teamTokens", TOKENS, team) == 1000  # nothing reserved


def test_a_body_over_max_body_is_413_and_bad_json_is_estimated_by_length(served: Served) -> None:
    team = uuid.uuid4().hex
    big = httpx.post(
        served.url + PATH, content=b"x" * (1024 * 1024 + 1), headers={"x-team": team}, timeout=10
    )
    assert big.status_code == 413
    assert big.json()["title"] == "Request body too large"
    # 800 bytes that are not JSON: estimated by length (200 tokens) and reserved; request
    # validation, inside the limiter, then refuses the body (400), so the reservation comes
    # back.
    odd = httpx.post(served.url + PATH, content=b"{" * 800, headers={"x-team": team}, timeout=10)
    assert odd.status_code == 400
    served.settles_to("teamTokens", TOKENS, team, 1000)


def test_a_body_nested_past_the_parsers_limit_is_estimated_by_length_not_a_500(
    served: Served,
) -> None:
    """`json.loads` raises RecursionError, not ValueError, on 3,000 `[`: the limiter takes the
    body for what it is, not JSON, and request validation refuses it (400); the reservation
    comes back."""
    team = uuid.uuid4().hex
    deep = httpx.post(served.url + PATH, content=b"[" * 3000, headers={"x-team": team}, timeout=10)
    assert deep.status_code == 400
    assert deep.json()["title"] == "Bad Request"
    served.settles_to("teamTokens", TOKENS, team, 1000)


def test_a_spent_budget_is_429_budget_exceeded_in_its_unit(served: Served) -> None:
    team, payer = uuid.uuid4().hex, uuid.uuid4().hex
    # Estimated 300 tokens x 0.001 = 0.3; the app reports the real cost.
    first = served.post(team, _body(cost=0.85, tokens=10), payer=payer)
    assert first.status_code == 200
    assert '"teamBudget";q=1;w=86400;qu="cost"' in first.headers["ratelimit-policy"]
    served.settles_to("teamBudget", BUDGET, payer, 0.15)
    refused = served.post(team, _body(), payer=payer)
    assert refused.status_code == 429
    problem = refused.json()
    assert problem["type"] == "tag:convex-guard,2026:budget-exceeded"
    assert problem["violated-policies"] == ["teamBudget"]
    assert '"teamBudget";r=0;' in refused.headers["ratelimit"]
    assert int(refused.headers["retry-after"]) > 0
    # Reported tokens and no cost are priced by the table: 100 tokens = 0.1.
    other = uuid.uuid4().hex
    assert served.post(team, _body(tokens=100), payer=other).status_code == 200
    served.settles_to("teamBudget", BUDGET, other, 0.9)


def test_settlements_ride_in_the_log_batches_on_convex(convex_served: Served) -> None:
    convex = convex_served.convex
    assert convex is not None
    team = uuid.uuid4().hex
    time.sleep(0.2)  # let earlier tests' batches land
    convex.counters(reset=True)
    requests = 6
    for _ in range(requests):
        assert convex_served.post(team, _body(tokens=10)).status_code == 200
    convex_served.settles_to("teamTokens", TOKENS, team, 1000 - requests * 10)
    mutations = convex.counters()["totals"]["mutations"]
    # One guard:check per request; the rows and the settlements share the writer's batches
    # (one every 50 ms here), never a call per settlement on top of them.
    assert requests < mutations <= 2 * requests


def test_a_keys_tier_on_its_record_replaces_the_rules_limit(served: Served) -> None:
    tiered = served.run(served.keys.create("small plan", quotas=[KeyQuota("tokens", 600, DAY)]))
    plain = served.run(served.keys.create("default plan")).key
    team = uuid.uuid4().hex
    first = served.post(team, _body(tokens=500), key=tiered.key)  # 300 reserved of its 600
    assert first.status_code == 200
    assert '"keyTokens";q=600;w=86400;qu="tokens"' in first.headers["ratelimit-policy"]
    assert '"keyTokens";r=300;' in first.headers["ratelimit"]
    # The settlement (200 more) lands with the next batch: 100 left, in the tier's own state.
    tier_name, tier_config = (
        "keyTokens|600.0|86400000.0",
        FixedWindow(rate=600, period=DAY, start=0),
    )
    served.settles_to(tier_name, tier_config, tiered.record.id, 100)
    refused = served.post(team, _body(), key=tiered.key)
    assert refused.status_code == 429
    assert refused.json()["violated-policies"] == ["keyTokens"]
    # Another key, without a tier: the rule's own 10,000 a day.
    other = served.post(team, _body(), key=plain)
    assert other.status_code == 200
    assert '"keyTokens";q=10000;' in other.headers["ratelimit-policy"]
    assert '"keyTokens";r=9700;' in other.headers["ratelimit"]


def test_rule_options_are_checked_at_construction() -> None:
    with pytest.raises(ConfigurationError, match="estimate="):
        Rule("t", TOKENS, unit="tokens", count=5)
    with pytest.raises(ConfigurationError, match="max_reserved"):
        Rule("t", FixedWindow(rate=10, period=HOUR, max_reserved=5), unit="tokens")
    with pytest.raises(ConfigurationError, match="prices"):
        Rule("t", TOKENS, unit="tokens", prices={"m": 1.0})
    with pytest.raises(ConfigurationError, match="price of 'm'"):
        Rule("t", BUDGET, unit="cost", prices={"m": -1.0})
    with pytest.raises(ConfigurationError, match="unit"):
        Rule("t", TOKENS, unit="bytes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="chars_per_token"):
        TokenEstimate(chars_per_token=0)
    with pytest.raises(ConfigurationError, match="tier=True"):
        Rule("t", TOKENS, key="ip", unit="tokens", tier=True)
    with pytest.raises(ConfigurationError, match="one quota per unit"):
        check_quotas([KeyQuota("cost", 1, DAY), KeyQuota("cost", 2, DAY)])
    with pytest.raises(ConfigurationError, match="period is ms"):
        check_quotas([KeyQuota("tokens", 1, 60)])


async def test_a_settlement_the_store_refuses_is_split_out_and_the_rest_land() -> None:
    store = MemoryStore()
    writer = LogWriter(store)
    config = FixedWindow(rate=100, period=HOUR, start=START)
    outcome = await store.check([LimitRequest("tpm", config, "k", 50, settled=True)])
    assert outcome.ok and outcome.now is not None
    for amount in (-20.0, math.nan, 5.0):
        writer.add(Settlement("tpm", config, "k", amount, outcome.now))
    await writer.close()
    assert writer.rejected == 1  # the NaN alone
    assert (await store.peek("tpm", config, key="k")).remaining == 65


def test_the_default_estimate_counts_prompt_text_and_the_completion_asked_for() -> None:
    estimate = TokenEstimate()
    chat = {
        "model": "m",
        "max_completion_tokens": 50,
        "max_tokens": 999,  # the newer field wins
        "messages": [
            {"role": "system", "content": "x" * 94},  # 6 + 94 characters
            {
                "role": "user",  # 4
                "content": [
                    {"type": "text", "text": "y" * 96},  # 96
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "A" * 10**6},
                    },
                ],
            },
        ],
    }
    assert estimate.tokens(chat, b"") == 200 / 4 + 50
    # No maximum named: the default completion; a bool is not a maximum.
    assert estimate.tokens({"prompt": "z" * 8, "max_tokens": True}, b"") == 2 + 1024
    assert TokenEstimate(default_completion=0).tokens({"input": ["ab", "cd"]}, b"") == 1
    assert estimate.tokens(None, b"not json at all!") == 4  # 16 bytes


def test_a_stream_cut_off_before_its_usage_settles_the_prompt_and_what_was_sent() -> None:
    """No usage event: what was produced (four characters a token of the text sent) plus the
    prompt's estimate, which the upstream was sent and bills, not the whole reservation."""
    from starlette.responses import StreamingResponse

    store = MemoryStore()
    sent = threading.Event()

    async def stream(request: Request) -> StreamingResponse:
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            chunk = '{"choices": [{"index": 0, "delta": {"content": "%s"}}]}'
            yield b"data: " + (chunk % ("y" * 40)).encode() + b"\n\n"  # 10 tokens
            sent.set()
            while True:  # never ends: the client goes away
                await asyncio.sleep(0.05)
                yield b": keep-alive\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    rule = Rule("teamTokens", TOKENS, key=_team, unit="tokens", path="/api/ai")
    settings = GuardSettings(
        store=store, rules=[rule], bot_detection=False, key_routes=(), writer_interval=0.05
    )
    app = GuardMiddleware(Starlette(routes=[Route(PATH, stream, methods=["POST"])]), settings)
    team = uuid.uuid4().hex
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        with client.stream("POST", PATH, json=_body(), headers={"x-team": team}) as response:
            assert response.status_code == 200
            assert response.headers["ratelimit"].startswith('"teamTokens";r=700;')
            next(response.iter_raw())
            assert sent.wait(5)
        # Gone: 100 tokens of prompt and 10 of completion are charged, 190 come back.
        deadline = time.monotonic() + 5
        while True:
            left = asyncio.run(store.peek("teamTokens", TOKENS, key=team)).remaining
            if left == pytest.approx(890) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    assert left == pytest.approx(890)
