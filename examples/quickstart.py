"""The README's "FastAPI in ten lines": the whole guard from one middleware.

uvicorn examples.quickstart:app
"""

from __future__ import annotations

from fastapi import FastAPI, Request

from convex_guard import GuardMiddleware, guard_context, report_usage

app = FastAPI(title="convex-guard quick start")
app.add_middleware(GuardMiddleware)  # logs, fingerprint, API keys, bots, the seed's limits


@app.post("/api/ai/{provider}/chat")
async def chat(provider: str, request: Request) -> dict[str, object]:
    report_usage(request, model="local", tokens=3)
    limits = guard_context(request.scope).limits
    return {
        "provider": provider,
        "reply": "hello from the local responder",
        "remaining": {name: int(result.remaining) for name, result in limits.items()},
    }


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
