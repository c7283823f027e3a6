"""User-agent classification cost, uncached and cached, beside the seed's regex in the same run.

Run: `.venv/bin/python -m benchmarks.useragent`. For every distinct user-agent of the labelled set
(tests/data/user_agents.csv) the best of several timed loops gives ns per call; the table shows
the median over people's browsers, over bots and over all, for our classifier without and with its
LRU cache and for the seed's single case-insensitive regex.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

from benchmarks.useragent_accuracy import SEED_RE, load_labelled
from convex_guard.core.useragent import classify_user_agent, classify_user_agent_uncached


def ns_per_call(fn: Callable[[str], object], ua: str, loops: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(loops):
            fn(ua)
        best = min(best, (time.perf_counter_ns() - started) / loops)
    return best


def seed(ua: str) -> object:
    return SEED_RE.search(ua)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loops", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    rows = load_labelled()
    groups = {
        "people": sorted({ua for expected, _, ua in rows if expected == "human"}),
        "bots": sorted({ua for expected, _, ua in rows if expected != "human"}),
    }
    groups["all"] = groups["people"] + groups["bots"]
    for ua in groups["all"]:
        classify_user_agent(ua)  # warm the cache for the cached column

    contenders: dict[str, Callable[[str], object]] = {
        "ours, uncached": classify_user_agent_uncached,
        "ours, cached": classify_user_agent,
        "seed regex": seed,
    }
    gc.disable()
    try:
        medians = {
            (name, group): statistics.median(
                ns_per_call(fn, ua, args.loops, args.rounds) for ua in uas
            )
            for name, fn in contenders.items()
            for group, uas in groups.items()
        }
    finally:
        gc.enable()

    sizes = {group: len(uas) for group, uas in groups.items()}
    header = "".join(f"{g + f' ({n})':>16}" for g, n in sizes.items())
    print(f"median ns per classification, distinct user-agents\n{'':<18}{header}")
    for name in contenders:
        cells = "".join(f"{medians[(name, g)]:>16.0f}" for g in groups)
        print(f"{name:<18}{cells}")
    ratio = "".join(
        f"{medians[('ours, uncached', g)] / medians[('seed regex', g)]:>16.2f}" for g in groups
    )
    print(f"{'uncached / seed':<18}{ratio}")


if __name__ == "__main__":
    main()
