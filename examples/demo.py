"""`make demo`: the example AI gateway on 127.0.0.1:8000, in memory, with demo API keys.

The keys are created in this process, in the very `MemoryStore` the server uses (an in-memory
key would not exist anywhere else), and printed once, with commands to try. The AI key has a
token limit per minute and a small daily cost budget on `/v1/chat/completions`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import uvicorn

from convex_guard import DAY, MINUTE, ApiKeys, FixedWindow, MemoryStore, Rule, preset_rules

from .gateway import COMPLETIONS_PATH, COMPLETIONS_PROVIDER, create_app, gateway_settings
from .responder import PRICE_PER_MILLION

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8000"))

# -- the AI key's token limit and cost budget ------------------------------------------------
#: Tokens one AI key may use per minute on `/v1/chat/completions`.
KEY_TOKENS_PER_MINUTE = 20_000
#: What one AI key may spend a day, in USD: at the local responder's illustrative price
#: (0.60 USD per million tokens, about 35 tokens a call) some 25 calls.
KEY_DAILY_BUDGET_USD = 0.0005
#: The demo's models, priced as the gateway prices its `openai` answers (USD per million
#: tokens): what the budget reserves on arrival (the prompt and `max_tokens`) and charges.
DEMO_PRICES = {"gpt-4o-mini": PRICE_PER_MILLION[COMPLETIONS_PROVIDER]}


def token_rules() -> list[Rule]:
    """The per-key token limit and daily cost budget, as rules whose unit is not requests.

    `Rule(unit="tokens")` reserves each request's estimate on arrival and settles on the
    usage reported (or read off the stream); `unit="cost"` does the same in USD, at
    `DEMO_PRICES`, and refuses with the `budget-exceeded` problem. A build whose `Rule` has
    no `unit` gets neither (`budget_rules_available`).
    """
    if not budget_rules_available():
        return []
    # Keywords through a dict: this module type-checks with and without `Rule.unit`.
    tokens: dict[str, Any] = {"unit": "tokens"}
    usd: dict[str, Any] = {"unit": "cost", "prices": DEMO_PRICES}
    return [
        Rule(
            "keyTokensPerMinute",
            FixedWindow(rate=KEY_TOKENS_PER_MINUTE, period=MINUTE),
            key="api_key",
            path=COMPLETIONS_PATH,
            **tokens,
        ),
        Rule(
            "keyDailyBudget",
            FixedWindow(rate=KEY_DAILY_BUDGET_USD, period=DAY, start=0),  # UTC days
            key="api_key",
            path=COMPLETIONS_PATH,
            **usd,
        ),
    ]


def budget_rules_available() -> bool:
    return "unit" in {f.name for f in dataclasses.fields(Rule)}


# ---------------------------------------------------------------------------------------------


#: Every command sends JSON as JSON: the guard's request validation answers 415 to another
#: media type (curl's `-d` alone says form data).
JSON = "-H 'Content-Type: application/json'"


def instructions(key: str, host: str = HOST, port: int = PORT, *, ai_key: str | None = None) -> str:
    base = f"http://{host}:{port}"
    chat = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
    text = f"""
convex-guard demo gateway on {base} (in-memory store: limits, keys and logs are per process)

Demo embedding API key (shown once): {key}

1. A normal chat call (note the RateLimit and RateLimit-Policy headers):
   curl -i -X POST {base}/api/ai/openai/chat -H 'Content-Type: application/json' \\
     -d '{chat}'

2. An AI crawler is refused with 403:
   curl -i -A "GPTBot/1.2" -X POST {base}/api/ai/openai/chat {JSON} -d '{chat}'

3. A burst on perplexity: its bucket holds 100 requests and refills at 100 a minute, so the
   burst ends in 429 with Retry-After:
   for i in $(seq 1 105); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST \\
     {base}/api/ai/perplexity/chat {JSON} -d '{chat}'; done; echo

Embeddings need the key (without it: 401):
   curl -i -X POST {base}/api/embeddings -H 'Authorization: Bearer {key}' {JSON} \\
     -d '{{"input":["hello","world"]}}'
"""
    if ai_key is None:
        return text
    # max_tokens: the key's day budget is tiny, and the default estimate (1,024 tokens of
    # answer) would cost more than it holds (413).
    stream = chat[:-1] + ',"max_tokens":50,"stream":true,"stream_options":{"include_usage":true}}'
    text += f"""
Demo AI key (shown once), for the OpenAI-compatible {COMPLETIONS_PATH}: {ai_key}

4. A streamed answer, word by word, ending with its usage (the request log reads the tokens
   and the time to the first word off the stream):
   curl -N -X POST {base}{COMPLETIONS_PATH} -H 'Authorization: Bearer {ai_key}' {JSON} \\
     -d '{stream}'
"""
    if budget_rules_available():
        small = chat[:-1] + ',"max_tokens":50}'
        text += f"""
5. The key's daily budget ({KEY_DAILY_BUDGET_USD} USD) running out: 200s, then 429
   (budget-exceeded) once the calls have cost what the day allows (each reserves its
   prompt and max_tokens on arrival, and is charged what it used):
   for i in $(seq 1 40); do curl -s -o /dev/null -w '%{{http_code}} ' -X POST \\
     {base}{COMPLETIONS_PATH} -H 'Authorization: Bearer {ai_key}' {JSON} \\
     -d '{small}'; done; echo
"""
    return text


async def create_demo_key(store: MemoryStore) -> str:
    created = await ApiKeys(store).create("demo", kind="embedding")
    return created.key


async def create_demo_ai_key(store: MemoryStore) -> str:
    created = await ApiKeys(store).create("demo-ai", kind="ai")
    return created.key


def main() -> None:
    store = MemoryStore()
    # MemoryStore is not tied to an event loop, so the keys made here are there for the server.
    key = asyncio.run(create_demo_key(store))
    ai_key = asyncio.run(create_demo_ai_key(store))
    settings = gateway_settings(store=store, rules=[*preset_rules(), *token_rules()])
    app = create_app(settings)
    print(instructions(key, ai_key=ai_key), flush=True)
    uvicorn.run(app, host=HOST, port=PORT, log_level="info")


if __name__ == "__main__":
    main()
