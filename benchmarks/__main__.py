"""`make bench`: every benchmark in one run, printed and written to benchmarks/results/latest.md.

Each benchmark measures its contenders interleaved and prints ratios against a baseline from
the same run; absolute figures on a shared machine drift by 2-3x, the ratios much less.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"
SECTIONS = [
    ("Limiter: MemoryStore beside the `limits` library", "benchmarks.limiter"),
    ("User-agent classification", "benchmarks.useragent"),
    ("Per-request CPU by middleware (in-process)", "benchmarks.cpu"),
    ("HTTP overhead under wrk", "benchmarks.http_overhead"),
    ("HTTP: instructions per request (callgrind)", "benchmarks.instructions"),
    ("Convex path: ConvexStore on the loopback test server", "benchmarks.convex_path"),
    ("Convex at scale: app instances sharing one deployment", "benchmarks.convex_scale"),
]


def machine() -> str:
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    packages = ", ".join(
        f"{name} {version(name)}"
        for name in ("starlette", "uvicorn", "pydantic", "limits", "slowapi", "convex")
    )
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} cores, {cpu}; "
        f"Python {platform.python_version()}; {wrk.splitlines()[0] if wrk else 'no wrk'}; "
        f"{packages}"
    )


def main() -> None:
    parts = [f"# Benchmarks\n\n{machine()}\n"]
    for title, module in SECTIONS:
        print(f"\n## {title}\n", flush=True)
        buffer = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(buffer):
            importlib.import_module(module).main([])
        text = buffer.getvalue().strip()
        print(text, flush=True)
        parts.append(f"## {title}\n\n{text}\n\n({time.monotonic() - started:.0f} s)\n")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(parts))
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
