"""The example AI gateway (FastAPI): every route guarded by one `GuardMiddleware`.

- `POST /api/ai/{provider}/chat`: OpenAI-style chat for the seed's providers, open to anonymous
  callers, limited per provider, per IP and per user/key (the preset); other providers → 404.
- `POST /api/embeddings`: needs an embedding API key (no key → 401).
- `POST /v1/chat/completions`: OpenAI-compatible chat, logged as the `openai` provider, with
  `stream: true` answered as server-sent events (word by word from the local responder). By
  default it needs an AI key (`Authorization: Bearer …`), as OpenAI's own API does.
- `GET /health`: exempt from every check.

Request bodies are the guard's to bound (`GuardSettings.body_rules`, by default
`default_body_rules()`): a chat body over 1 MiB or an embedding batch over 8 MiB is refused
with 413 as it arrives (before any of it is read when `Content-Length` says so), a body that
is not JSON with 415 or 400, so a handler's `await request.body()` reads the bytes the guard
has already checked, never more.

With `GATEWAY_UPSTREAM_URL` (and `GATEWAY_UPSTREAM_API_KEY`) set, calls go to that
OpenAI-compatible API; otherwise the local responder answers, so the demo works offline.
Either way the model, tokens and cost reach the request log through `report_usage`; for a
stream the guard reads the tokens from the stream's usage event itself (the gateway always
asks the upstream for it, and takes it out of what it passes on when the client did not).

    uvicorn examples.gateway:app
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Scope

from convex_guard import (
    GuardMiddleware,
    GuardSettings,
    KeyRoute,
    default_key_routes,
    provider_from_path,
    report_usage,
)
from convex_guard.core.streamusage import StreamUsage
from convex_guard.middleware.context import request_route

from .responder import (
    EVENT_STREAM,
    PROVIDERS,
    BadRequest,
    ChatRequest,
    EmbeddingRequest,
    Reply,
    Upstream,
    UpstreamError,
    cost,
    local_chat,
    local_chat_stream,
    local_embeddings,
    parse,
    problem_body,
    relay,
)

PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, **extra), status_code=status, media_type=PROBLEM
    )


#: The OpenAI-compatible route, and the provider its requests are logged and limited as.
COMPLETIONS_PATH = "/v1/chat/completions"
COMPLETIONS_PROVIDER = "openai"
_per_provider = provider_from_path()


def gateway_provider(scope: Scope) -> str | None:
    """The request log's provider: `/api/ai/{provider}/…`, and `openai` for `/v1/…` (paths
    as Starlette routes them, without the `root_path` of a mount)."""
    if request_route(scope)[1] == COMPLETIONS_PATH:
        return COMPLETIONS_PROVIDER
    return _per_provider(scope)


def gateway_settings(**options: Any) -> GuardSettings:
    """The gateway's guard: the defaults, the log's provider for `/v1`, and an AI key
    required there (`options` change any field)."""
    return GuardSettings(
        **{
            "provider": gateway_provider,
            "key_routes": (*default_key_routes(), KeyRoute("/v1", kind="ai", required=True)),
            **options,
        }
    )


def create_app(
    settings: GuardSettings | None = None, *, upstream: Upstream | bool | None = True
) -> FastAPI:
    """The gateway; `upstream=True` reads it from the environment, `None` forces local.

    `settings` without a `provider` get `gateway_provider`, so `/v1/chat/completions` is
    logged (and its usage read) like the per-provider routes.
    """
    target = Upstream.from_env() if upstream is True else upstream or None
    if settings is None:
        settings = gateway_settings()
    elif settings.provider is None:
        settings = dataclasses.replace(settings, provider=gateway_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient() as client:
            app.state.http = client
            yield

    app = FastAPI(title="convex-guard example AI gateway", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, settings=settings)

    @app.post("/api/ai/{provider}/chat")
    async def chat(provider: str, request: Request) -> JSONResponse:
        if provider not in PROVIDERS:
            return problem(404, "Not Found", f"Unknown provider; use one of {list(PROVIDERS)}.")
        try:
            body: ChatRequest = parse(ChatRequest, await request.body())
        except BadRequest as exc:
            return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
        return await complete(request, provider, body)

    @app.post("/api/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        try:
            body: EmbeddingRequest = parse(EmbeddingRequest, await request.body())
        except BadRequest as exc:
            return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
        report_usage(request, model=body.model, items=len(body.inputs()))
        try:
            reply: Reply = (
                await target.embeddings(request.app.state.http, body)
                if target is not None
                else local_embeddings(body)
            )
        except UpstreamError as exc:
            return problem(502, "Bad Gateway", f"The upstream embedding API failed: {exc}.")
        report_usage(request, model=reply.model, tokens=reply.tokens)
        return JSONResponse(reply.body)

    async def complete(request: Request, provider: str, body: ChatRequest) -> JSONResponse:
        """A whole chat answer: a provider route's, and `/v1/chat/completions` without `stream`."""
        try:
            reply: Reply = (
                await target.chat(request.app.state.http, body)
                if target is not None
                else local_chat(provider, body)
            )
        except UpstreamError as exc:
            report_usage(request, model=body.model)
            return problem(502, "Bad Gateway", f"The upstream AI provider failed: {exc}.")
        report_usage(
            request, model=reply.model, tokens=reply.tokens, cost=cost(provider, reply.tokens)
        )
        return JSONResponse(reply.body)

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request) -> Response:
        try:
            body: ChatRequest = parse(ChatRequest, await request.body())
        except BadRequest as exc:
            return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
        provider = COMPLETIONS_PROVIDER
        if not body.stream:
            return await complete(request, provider, body)
        try:
            chunks = (
                await target.chat_stream(request.app.state.http, body)
                if target is not None
                else local_chat_stream(provider, body, include_usage=True)
            )
        except UpstreamError as exc:
            report_usage(request, model=body.model)
            return problem(502, "Bad Gateway", f"The upstream AI provider failed: {exc}.")
        keep = body.include_usage

        def on_usage(usage: StreamUsage) -> None:
            # The guard reads the tokens off a stream that keeps its usage event; the cost is
            # the gateway's own price, and without the event the gateway reports both.
            total = usage.total_tokens
            report_usage(request, tokens=None if keep else total, cost=cost(provider, total))

        return StreamingResponse(
            relay(chunks, keep_usage=keep, on_usage=on_usage), media_type=EVENT_STREAM
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
