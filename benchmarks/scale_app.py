"""The example gateway as one app instance of the scale benchmark (and its small test).

Every instance runs this module under its own uvicorn process, on the Convex deployment the
environment names, behind a trusted proxy on loopback (clients are told apart by the
X-Forwarded-For they send). The preset's limits apply, except that the global window starts at
`SCALE_WINDOW_START` (epoch ms, the same for every instance) and holds `SCALE_GLOBAL_LIMIT`
requests, so the run knows exactly what the limit admits and the window cannot roll over mid-run.

    SCALE_GLOBAL_LIMIT=4000 SCALE_WINDOW_START=... uvicorn benchmarks.scale_app:app
"""

from __future__ import annotations

import dataclasses
import os

from examples.gateway import create_app

from convex_guard import HOUR, FixedWindow, GuardSettings, preset_rules

GLOBAL = "globalAIRequests"

window = FixedWindow(
    rate=int(os.environ["SCALE_GLOBAL_LIMIT"]),
    period=HOUR,
    start=float(os.environ["SCALE_WINDOW_START"]),
)
# Fail closed and no in-process fallback: a store call that fails shows as a 503, counted as a
# failure, never hidden as a local decision.
rules = [
    dataclasses.replace(rule, config=window if rule.name == GLOBAL else rule.config, fail="closed")
    for rule in preset_rules()
]
app = create_app(
    GuardSettings(
        store="convex",
        rules=rules,
        trusted_proxies=["127.0.0.1"],
        # The loopback server runs one call at a time: under 64 clients a call may queue for
        # a while, which is not an outage; a real backend answers within milliseconds.
        timeout=10.0,
        store_fallback=False,
    ),
    upstream=None,
)
