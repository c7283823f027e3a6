"""The gateway's views: the shared responder, with usage reported to the request log."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from convex_guard import report_usage
from convex_guard.django import guard_scope

from ..responder import (
    PROVIDERS,
    BadRequest,
    ChatRequest,
    EmbeddingRequest,
    cost,
    local_chat,
    local_embeddings,
    parse,
    problem_body,
)


def problem(status: int, title: str, detail: str, **extra: Any) -> HttpResponse:
    return JsonResponse(
        problem_body(status, title, detail, **extra),
        status=status,
        content_type="application/problem+json",
    )


@csrf_exempt
@require_POST
def chat(request: HttpRequest, provider: str) -> HttpResponse:
    if provider not in PROVIDERS:
        return problem(404, "Not Found", f"Unknown provider; use one of {list(PROVIDERS)}.")
    try:
        body: ChatRequest = parse(ChatRequest, request.body)
    except BadRequest as exc:
        return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
    reply = local_chat(provider, body)
    report_usage(
        guard_scope(request),
        model=reply.model,
        tokens=reply.tokens,
        cost=cost(provider, reply.tokens),
    )
    return JsonResponse(reply.body)


@csrf_exempt
@require_POST
def embeddings(request: HttpRequest) -> HttpResponse:
    try:
        body: EmbeddingRequest = parse(EmbeddingRequest, request.body)
    except BadRequest as exc:
        return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
    reply = local_embeddings(body)
    report_usage(
        guard_scope(request), model=reply.model, tokens=reply.tokens, items=len(body.inputs())
    )
    return JsonResponse(reply.body)


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})
