"""One end-to-end scenario, run against every example (FastAPI, Starlette, Django, Flask).

Each example serves the same routes over the same responder, so one list of requests and one
list of expected log rows hold for all of them. The sync stacks (Flask, Django under WSGI)
share one more check: their store calls all run on the bridge's one loop thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from examples.responder import ChatRequest, EmbeddingRequest, local_chat, local_embeddings

from convex_guard import (
    MINUTE,
    ApiKeys,
    BotCheck,
    CheckResult,
    GuardSettings,
    LimitRequest,
    MemoryStore,
    Rule,
    TokenBucket,
    preset_rules,
)
from convex_guard.integrations import loopthread

from .wsgi_server import serve_wsgi

BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2)"
CHAT: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Hello there, gateway! How are you?"}],
}
EMBED: dict[str, Any] = {"model": "local-embedding-64", "input": ["first text", "second, text!"]}
#: The burst limit of the tests (the preset's perplexity limit is 100 a minute).
BURST = 3


class ThreadRecordingStore(MemoryStore):
    """Records the thread of every hot-path store call: a WSGI or Django request must reach
    the store on the bridge's one loop thread, not on the server's worker thread."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        self.threads.append(threading.get_ident())
        return await super().check(limits, bot=bot)


def chats_share_one_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
    store: ThreadRecordingStore,
    app: Any,
    path: str,
    close: Callable[[], None],
) -> None:
    """Twenty chats to the sync (WSGI) `app` under a threaded server, then `close()`: no event
    loop was created for them, the bridge's loop thread is the one it was before, and every
    store call ran on it. A loop per request, or per worker thread, is what the bridge
    exists to avoid."""
    created: list[object] = []
    real = asyncio.new_event_loop

    def counting_new_event_loop() -> asyncio.AbstractEventLoop:
        loop = real()
        created.append(loop)
        return loop

    monkeypatch.setattr(asyncio, "new_event_loop", counting_new_event_loop)
    loop = loopthread.loop()
    with serve_wsgi(app) as url, httpx.Client(base_url=url, headers={"user-agent": BROWSER}) as c:
        for _ in range(20):
            assert c.post(path, json=CHAT).status_code == 200
    close()
    assert created == []
    assert loopthread.loop() is loop
    assert len(store.threads) == 20 and set(store.threads) == {loopthread.thread_id()}


def small_rules() -> list[Rule]:
    """The preset, with perplexity cut to `BURST` a minute so a burst is short."""
    return [
        dataclasses.replace(rule, config=TokenBucket(rate=BURST, period=MINUTE, capacity=BURST))
        if rule.name == "perplexityRequests"
        else rule
        for rule in preset_rules()
    ]


def settings_for(store: MemoryStore, **options: Any) -> GuardSettings:
    return GuardSettings(store=store, rules=small_rules(), writer_interval=0.05, **options)


def create_key(store: MemoryStore) -> str:
    return asyncio.run(ApiKeys(store).create("test", kind="embedding")).key


def exercise(base_url: str, key: str) -> None:
    """The scenario: a normal call, a crawler, a burst, the embeddings route with and without."""
    with httpx.Client(base_url=base_url, headers={"user-agent": BROWSER}, timeout=10) as c:
        ok = c.post("/api/ai/openai/chat", json=CHAT)
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["message"]["role"] == "assistant"
        assert '"openaiRequests";q=500;w=60' in ok.headers["RateLimit-Policy"]
        assert '"ipAIRequests";r=999;' in ok.headers["RateLimit"]

        crawler = c.post("/api/ai/openai/chat", json=CHAT, headers={"user-agent": GPTBOT})
        assert crawler.status_code == 403
        assert crawler.headers["content-type"] == "application/problem+json"

        codes = [c.post("/api/ai/perplexity/chat", json=CHAT).status_code for _ in range(BURST)]
        assert codes == [200] * BURST
        limited = c.post("/api/ai/perplexity/chat", json=CHAT)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["violated-policies"] == ["perplexityRequests"]
        assert "RateLimit" in limited.headers

        missing = c.post("/api/embeddings", json=EMBED)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        embedded = c.post("/api/embeddings", json=EMBED, headers={"Authorization": f"Bearer {key}"})
        assert embedded.status_code == 200, embedded.text
        vectors = [item["embedding"] for item in embedded.json()["data"]]
        assert len(vectors) == 2 and abs(sum(v * v for v in vectors[0]) - 1) < 1e-9
        assert '"selfHostedEmbeddings";q=2000;w=60' in embedded.headers["RateLimit-Policy"]

        # Bad input is a clean 4xx problem, never a 500; unknown providers are 404.
        bad = c.post("/api/ai/openai/chat", content=b"{not json", headers=_json)
        assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/")
        wrong = c.post("/api/ai/openai/chat", json={"model": "m", "messages": []})
        assert wrong.status_code == 422
        assert c.post("/api/ai/nosuch/chat", json=CHAT).status_code == 404

        # /health is exempt from everything, crawlers included.
        health = c.get("/health", headers={"user-agent": GPTBOT})
        assert health.status_code == 200 and "RateLimit" not in health.headers


_json = {"content-type": "application/json"}


def check_logs(store: MemoryStore, key: str, bad_json: str = "http_400") -> None:
    """The request log holds one row per guarded AI/embedding request, with model and tokens.

    `bad_json`: the bad JSON's row: the guard's own refusal where it reads the body (ASGI),
    the app's 400 where it sees the headers only (the WSGI and Django bridge).
    """
    chat = local_chat("openai", ChatRequest.model_validate(CHAT))
    perplexity = local_chat("perplexity", ChatRequest.model_validate(CHAT))
    # In request order: a row is written when its request ends, which (after the response is
    # sent, e.g. Django's clean-up) can be after the next request has begun.
    rows = sorted(store.ai_logs, key=lambda row: row.timestamp)
    by_provider: dict[str, list[Any]] = {}
    for row in rows:
        by_provider.setdefault(row.provider, []).append(row)
    openai = by_provider["openai"]
    # ok, crawler, bad JSON, wrong schema
    assert [(r.success, r.error) for r in openai] == [
        (True, None),
        (False, "bot_blocked"),
        (False, bad_json),
        (False, "http_422"),
    ]
    assert openai[0].model == "gpt-4o-mini" and openai[0].tokens_used == chat.tokens
    assert openai[0].cost is not None and openai[0].cost > 0
    assert openai[0].ip == "127.0.0.1" and openai[0].fingerprint
    assert [(r.success, r.error) for r in by_provider["perplexity"]] == [(True, None)] * BURST + [
        (False, "rate_limited:perplexityRequests")
    ]
    assert all(r.tokens_used == perplexity.tokens for r in by_provider["perplexity"][:BURST])
    # A provider outside the configured set is logged as "other", its name in the error.
    assert [(r.success, r.error) for r in by_provider["other"]] == [
        (False, "http_404 provider:nosuch")
    ]
    assert "health" not in by_provider

    embedding = local_embeddings(EmbeddingRequest.model_validate(EMBED))
    embeddings = sorted(store.embedding_logs, key=lambda row: row.timestamp)
    assert [(r.success, r.error) for r in embeddings] == [
        (False, "api_key_missing"),
        (True, None),
    ]
    good = embeddings[1]
    assert (good.model, good.batch_size, good.tokens_used) == (
        "local-embedding-64",
        2,
        embedding.tokens,
    )
    assert good.api_key_hash != key and len(good.api_key_hash) == 64  # the hash, never the key
