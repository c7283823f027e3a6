"""The example gateway on the Convex store the environment names, limited by one global fixed
window of `LOAD_LIMIT` requests an hour starting at `LOAD_WINDOW_START` (epoch ms), so the
load test knows exactly how many requests the algorithm admits.

    LOAD_LIMIT=1000 LOAD_WINDOW_START=... uvicorn tests.load_app:app
"""

from __future__ import annotations

import os

from examples.gateway import create_app

from convex_guard import HOUR, FixedWindow, GuardSettings, Rule

window = FixedWindow(
    rate=int(os.environ["LOAD_LIMIT"]), period=HOUR, start=float(os.environ["LOAD_WINDOW_START"])
)
app = create_app(
    GuardSettings(
        store="convex",
        # Fail closed: a store call that times out shows as a 503, never as a silent extra 200.
        rules=[Rule("loadGlobal", window, key="global", path="/api/ai", fail="closed")],
        # 64 clients queue on the one-call-at-a-time test server: give it time to answer.
        timeout=10.0,
        writer_interval=0.2,
    ),
    upstream=None,
)
