"""`make demo`: the example AI gateway on 127.0.0.1:8000, in memory, with a demo API key.

The key is created in this process, in the very `MemoryStore` the server uses (an in-memory
key would not exist anywhere else), and printed once, with commands to try.
"""

from __future__ import annotations

import asyncio
import os

import uvicorn

from convex_guard import ApiKeys, GuardSettings, MemoryStore

from .gateway import create_app

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8000"))


def instructions(key: str, host: str = HOST, port: int = PORT) -> str:
    base = f"http://{host}:{port}"
    chat = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
    return f"""
convex-guard demo gateway on {base} (in-memory store: limits, keys and logs are per process)

Demo embedding API key (shown once): {key}

1. A normal chat call (note the RateLimit and RateLimit-Policy headers):
   curl -i -X POST {base}/api/ai/openai/chat -H 'Content-Type: application/json' \\
     -d '{chat}'

2. An AI crawler is refused with 403:
   curl -i -A "GPTBot/1.2" -X POST {base}/api/ai/openai/chat -d '{chat}'

3. A burst on perplexity: its bucket holds 100 requests and refills at 100 a minute, so the
   burst ends in 429 with Retry-After:
   for i in $(seq 1 105); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST \\
     {base}/api/ai/perplexity/chat -d '{chat}'; done; echo

Embeddings need the key (without it: 401):
   curl -i -X POST {base}/api/embeddings -H 'Authorization: Bearer {key}' \\
     -d '{{"input":["hello","world"]}}'
"""


async def create_demo_key(store: MemoryStore) -> str:
    created = await ApiKeys(store).create("demo", kind="embedding")
    return created.key


def main() -> None:
    store = MemoryStore()
    # MemoryStore is not tied to an event loop, so the key made here is there for the server.
    key = asyncio.run(create_demo_key(store))
    app = create_app(GuardSettings(store=store))
    print(instructions(key), flush=True)
    uvicorn.run(app, host=HOST, port=PORT, log_level="info")


if __name__ == "__main__":
    main()
