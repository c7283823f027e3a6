"""User-agent classification cost, uncached and cached, beside the seed's regex in the same run.

Run: `.venv/bin/python -m benchmarks.useragent`. For every distinct user-agent of the labelled set
(tests/data/user_agents.csv) the best of several timed loops gives ns per call; the table shows
the median over people's browsers, over bots and over all, for our classifier without and with its
LRU cache and for the seed's single case-insensitive regex. `--against REF` adds the classifier
(module and data) as it was at git revision REF, timed in the same run: before and after on one
machine at one moment, which a shared machine's noise otherwise makes meaningless.

`--callgrind` counts instructions instead (valgrind's callgrind, one process for all the
contenders): per user-agent, the median over people, bots and all, uncached, a figure a loaded
machine does not move. The process marks each user-agent's calls with `os.getppid()`, at which
callgrind writes a dump (`--dump-before=getppid`), and the count of as many empty calls is taken
off each.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import re
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


#: Calls per user-agent between two marks: the marks' own cost is shared among them.
MARKED_CALLS = 20
TOTALS = re.compile(r"^totals: (\d+)$", re.MULTILINE)


def marked(against: str | None) -> None:
    """The process callgrind watches: every contender's calls on every user-agent, marked."""
    groups = _groups()
    contenders = _uncached(against)
    calls = range(MARKED_CALLS)
    for fn in contenders.values():
        for ua in groups["people"] + groups["bots"]:
            fn(ua)  # warm: lazily built state is not a call's cost
    nothing = _nothing
    os.getppid()  # start-up and warm-up end here
    for _ in calls:
        nothing("")
    os.getppid()  # the empty calls: what the loop itself costs
    for group in ("people", "bots"):
        for ua in groups[group]:
            for fn in contenders.values():
                for _ in calls:
                    fn(ua)
                os.getppid()


def _nothing(ua: str) -> object:
    return None


def _groups() -> dict[str, list[str]]:
    rows = load_labelled()
    return {
        "people": sorted({ua for expected, _, ua in rows if expected == "human"}),
        "bots": sorted({ua for expected, _, ua in rows if expected != "human"}),
    }


def _uncached(against: str | None) -> dict[str, Callable[[str], object]]:
    contenders: dict[str, Callable[[str], object]] = {
        "ours, uncached": classify_user_agent_uncached
    }
    if against:
        contenders[f"{against[:10]}, uncached"] = classifier_at(against)
    return contenders


def callgrind(against: str | None) -> None:
    """Run `marked` under callgrind and print the median instructions per classification."""
    groups = _groups()
    names = list(_uncached(against))
    argv = [sys.executable, "-m", "benchmarks.useragent", "--marked"]
    if against:
        argv += ["--against", against]
    with tempfile.TemporaryDirectory(prefix="useragent-callgrind-") as directory:
        out = Path(directory) / "callgrind.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--dump-before=getppid",
             f"--callgrind-out-file={out}", *argv],
            check=True, capture_output=True,
        )  # fmt: skip
        counts = []
        for number in range(1, 3 + len(names) * (len(groups["people"]) + len(groups["bots"]))):
            totals = TOTALS.search(Path(f"{out}.{number}").read_text(errors="replace"))
            if totals is None:
                raise RuntimeError(f"callgrind dump {number} holds no totals")
            counts.append(int(totals[1]))
    empty = counts[1]
    per_call = iter([(count - empty) / MARKED_CALLS for count in counts[2:]])
    measured: dict[tuple[str, str], list[float]] = {}
    for group in ("people", "bots"):
        for _ in groups[group]:
            for name in names:
                measured.setdefault((name, group), []).append(next(per_call))
    for name in names:
        measured[(name, "all")] = measured[(name, "people")] + measured[(name, "bots")]
    groups["all"] = groups["people"] + groups["bots"]
    header = "".join(f"{g + f' ({len(uas)})':>16}" for g, uas in groups.items())
    print(f"median instructions per classification (callgrind)\n{'':<18}{header}")
    for name in names:
        cells = "".join(f"{statistics.median(measured[(name, g)]):>16.0f}" for g in groups)
        print(f"{name:<18}{cells}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loops", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--against", metavar="REF", help="also time the classifier at this git revision"
    )
    parser.add_argument(
        "--callgrind", action="store_true", help="count instructions under callgrind instead"
    )
    parser.add_argument("--marked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.marked:
        marked(args.against)
        return
    if args.callgrind:
        callgrind(args.against)
        return

    groups = _groups()
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
