"""The example AI gateway (FastAPI): every route guarded by one `GuardMiddleware`.

- `POST /api/ai/{provider}/chat`: OpenAI-style chat for the seed's providers, open to anonymous
  callers, limited per provider, per IP and per user/key (the preset); other providers → 404.
- `POST /api/embeddings`: needs an embedding API key (no key → 401).
- `GET /health`: exempt from every check.

Request bodies are the guard's to bound (`GuardSettings.body_rules`, by default
`default_body_rules()`): a chat body over 1 MiB or an embedding batch over 8 MiB is refused
with 413 as it arrives (before any of it is read when `Content-Length` says so), a body that
is not JSON with 415 or 400, so a handler's `await request.body()` reads the bytes the guard
has already checked, never more.

With `GATEWAY_UPSTREAM_URL` (and `GATEWAY_UPSTREAM_API_KEY`) set, calls go to that
OpenAI-compatible API; otherwise the local responder answers, so the demo works offline.
Either way the model, tokens and cost reach the request log through `report_usage`.

    uvicorn examples.gateway:app
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from convex_guard import GuardMiddleware, GuardSettings, report_usage

from .responder import (
    PROVIDERS,
    BadRequest,
    ChatRequest,
    EmbeddingRequest,
    Reply,
    Upstream,
    UpstreamError,
    cost,
    local_chat,
    local_embeddings,
    parse,
    problem_body,
)

PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        problem_body(status, title, detail, **extra), status_code=status, media_type=PROBLEM
    )


def create_app(
    settings: GuardSettings | None = None, *, upstream: Upstream | bool | None = True
) -> FastAPI:
    """The gateway; `upstream=True` reads it from the environment, `None` forces local."""
    target = Upstream.from_env() if upstream is True else upstream or None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient() as client:
            app.state.http = client
            yield

    app = FastAPI(title="convex-guard example AI gateway", lifespan=lifespan)
    app.add_middleware(GuardMiddleware, settings=settings or GuardSettings())

    @app.post("/api/ai/{provider}/chat")
    async def chat(provider: str, request: Request) -> JSONResponse:
        if provider not in PROVIDERS:
            return problem(404, "Not Found", f"Unknown provider; use one of {list(PROVIDERS)}.")
        try:
            body: ChatRequest = parse(ChatRequest, await request.body())
        except BadRequest as exc:
            return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
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

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = create_app()
