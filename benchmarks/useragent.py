"""User-agent classification cost, uncached and cached, beside the seed's regex in the same run.

Run: `.venv/bin/python -m benchmarks.useragent`. For every distinct user-agent of the labelled set
(tests/data/user_agents.csv) the best of several timed loops gives ns per call; the table shows
the median over people's browsers, over bots and over all, for our classifier without and with its
LRU cache and for the seed's single case-insensitive regex. `--against REF` adds the classifier
(module and data) as it was at git revision REF, timed in the same run: before and after on one
machine at one moment, which a shared machine's noise otherwise makes meaningless.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def classifier_at(ref: str) -> Callable[[str], object]:
    """``classify_user_agent_uncached`` as of git revision ``ref``, imported from a copy."""
    root = Path(__file__).resolve().parent.parent
    src = "src/convex_guard/core/"

    def show(path: str) -> bytes:
        argv = ["git", "-C", str(root), "show", f"{ref}:{path}"]
        return subprocess.run(argv, check=True, capture_output=True).stdout

    names = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "--name-only", ref, src + "data/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    folder = Path(tempfile.mkdtemp(prefix="useragent-baseline-"))
    package = folder / "useragent_baseline"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in names:
        (package / "data" / Path(name).name).write_bytes(show(name))
    module = show(src + "useragent.py").replace(
        b"convex_guard.core.data", b"useragent_baseline.data"
    )
    (package / "useragent.py").write_bytes(module)
    sys.path.insert(0, str(folder))
    loaded = importlib.import_module("useragent_baseline.useragent")
    fn: Callable[[str], object] = loaded.classify_user_agent_uncached
    return fn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loops", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--against", metavar="REF", help="also time the classifier at this git revision"
    )
    args = parser.parse_args(argv)

    rows = load_labelled()
    groups = {
        "people": sorted({ua for expected, _, ua in rows if expected == "human"}),
        "bots": sorted({ua for expected, _, ua in rows if expected != "human"}),
    }
    for ua in groups["people"] + groups["bots"]:
        classify_user_agent(ua)  # warm the cache for the cached column

    contenders: dict[str, Callable[[str], object]] = {
        "ours, uncached": classify_user_agent_uncached,
        "ours, cached": classify_user_agent,
        "seed regex": seed,
    }
    if args.against:
        contenders[f"{args.against[:10]}, uncached"] = classifier_at(args.against)
    gc.disable()
    try:
        # Interleaved per user-agent, so a burst of load on a shared machine hits all alike.
        timings: dict[tuple[str, str], list[float]] = {}
        for group, uas in groups.items():
            for ua in uas:
                for name, fn in contenders.items():
                    timings.setdefault((name, group), []).append(
                        ns_per_call(fn, ua, args.loops, args.rounds)
                    )
        for name in contenders:
            timings[(name, "all")] = timings[(name, "people")] + timings[(name, "bots")]
        medians = {key: statistics.median(values) for key, values in timings.items()}
    finally:
        gc.enable()

    groups["all"] = groups["people"] + groups["bots"]
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
