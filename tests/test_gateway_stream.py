"""The example gateway's OpenAI-compatible `/v1/chat/completions`: answered whole or streamed,
from the local responder or relayed from an upstream, its usage in the request log."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import examples.responder as responder
import httpx
import pytest
from examples.demo import budget_rules_available, instructions, token_rules
from examples.gateway import COMPLETIONS_PATH, create_app, gateway_settings
from examples.responder import Upstream, count_tokens
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from convex_guard import ApiKeys, MemoryStore
from convex_guard.stores.base import AIRequestLog

from .conftest import serve
from .e2e_checks import BROWSER, CHAT

STREAM = {**CHAT, "stream": True}
WITH_USAGE = {**STREAM, "stream_options": {"include_usage": True}}


def events(text: str) -> list[Any]:
    """The `data:` payloads of an event stream, JSON decoded ([DONE] as the string)."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        data = "\n".join(line[5:].strip() for line in block.split("\n") if line.startswith("data:"))
        if data:
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def rows_after(store: MemoryStore, seen: int) -> AIRequestLog:
    deadline = time.monotonic() + 5
    while len(store.ai_logs) <= seen:
        assert time.monotonic() < deadline, "no row written"
        time.sleep(0.01)
    return store.ai_logs[seen]


class Gateway:
    def __init__(self, url: str, store: MemoryStore, key: str) -> None:
        self.store = store
        self.client = httpx.Client(
            base_url=url,
            timeout=10,
            headers={"user-agent": BROWSER, "authorization": f"Bearer {key}"},
        )

    def post(self, body: dict[str, Any], **options: Any) -> tuple[httpx.Response, AIRequestLog]:
        seen = len(self.store.ai_logs)
        answer = self.client.post(COMPLETIONS_PATH, json=body, **options)
        return answer, rows_after(self.store, seen)


def start(store: MemoryStore, upstream: Upstream | None) -> Any:
    app = create_app(gateway_settings(store=store, writer_interval=0.02), upstream=upstream)
    return serve(app)


@pytest.fixture(scope="module")
def local() -> Iterator[Gateway]:
    patch = pytest.MonkeyPatch()
    patch.setattr(responder, "STREAM_DELAY", 0.001)
    store = MemoryStore()
    key = asyncio.run(ApiKeys(store).create("t", kind="ai")).key
    with start(store, None) as server:
        gateway = Gateway(server.url, store, key)
        yield gateway
        gateway.client.close()
    patch.undo()


def test_a_whole_answer(local: Gateway) -> None:
    answer, row = local.post(CHAT)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert row.provider == "openai" and row.success and row.ttft_ms is None
    assert row.tokens_used == body["usage"]["total_tokens"] and row.cost


def test_a_stream_with_its_usage(local: Gateway) -> None:
    answer, row = local.post(WITH_USAGE)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    chunks = events(answer.text)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["object"] == "chat.completion.chunk"
    words = [c["choices"][0]["delta"].get("content", "") for c in chunks[:-2] if c["choices"]]
    text = "".join(words)
    assert len([w for w in words if w]) > 10  # word by word
    assert usage["usage"]["completion_tokens"] == count_tokens(text)
    # The guard read the tokens and the time to the first word off the stream.
    assert row.tokens_used == usage["usage"]["total_tokens"]
    assert row.ttft_ms is not None and 0 < row.ttft_ms < row.latency_ms
    assert row.model == CHAT["model"] and row.cost


def test_a_stream_without_usage_asked_has_none_but_is_logged(local: Gateway) -> None:
    answer, row = local.post(STREAM)
    chunks = events(answer.text)
    assert chunks[-1] == "[DONE]"
    assert all(c["choices"] for c in chunks[:-1])  # no usage event passed on
    whole, _ = local.post(CHAT)
    assert row.tokens_used == whole.json()["usage"]["total_tokens"]


def test_the_completions_route_needs_a_key_and_a_valid_body(local: Gateway) -> None:
    keyless, row = local.post(CHAT, headers={"authorization": ""})
    assert keyless.status_code == 401 and row.error == "api_key_missing"
    bad, _ = local.post({"model": "m", "messages": []})
    assert bad.status_code == 422


def fake_upstream(asked: list[dict[str, Any]]) -> Starlette:
    async def completions(request: Request) -> StreamingResponse | PlainTextResponse:
        body = await request.json()
        asked.append(body)
        if body["model"] == "broken":
            return PlainTextResponse("no", status_code=500)

        async def chunks() -> AsyncIterator[bytes]:
            for word in ("from ", "upstream"):
                payload = {"model": "up-1", "choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(payload)}\n\n".encode()
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\r\n\r\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def test_a_stream_relayed_from_the_upstream_asks_for_its_usage() -> None:
    asked: list[dict[str, Any]] = []
    store = MemoryStore()
    key = asyncio.run(ApiKeys(store).create("t", kind="ai")).key
    with (
        serve(fake_upstream(asked)) as up,
        start(store, Upstream(up.url + "/v1", None, timeout=5)) as server,
    ):
        gateway = Gateway(server.url, store, key)
        streamed, row = gateway.post(STREAM)
        broken, _ = gateway.post({**STREAM, "model": "broken"})
        gateway.client.close()
    assert asked[0]["stream"] is True and asked[0]["stream_options"] == {"include_usage": True}
    chunks = events(streamed.text)
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == ["from ", "upstream"]
    assert row.tokens_used == 7 and row.model == "up-1"  # the client did not ask: none passed
    assert broken.status_code == 502
    assert broken.headers["content-type"] == "application/problem+json"


def test_the_demo_wires_the_ai_key_and_its_budget() -> None:
    text = instructions("cg_emb_x", ai_key="cg_ai_y")
    assert "cg_ai_y" in text and COMPLETIONS_PATH in text and "-N" in text
    rules = token_rules()
    if budget_rules_available():
        assert {r.name for r in rules} == {"keyTokensPerMinute", "keyDailyBudget"}
        assert "budget" in text
    else:
        assert rules == []
