"""MemoryStore decisions beside the `limits` library, measured interleaved in one run.

Run: `make bench` (all) or `.venv/bin/python -m benchmarks.limiter`. Prints ops/s for one hot
key and for 100,000 distinct keys, the ratio to `limits`' FixedWindowRateLimiter on its
MemoryStorage measured in the same rounds, and the peak memory per live key. Below the table,
the floor of state creation in Python: a bare dict storing a pair of floats under a new key and
under a known one (what any store pays before its own bookkeeping).

`--callgrind` counts instructions per decision instead (valgrind's callgrind), for one hot key
and for 100,000 keys with one decision each: the same figure on every run, where the wall-clock
ratio drifts with what else the machine does. Each contender makes its decisions between two
marks (`os.getppid()`, at which callgrind dumps its counts: `--dump-before=getppid`), through
the same functions as the wall-clock table, after a warm-up on keys of its own. Only the main
thread is counted (`--separate-threads=yes`): `limits`' MemoryStorage expires keys from a timer
thread that fires every 10 ms of wall time, walking every key, and valgrind's slowdown gives it
many more firings per decision than a real run would; leaving that work out counts `limits` at
its cheapest.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from benchmarks.instructions import TOTALS
from convex_guard import MINUTE, FixedWindow, MemoryStore

HUGE = 10**9  # a limit that never denies: we measure the decision, not the 429 path


def bench_limits(keys: list[str], ops: int) -> float:
    limiter = FixedWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerMinute(HUGE)
    n = len(keys)
    started = time.perf_counter()
    for i in range(ops):
        limiter.hit(item, keys[i % n])
    return ops / (time.perf_counter() - started)


def bench_memory_store(keys: list[str], ops: int) -> float:
    store = MemoryStore()
    config = FixedWindow(rate=HUGE, period=MINUTE)
    n = len(keys)

    async def run() -> float:
        started = time.perf_counter()
        for i in range(ops):
            await store.limit("bench", config, key=keys[i % n])
        return ops / (time.perf_counter() - started)

    return asyncio.run(run())


def bare_dict_ns(keys: list[str], known: bool, rounds: int) -> float:
    """Median ns per `states[key] = (value, ts)` over `keys`: into an empty dict or a full one."""
    timings: list[float] = []
    for _ in range(rounds):
        gc.collect()
        states: dict[str, tuple[float, float]] = dict.fromkeys(keys, (0.0, 0.0)) if known else {}
        now = time.time() * 1000.0
        started = time.perf_counter()
        for key in keys:
            states[key] = (now + 1.0, now)
        timings.append((time.perf_counter() - started) / len(keys) * 1e9)
    return statistics.median(timings)


def peak_bytes_per_key(keys: int) -> float:
    """Peak traced memory of a MemoryStore holding `keys` live limit states, per key."""
    store = MemoryStore()
    # Windows aligned to now, so no state is full again (and forgotten) while we count.
    config = FixedWindow(rate=HUGE, period=MINUTE, start=int(time.time() * 1000))
    names = [f"k{i}" for i in range(keys)]

    async def fill() -> None:
        for name in names:
            await store.limit("bench", config, key=name)

    gc.collect()
    tracemalloc.start()
    asyncio.run(fill())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert store.limit_keys == keys
    return peak / keys


#: The two contenders, `limits` first (the ratios are ours over theirs).
CONTENDERS: dict[str, Callable[[list[str], int], float]] = {
    "limits FixedWindowRateLimiter": bench_limits,
    "convex_guard MemoryStore": bench_memory_store,
}
#: `--callgrind`'s cases: (keys, decisions), each decision of the second on a key not seen yet.
CALLGRIND_CASES: dict[str, tuple[int, int]] = {
    "1 key": (1, 20_000),
    "100,000 keys x 1": (100_000, 100_000),
}
#: Decisions on keys of its own each contender makes before its first mark.
WARM_UP = 2_000


def marked() -> None:
    """The process callgrind watches: per case, each contender's decisions between two marks,
    after a warm-up on keys of its own."""
    warm = [f"warm-{i}" for i in range(WARM_UP)]
    for keys, ops in CALLGRIND_CASES.values():
        names = ["hot"] if keys == 1 else [f"client-{i}" for i in range(keys)]
        for bench in CONTENDERS.values():
            bench(warm, WARM_UP)
            os.getppid()
            bench(names, ops)
            os.getppid()


def callgrind() -> None:
    """Run `marked` under callgrind and print instructions per decision, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="limiter-callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--dump-before=getppid", "--separate-threads=yes",
             f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.limiter",
             "--marked"],
            check=True, capture_output=True,
        )  # fmt: skip
        # The main thread's dumps, in order: every second one holds a contender's decisions.
        counts: list[int] = []
        for number in range(1, 1 + 2 * len(CALLGRIND_CASES) * len(CONTENDERS)):
            totals = TOTALS.search(Path(f"{out}.{number}-01").read_text(errors="replace"))
            if totals is None:
                raise RuntimeError(f"callgrind dump {number} holds no totals")
            counts.append(int(totals[1]))
    print("instructions per decision (callgrind, main thread)\n")
    print(f"| case | decisions | {' | '.join(CONTENDERS)} | ratio |")
    print(f"|---|---:|{'---:|' * len(CONTENDERS)}---:|")
    measured = iter(counts[1::2])
    for case, (_, ops) in CALLGRIND_CASES.items():
        theirs, ours = (next(measured) / ops for _ in CONTENDERS)
        print(f"| {case} | {ops:,} | {theirs:,.0f} | {ours:,.0f} | {theirs / ours:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=300_000)
    parser.add_argument(
        "--callgrind", action="store_true", help="count instructions under callgrind instead"
    )
    parser.add_argument("--marked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.marked:
        marked()
        return
    if args.callgrind:
        callgrind()
        return

    many = [f"client-{i}" for i in range(100_000)]
    # (keys, decisions): one hot key; 100,000 clients making 1, 3 and 10 requests each (the
    # first request of each client creates its state, so the share of creations differs: all,
    # a third, a tenth).
    cases: dict[str, tuple[list[str], int]] = {
        "1 key": (["hot"], args.ops),
        "100,000 keys x 1": (many, 100_000),
        "100,000 keys x 3": (many, 300_000),
        "100,000 keys x 10": (many, 1_000_000),
    }
    contenders = CONTENDERS
    print(f"{args.rounds} interleaved rounds per case\n")
    print(f"| case | decisions | {' | '.join(contenders)} | ratio (median of per-round ratios) |")
    print(f"|---|---:|{'---:|' * len(contenders)}---:|")
    for case, (keys, ops) in cases.items():
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        ratios: list[float] = []
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                gc.collect()
                rates[name].append(fn(keys, ops))
            base, ours = (rates[name][-1] for name in contenders)
            ratios.append(ours / base)
        medians = " | ".join(f"{statistics.median(r):,.0f} ops/s" for r in rates.values())
        print(f"| {case} | {ops:,} | {medians} | {statistics.median(ratios):.2f}x |")
    print(
        f"\nfloor (a bare dict, 100,000 keys): {bare_dict_ns(many, False, args.rounds):.0f} ns "
        f"per new key, {bare_dict_ns(many, True, args.rounds):.0f} ns per known key"
    )
    print(f"peak memory per live key (100,000 keys): {peak_bytes_per_key(100_000):.0f} bytes")


if __name__ == "__main__":
    main()
