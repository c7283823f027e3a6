"""HTTP overhead of the guard: requests/s under wrk against a bare app and its peers, one run.

Run: `make bench` (or `.venv/bin/python -m benchmarks.http_overhead`). Each variant of
benchmarks/apps.py is served by uvicorn (one worker, uvloop + httptools, no access log) on a
free loopback port and loaded by `wrk` (Debian's package; `make bench` installs it); variants
are measured interleaved (A B C … A B C …) so that machine drift hits all alike, and the table
gives the median requests/s and the median of the per-round ratios to the bare app.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.apps import PATH, VARIANTS

ROOT = Path(__file__).resolve().parents[1]
#: wrk sends no User-Agent by default, which the bot detection rightly finds suspicious.
BROWSER = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(variant: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "benchmarks.apps:make",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "VARIANT": variant},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            response = httpx.get(url + PATH, timeout=1)
            if response.status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"{variant}: server did not start")
        time.sleep(0.05)


def wrk(url: str, seconds: int, connections: int) -> float:
    out = subprocess.run(
        [
            *("wrk", "-t1", f"-c{connections}", f"-d{seconds}s"),
            *("-H", f"User-Agent: {BROWSER}", "-H", "Accept-Language: en-US,en;q=0.9"),
            url + PATH,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk output unexpected:\n{out}")
    return float(match.group(1))


def measure(
    variants: list[str], rounds: int, seconds: int, connections: int
) -> dict[str, list[float]]:
    servers = {v: start(v) for v in variants}
    try:
        for _, url in servers.values():
            wrk(url, 1, connections)  # warm-up
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for variant in variants:
                rates[variant].append(wrk(servers[variant][1], seconds, connections))
        return rates
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=10)


def table(rates: dict[str, list[float]]) -> str:
    bare = rates["bare"]
    lines = [
        "| variant | requests/s (median) | ratio to bare | ratio to slowapi-asgi |",
        "|---|---:|---:|---:|",
    ]
    slow = rates.get("slowapi-asgi")
    for variant, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, bare, strict=True))
        vs_slow = (
            f"{statistics.median(v / s for v, s in zip(values, slow, strict=True)):.2f}x"
            if slow
            else "-"
        )
        lines.append(f"| {variant} | {statistics.median(values):,.0f} | {ratio:.2f}x | {vs_slow} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    rates = measure(args.variants, args.rounds, args.seconds, args.connections)
    text = (
        f"{args.rounds} interleaved rounds of {args.seconds} s per variant, wrk -t1 "
        f"-c{args.connections}, uvicorn 1 worker (uvloop, httptools)\n\n{table(rates)}"
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
