"""The example AI gateway as a Flask app, guarded by `GuardWSGIMiddleware`.

    flask --app examples.flask_app run    # or: gunicorn "examples.flask_app:create_app()"

The same routes and responder as `examples.gateway` (local answers only, to stay short).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, jsonify, request

from convex_guard import GuardSettings, report_usage
from convex_guard.wsgi import GuardWSGIMiddleware, guard_scope

from .responder import (
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


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    response = jsonify(problem_body(status, title, detail, **extra))
    response.status_code = status
    response.mimetype = "application/problem+json"
    return response


def create_app(settings: GuardSettings | None = None) -> Flask:
    app = Flask(__name__)
    guard = GuardWSGIMiddleware(app.wsgi_app, settings or GuardSettings())
    app.wsgi_app = guard  # type: ignore[method-assign]  # Flask types it as a method
    app.extensions["convex_guard"] = guard

    @app.post("/api/ai/<provider>/chat")
    def chat(provider: str) -> Response:
        if provider not in PROVIDERS:
            return problem(404, "Not Found", f"Unknown provider; use one of {list(PROVIDERS)}.")
        try:
            body: ChatRequest = parse(ChatRequest, request.get_data())
        except BadRequest as exc:
            return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
        reply = local_chat(provider, body)
        report_usage(
            guard_scope(request.environ),
            model=reply.model,
            tokens=reply.tokens,
            cost=cost(provider, reply.tokens),
        )
        return jsonify(reply.body)

    @app.post("/api/embeddings")
    def embeddings() -> Response:
        try:
            body: EmbeddingRequest = parse(EmbeddingRequest, request.get_data())
        except BadRequest as exc:
            return problem(exc.status, "Bad Request", exc.detail, errors=exc.errors)
        reply = local_embeddings(body)
        report_usage(
            guard_scope(request.environ),
            model=reply.model,
            tokens=reply.tokens,
            items=len(body.inputs()),
        )
        return jsonify(reply.body)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    create_app().run(host="127.0.0.1", port=8000)
