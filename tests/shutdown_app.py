"""The example gateway on the Convex store the environment names, with a log writer that holds
its rows (a long interval, large batches): what `uvicorn tests.shutdown_app:app` has buffered
when it gets SIGTERM is what the graceful-shutdown test counts."""

from __future__ import annotations

from examples.gateway import create_app

from convex_guard import HOUR, FixedWindow, GuardSettings, Rule

app = create_app(
    GuardSettings(
        store="convex",
        rules=[Rule("shutdownIp", FixedWindow(rate=1_000_000, period=HOUR), key="ip")],
        writer_interval=60.0,
        writer_batch_size=5000,
    ),
    upstream=None,
)
