"""User-space instructions per request of the uvicorn server, counted by valgrind's callgrind.

Run: `make bench` (or `.venv/bin/python -m benchmarks.instructions`). Wall-clock ratios under
wrk (benchmarks/http_overhead.py) drift by ±0.05 between runs on a shared machine; an
instruction count does not: callgrind counts what the server process executes, and that is the
same run after run whatever else the machine does. Each variant of benchmarks/apps.py is served
by uvicorn (one worker, uvloop + httptools, no access log) under
`valgrind --tool=callgrind` (Debian's package; `make bench` installs it) and sent a fixed
number of browser requests over 32 keep-alive connections by a client in this process (not
under valgrind). Every variant is run twice, with a tenth of the requests and with all of them,
and the difference of the two counts over the difference of the requests served cancels the
start-up and shutdown cost. Two servers run at a time: the counts do not depend on the load.
One exception: slowapi's `limits` memory storage expires keys from a 10 ms timer thread, whose
work follows the wall time rather than the requests, so its count moves by about 1% between
runs and is somewhat inflated (valgrind's slowdown gives it more firings per request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from benchmarks.apps import PATH, VARIANTS
from benchmarks.http_overhead import BROWSER, ROOT, free_port

DEFAULT_VARIANTS = ("bare", "guard", "asgi-ratelimit", "slowapi-asgi")
CONNECTIONS = 32
HEADERS = {"User-Agent": BROWSER, "Accept-Language": "en-US,en;q=0.9"}
#: Valgrind runs the server about 50x slower than natively: start-up takes 50-70 s alone, and
#: over 120 s beside a second server on a busy machine.
STARTUP_SECONDS = 300.0
#: The longest the server may take to answer one request or to exit after SIGINT.
STALL_SECONDS = 120.0
COLLECTED = re.compile(rb"^==(\d+)== Collected : (\d+)$", re.MULTILINE)
_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


@dataclass(frozen=True)
class Run:
    served: int  # requests answered 200, the health check's included
    instructions: int  # callgrind's total for the server process


def unique_port() -> int:
    """A free port no other job of this process has been given (the servers run in parallel)."""
    with _ports_lock:
        while (port := free_port()) in _ports_taken:
            pass
        _ports_taken.add(port)
        return port


def server_command(port: int) -> list[str]:
    return [
        *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
        *(sys.executable, "-m", "uvicorn", "--factory", "benchmarks.apps:make"),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"),
    ]


def wait_ready(process: subprocess.Popen[bytes], url: str, variant: str) -> int:
    """Poll until the server answers; return the requests it served (200s), always 1.

    A refused connection costs the server nothing; once it accepts (uvicorn binds only after
    loading the app), the one request is waited for to the end, so that no request the server
    served goes uncounted. Anything but a 200 is an error.
    """
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{variant}: server exited with {process.returncode}")
        try:
            timeout = httpx.Timeout(STALL_SECONDS, connect=1.0)
            response = httpx.get(url + PATH, headers=HEADERS, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: server did not start") from None
            time.sleep(0.2)
            continue
        if response.status_code != 200:
            raise RuntimeError(f"{variant}: health check got {response.status_code}")
        return 1


async def load(port: int, requests: int, connections: int) -> int:
    """Send `requests` GETs over `connections` keep-alive connections; return the 200s."""
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {BROWSER}\r\n"
        "Accept-Language: en-US,en;q=0.9\r\n\r\n"
    ).encode()
    remaining = requests

    async def connection() -> int:
        nonlocal remaining
        done = 0
        async with asyncio.timeout(STALL_SECONDS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                writer.write(request)
                async with asyncio.timeout(STALL_SECONDS):
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = head.split(b" ", 2)[1]
                    assert status == b"200", head
                    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
                    assert match is not None, head
                    await reader.readexactly(int(match.group(1)))
                done += 1
        finally:
            writer.close()
            await writer.wait_closed()
        return done

    counts = await asyncio.gather(*(connection() for _ in range(connections)))
    return sum(counts)


def run(variant: str, requests: int) -> Run:
    """Serve `variant` under callgrind, send it `requests` requests, stop it, read its count."""
    port = unique_port()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            server_command(port),
            cwd=ROOT,
            # A fixed hash seed: the same dict and set probing on every run.
            env={**os.environ, "VARIANT": variant, "PYTHONHASHSEED": "0"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            served = wait_ready(process, f"http://127.0.0.1:{port}", variant)
            served += asyncio.run(load(port, requests, CONNECTIONS))
            # Let the server see the 32 connections close before it is told to stop, so that
            # the shutdown is the same on every run.
            time.sleep(1)
            process.send_signal(signal.SIGINT)
            process.wait(timeout=STALL_SECONDS)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr.seek(0)
        output = stderr.read()
    match = COLLECTED.search(output)
    if match is None or int(match.group(1)) != process.pid:
        tail = output.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{variant}: no callgrind summary in the server's stderr:\n{tail}")
    return Run(served=served, instructions=int(match.group(2)))


def measure(variants: list[str], requests: int) -> dict[str, float]:
    """Instructions per request of each variant: the difference of a short and a long run."""
    small = max(requests // 10, 1)
    if small >= requests:
        raise SystemExit(f"--requests must be at least 2, got {requests}")
    jobs = [(variant, count) for variant in variants for count in (requests, small)]
    with ThreadPoolExecutor(2) as pool:  # two cores: two servers at a time
        futures = {job: pool.submit(run, *job) for job in jobs}
        runs = {job: future.result() for job, future in futures.items()}
    per_request: dict[str, float] = {}
    for variant in variants:
        full, short = runs[variant, requests], runs[variant, small]
        per_request[variant] = (full.instructions - short.instructions) / (
            full.served - short.served
        )
    return per_request


def table(per_request: dict[str, float]) -> str:
    bare = per_request.get("bare")
    slow = per_request.get("slowapi-asgi")
    lines = [
        "| variant | instructions/request | ratio to bare | ratio to slowapi-asgi |",
        "|---|---:|---:|---:|",
    ]
    for variant, count in per_request.items():
        vs_bare = f"{bare / count:.2f}x" if bare else "-"
        vs_slow = f"{slow / count:.2f}x" if slow else "-"
        lines.append(f"| {variant} | {count / 1000:,.1f} k | {vs_bare} | {vs_slow} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit(
            "valgrind is not installed: `make bench` installs it (apt-get install valgrind)"
        )
    per_request = measure(args.variants, args.requests)
    small = max(args.requests // 10, 1)
    print(
        f"callgrind instructions of the uvicorn process, {args.requests} minus {small} requests "
        f"over {CONNECTIONS} keep-alive connections, uvicorn 1 worker (uvloop, httptools)\n\n"
        f"{table(per_request)}\n\n"
        "User-space instructions of the server process only: the kernel's socket work, the "
        "same per request for every variant, is not counted, so wall-clock ratios are closer "
        "to 1. The same count on every run, except slowapi-asgi's (±1%: the "
        "`limits` memory storage expires keys from a 10 ms timer thread, whose work follows "
        "the wall time, which valgrind stretches)."
    )


if __name__ == "__main__":
    main()
