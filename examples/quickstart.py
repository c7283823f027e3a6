"""A small FastAPI app guarded by the seed's rate limits on the in-memory store."""

from __future__ import annotations

from fastapi import FastAPI, Request

from convex_guard import MemoryStore, RateLimitMiddleware, guard_context, preset_rules

app = FastAPI(title="convex-guard quick start")
app.add_middleware(RateLimitMiddleware, store=MemoryStore(), rules=preset_rules())


@app.post("/api/ai/{provider}/chat")
async def chat(provider: str, request: Request) -> dict[str, object]:
    limits = guard_context(request.scope).limits
    return {
        "provider": provider,
        "reply": "hello from the local responder",
        "remaining": {name: int(result.remaining) for name, result in limits.items()},
    }


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
