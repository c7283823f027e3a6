"""Instructions per request, counted by valgrind's callgrind: in-process and over uvicorn.

Run: `make bench` (or `.venv/bin/python -m benchmarks.instructions`). Wall-clock ratios under
wrk (benchmarks/http_overhead.py) drift by ±0.05 between runs on a shared machine; an
instruction count does not: callgrind counts what one process executes, and that is the same
run after run whatever else the machine does. Each variant of benchmarks/apps.py is measured in
two modes, each in its own process under `valgrind --tool=callgrind` (Debian's package;
`make bench` installs it):

- in-process: benchmarks/drive.py calls the variant's ASGI app directly in a loop (the request
  and loop of benchmarks/cpu.py): the app and its middlewares alone, no server, no socket. The
  driver warms up, then marks the start and the end of the measured requests with a call
  callgrind dumps its counts at (`--dump-before=getppid`): the count between the two marks is
  the requests' alone, from one process.
- uvicorn: the variant is served by uvicorn (one worker, uvloop + httptools, no access log) and
  sent browser requests over 32 keep-alive connections by a client in this process (not under
  valgrind); the count is the server process's. Every variant is served twice, with a tenth of
  the requests and with all of them, and the difference of the two counts over the difference
  of the requests served cancels the start-up and shutdown cost.

Two processes run at a time: the counts do not depend on the load.
One exception: slowapi's `limits` memory storage expires keys from a 10 ms timer thread, whose
work follows the wall time rather than the requests, so its count moves by about 1% between
runs and is somewhat inflated (valgrind's slowdown gives it more firings per request).

Below the tables, per mode and tree: the guard's cost over bare divided by the floor's (the
issue's target: at most 1.5), the cost of each extra rule (guard-1 to guard-5 over 4, beside
floor-1 to floor-5), what 1,000,000 distinct clients add to one client's figure (both through
the same scaffolding that sets the address; target: at most 10%) and what an 8 kB user-agent
adds to the guard's.

Options:

- `--requests N` (default 1500): the requests measured (over uvicorn: the long run's; the
  short run's are N // 10).
- `--variants NAME...` (default: every variant but ratelimit and slowapi-basehttp; guard-tokens
  is a token-limited route beside guard's request-limited one).
- `--modes MODE...` (default: in-process uvicorn).
- `--quick`: in-process only, bare, floor and guard, 300 requests: `make bench-quick`, the check a
  developer runs before pushing (under a minute on an idle machine).
- `--baseline REV` (repeatable): also measure git revision REV (a commit id, tag or branch) in
  the same run. Its tree is exported (`git archive REV`) into a temporary directory and lends
  its `convex_guard` (that tree's `src` first on PYTHONPATH); the variants are this tree's
  benchmarks/apps.py and the driver this tree's benchmarks/drive.py, so both trees serve the
  same apps to the same loop whatever that revision's benchmarks held. The tables then give
  each tree's figure and this tree's over the baseline's per variant and mode (1.05x: 5% more
  instructions per request than at REV). Bare and the floor import nothing of convex_guard, so
  a baseline's figure for them is this tree's, measured once.

"ratio to bare" and "ratio to slowapi-asgi" are this tree's, the other way up: how many times
as fast as that variant, by instructions (0.5x: twice the instructions per request).

This tree is measured as it is on disk (uncommitted changes included), with its own `src` first
on PYTHONPATH whatever package the environment has installed.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from benchmarks.apps import PATH, VARIANTS
from benchmarks.http_overhead import BROWSER, ROOT, free_port

T = TypeVar("T")

DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in ("ratelimit", "slowapi-basehttp"))
QUICK_VARIANTS = ("bare", "floor", "guard")
#: Variants that import nothing of convex_guard: a baseline's figure is this tree's, not rerun.
TREE_INDEPENDENT = frozenset(("bare", "floor", "floor-1", "floor-5"))
QUICK_REQUESTS = 300
MODES = ("in-process", "uvicorn")
CONNECTIONS = 32
HEADERS = {"User-Agent": BROWSER, "Accept-Language": "en-US,en;q=0.9"}
#: Valgrind runs the server about 50x slower than natively: start-up takes 50-70 s alone, and
#: over 120 s beside a second server on a busy machine.
STARTUP_SECONDS = 300.0
#: The longest the server may take to answer one request or to exit after SIGINT.
STALL_SECONDS = 120.0
#: The longest an in-process run may take (its start-up included), under valgrind.
DRIVE_SECONDS = 900.0
CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
COLLECTED = re.compile(rb"^==(\d+)== Collected : (\d+)$", re.MULTILINE)
TOTALS = re.compile(r"^totals: (\d+)$", re.MULTILINE)
_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


@dataclass(frozen=True)
class Tree:
    """A source tree to measure: this one, or a baseline revision's exported copy."""

    label: str
    root: Path

    @property
    def current(self) -> bool:
        return self.root == ROOT

    def env(self, variant: str, *, path: tuple[Path, ...]) -> dict[str, str]:
        """The environment of a measured process: `path` first on PYTHONPATH."""
        inherited = os.environ.get("PYTHONPATH")
        pythonpath = [str(entry) for entry in path] + ([inherited] if inherited else [])
        return {
            **os.environ,
            "VARIANT": variant,
            "PYTHONPATH": os.pathsep.join(pythonpath),
            # A fixed hash seed: the same dict and set probing on every run.
            "PYTHONHASHSEED": "0",
        }


@dataclass(frozen=True)
class Run:
    served: int  # requests answered 200 (over uvicorn, the health check's included)
    instructions: int  # callgrind's total for the measured process


def unique_port() -> int:
    """A free port no other job of this process has been given (the servers run in parallel)."""
    with _ports_lock:
        while (port := free_port()) in _ports_taken:
            pass
        _ports_taken.add(port)
        return port


def server_command(port: int) -> list[str]:
    return [
        *CALLGRIND,
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


def collected(output: bytes, pid: int, what: str) -> int:
    """The instruction total callgrind printed for process `pid` in its stderr `output`."""
    match = COLLECTED.search(output)
    if match is None or int(match.group(1)) != pid:
        tail = output.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{what}: no callgrind summary in its stderr:\n{tail}")
    return int(match.group(2))


def supervised(
    command: list[str], tree: Tree, variant: str, drive: Callable[[subprocess.Popen[bytes]], T]
) -> tuple[T, subprocess.Popen[bytes], bytes]:
    """Start `command` with `tree`'s `src` first on the path, `drive` it, and kill it if it is
    still running then (a failed drive must not leave a process under valgrind behind): what
    `drive` answered, the finished process and its stderr (where callgrind prints)."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            command,
            cwd=ROOT,  # uvicorn and the driver import `benchmarks.apps` from here: this tree's
            env=tree.env(variant, path=(tree.root / "src", ROOT)),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            result = drive(process)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr.seek(0)
        return result, process, stderr.read()


def run_uvicorn(tree: Tree, variant: str, requests: int) -> Run:
    """Serve `variant` under callgrind, send it `requests` requests, stop it, read its count."""
    port = unique_port()

    def serve(process: subprocess.Popen[bytes]) -> int:
        served = wait_ready(process, f"http://127.0.0.1:{port}", variant)
        served += asyncio.run(load(port, requests, CONNECTIONS))
        # Let the server see the 32 connections close before it is told to stop, so that
        # the shutdown is the same on every run.
        time.sleep(1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=STALL_SECONDS)
        return served

    served, process, output = supervised(server_command(port), tree, variant, serve)
    what = f"{tree.label} {variant} over uvicorn"
    return Run(served=served, instructions=collected(output, process.pid, what))


def run_in_process(tree: Tree, variant: str, requests: int) -> Run:
    """Drive `variant`'s app in a process under callgrind; count the measured requests alone.

    The driver is this tree's benchmarks/drive.py, serving this tree's apps: a baseline tree
    only lends its `src`. Callgrind writes a dump at each of the driver's two marks and one at
    exit; the second holds the `requests` measured requests.
    """
    with tempfile.TemporaryDirectory(prefix="callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        command = [
            *("valgrind", "--tool=callgrind", "--dump-before=getppid"),
            f"--callgrind-out-file={out}",
            *(sys.executable, "-m", "benchmarks.drive", variant, str(requests)),
        ]
        _, process, output = supervised(
            command, tree, variant, lambda process: process.wait(timeout=DRIVE_SECONDS)
        )
        what = f"{tree.label} {variant} in-process"
        if process.returncode != 0:
            tail = output.decode(errors="replace")[-2000:]
            raise RuntimeError(f"{what}: the driver exited with {process.returncode}:\n{tail}")
        dumps = sorted(Path(directory).glob("callgrind.out.*"))
        if len(dumps) != 2:
            raise RuntimeError(f"{what}: expected the driver's 2 marks, callgrind saw {len(dumps)}")
        totals = TOTALS.search(Path(f"{out}.2").read_text(errors="replace"))
        if totals is None:
            raise RuntimeError(f"{what}: no totals in the measured requests' dump")
    return Run(served=requests, instructions=int(totals[1]))


RUNNERS = {"in-process": run_in_process, "uvicorn": run_uvicorn}


@contextmanager
def exported(revision: str) -> Iterator[Tree]:
    """Git revision `revision`'s tree, extracted into a temporary directory for the run."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", f"{revision}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--baseline {revision}: {exc.stderr.strip() or exc}") from None
    with tempfile.TemporaryDirectory(prefix=f"baseline-{commit}-") as directory:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
        root = Path(directory)
        if not (root / "benchmarks" / "apps.py").is_file():
            raise SystemExit(f"--baseline {revision}: its tree has no benchmarks/apps.py")
        label = revision if revision.startswith(commit) else f"{revision} ({commit})"
        yield Tree(label=label, root=root)


Key = tuple[str, str, str]  # (tree label, mode, variant)


def measure(
    trees: list[Tree],
    modes: list[str],
    variants: list[str],
    requests: int,
    failures: dict[Key, str],
) -> dict[Key, float]:
    """Instructions per request of each variant: in-process, the measured requests' count over
    their number; over uvicorn, the difference of a short and a long run over theirs. A run
    that failed leaves its figure out and its reason in `failures`."""
    small = max(requests // 10, 1)
    if small >= requests:
        raise SystemExit(f"--requests must be at least 2, got {requests}")
    jobs = [
        (tree, mode, variant, count)
        for tree in trees
        for mode in modes
        for variant in variants
        if tree.current or variant not in TREE_INDEPENDENT
        for count in ((requests,) if mode == "in-process" else (requests, small))
    ]
    runs: dict[tuple[Tree, str, str, int], Run] = {}
    with ThreadPoolExecutor(2) as pool:  # two cores: two measured processes at a time
        futures = {job: pool.submit(RUNNERS[job[1]], job[0], job[2], job[3]) for job in jobs}
        for job, future in futures.items():
            # One run that fails (a server that did not start on a loaded machine) costs its
            # own row, not the figures of every other run of a long benchmark.
            try:
                runs[job] = future.result()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                tree, mode, variant, _ = job
                failures.setdefault((tree.label, mode, variant), f"{exc}".splitlines()[0])
    per_request: dict[Key, float] = {}
    for tree in trees:
        for mode in modes:
            for variant in variants:
                if not tree.current and variant in TREE_INDEPENDENT:
                    continue
                if (tree.label, mode, variant) in failures:
                    continue
                full = runs[tree, mode, variant, requests]
                if mode == "in-process":
                    per_request[tree.label, mode, variant] = full.instructions / full.served
                    continue
                short = runs[tree, mode, variant, small]
                per_request[tree.label, mode, variant] = (
                    full.instructions - short.instructions
                ) / (full.served - short.served)
    for tree in trees[1:]:
        for mode in modes:
            for variant in TREE_INDEPENDENT.intersection(variants):
                if (trees[0].label, mode, variant) in per_request:
                    per_request[tree.label, mode, variant] = per_request[
                        trees[0].label, mode, variant
                    ]
    return per_request


def table(per_request: dict[Key, float], trees: list[Tree], mode: str, variants: list[str]) -> str:
    """One mode's table: this tree's figure, each baseline's and the ratio, and this tree's
    ratios to bare and to slowapi-asgi (how many times as fast, by instructions)."""
    this, *baselines = (tree.label for tree in trees)
    bare = per_request.get((this, mode, "bare"))
    slow = per_request.get((this, mode, "slowapi-asgi"))
    header = ["variant", this]
    for label in baselines:
        header += [label, f"{this} / {label}"]
    header += ["ratio to bare", "ratio to slowapi-asgi"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for variant in variants:
        count = per_request.get((this, mode, variant))
        cells = [variant, f"{count / 1000:,.1f} k" if count else "failed"]
        for label in baselines:
            old = per_request.get((label, mode, variant))
            cells += [
                f"{old / 1000:,.1f} k" if old else "failed",
                f"{count / old:.3f}x" if count and old else "-",
            ]
        cells += [
            f"{bare / count:.2f}x" if bare and count else "-",
            f"{slow / count:.2f}x" if slow and count else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(per_request: dict[Key, float], tree: str, mode: str) -> list[str]:
    """The issue's targets for one tree and mode, from the variants that were measured."""

    def get(variant: str) -> float | None:
        return per_request.get((tree, mode, variant))

    lines: list[str] = []
    bare, floor, guard = get("bare"), get("floor"), get("guard")
    if floor is not None and guard is not None:
        lines.append(
            f"guard / floor: {guard / floor:.2f}x ({guard / 1000:,.1f} k / {floor / 1000:,.1f} k)"
        )
    if bare is not None and floor is not None and floor > bare:
        # The default, then with `ratelimit_items="closest"` (fewer header bytes).
        for variant, label in (("guard", "guard's"), ("guard-closest", "guard-closest's")):
            count = get(variant)
            if count is None:
                continue
            over = (count - bare) / (floor - bare)
            lines.append(
                f"{label} cost over bare / floor's: {over:.2f}x "
                f"(+{(count - bare) / 1000:,.1f} k / +{(floor - bare) / 1000:,.1f} k; "
                "target <= 1.5x)"
            )
    slopes = {
        name: (high - low) / 4
        for name in ("guard", "floor")
        if (low := get(f"{name}-1")) is not None and (high := get(f"{name}-5")) is not None
    }
    if slopes:
        text = ", ".join(f"{name} {slope / 1000:+,.1f} k" for name, slope in slopes.items())
        if len(slopes) == 2 and slopes["floor"] > 0:
            text += f"; ratio {slopes['guard'] / slopes['floor']:.2f}x (target <= 1.5x)"
        lines.append(f"per extra rule (1 to 5 rules, over 4): {text}")
    one = get("guard-1-client")
    for variant, what, reference, target in (
        ("guard-1m-clients", "1,000,000 distinct clients", "guard-1-client", " (target <= 10%)"),
        ("guard-8k-ua", "an 8 kB user-agent", "guard", ""),
    ):
        count, base = get(variant), (one if reference == "guard-1-client" else guard)
        if count is not None and base is not None:
            lines.append(
                f"{what}: {(count - base) / 1000:+,.1f} k over {reference} "
                f"({(count - base) / base:+.1%}){target}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="REV",
        help="also measure this git revision's tree in the same run (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"in-process only, {' and '.join(QUICK_VARIANTS)}, {QUICK_REQUESTS} requests",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.modes, args.variants, args.requests = (
            ["in-process"],
            list(QUICK_VARIANTS),
            QUICK_REQUESTS,
        )
    if shutil.which("valgrind") is None:
        raise SystemExit(
            "valgrind is not installed: `make bench` installs it (apt-get install valgrind)"
        )
    with ExitStack() as stack:
        trees = [Tree(label="this tree", root=ROOT)]
        trees += [stack.enter_context(exported(revision)) for revision in args.baseline]
        failures: dict[Key, str] = {}
        per_request = measure(trees, args.modes, args.variants, args.requests, failures)
    small = max(args.requests // 10, 1)
    described = {
        "in-process": "callgrind instructions of a process calling the ASGI app directly "
        "(benchmarks/drive.py)",
        "uvicorn": f"callgrind instructions of the uvicorn process, over {CONNECTIONS} "
        "keep-alive connections, uvicorn 1 worker (uvloop, httptools)",
    }
    counted = {
        "in-process": f"{args.requests} requests after {small} to warm up",
        "uvicorn": f"{args.requests} minus {small} requests",
    }
    sections = []
    for mode in args.modes:
        section = f"{mode}: {described[mode]}, {counted[mode]}\n\n"
        if not args.quick:
            section += table(per_request, trees, mode, args.variants) + "\n\n"
        for tree in trees:
            lines = targets(per_request, tree.label, mode)
            if lines:
                section += f"{tree.label}:\n" + "".join(f"- {line}\n" for line in lines)
        for (label, failed_mode, variant), reason in failures.items():
            if failed_mode == mode:
                section += f"failed: {variant} ({label}): {reason}\n"
        sections.append(section.rstrip())
    if args.quick:
        print("\n\n".join(sections))
        return
    print(
        "\n\n".join(sections) + "\n\n"
        "User-space instructions of the measured process only: over uvicorn the kernel's "
        "socket work, the same per request for every variant, is not counted, so wall-clock "
        "ratios are closer to 1. The same count on every run, except slowapi-asgi's (±1%: the "
        "`limits` memory storage expires keys from a 10 ms timer thread, whose work follows "
        "the wall time, which valgrind stretches)."
    )


if __name__ == "__main__":
    main()
