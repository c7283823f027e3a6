"""`make demo`: serve the example app on 127.0.0.1:8000 and show what to try."""

from __future__ import annotations

import os

import uvicorn

HOST = "127.0.0.1"
PORT = int(os.environ.get("PORT", "8000"))

TRY = f"""
convex-guard demo on http://{HOST}:{PORT} (in-memory store: limits are per process)

Try:
  curl -i -X POST http://{HOST}:{PORT}/api/ai/openai/chat
  curl -s -o /dev/null -w '%{{http_code}}\\n' http://{HOST}:{PORT}/health
  # perplexity allows 100 requests a minute: the 101st in a burst gets 429
  for i in $(seq 1 101); do curl -s -o /dev/null -w '%{{http_code}} ' \\
      -X POST http://{HOST}:{PORT}/api/ai/perplexity/chat; done; echo
"""


def main() -> None:
    print(TRY, flush=True)
    uvicorn.run("examples.quickstart:app", host=HOST, port=PORT, log_level="info")


if __name__ == "__main__":
    main()
