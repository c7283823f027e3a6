"""Precision and recall of the user-agent classifier against the seed's regex, on labelled data.

Run: `python -m benchmarks.useragent_accuracy`. The headline is the evaluation set
(tests/data/user_agents_evaluation.csv.gz, see user_agents_evaluation.md beside it): user-agents
from sources the classifier does not learn from, reported overall, for AI crawlers and per
source. Recall counts a bot flagged at all; "cat.acc" how many flagged bots got their category.
Below each of the test half and the whole set, ours per category: precision and recall of the
category itself, and how many of its bots were flagged at all.
`--against REF` adds the classifier as it was at git revision REF to every table.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from convex_guard.core.useragent import _TAG_CATEGORY, classify_user_agent_uncached

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
LABELLED = DATA / "user_agents.csv"
EVALUATION = DATA / "user_agents_evaluation.csv.gz"
SEED_RE = re.compile(
    r"bot|crawler|spider|scraper|headless|selenium|puppeteer|playwright|GPTBot|Claude-Web|"
    r"ChatGPT|CCBot|anthropic-ai|PerplexityBot",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Scores:
    samples: int
    bots: int
    humans: int
    true_positives: int
    false_positives: int
    false_negatives: int
    category_correct: int | None  # None: the classifier has no categories

    @property
    def precision(self) -> float:
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else 1.0

    @property
    def false_positive_rate(self) -> float:
        return self.false_positives / self.humans if self.humans else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.bots if self.bots else 1.0

    @property
    def category_accuracy(self) -> float | None:
        if self.category_correct is None:
            return None
        return self.category_correct / self.bots if self.bots else 1.0


def load_labelled(path: Path = LABELLED) -> list[tuple[str, str, str]]:
    """(expected, source, user_agent) rows; expected is "human" or a BotCategory."""
    with path.open(newline="", encoding="utf-8") as handle:
        return [(r["expected"], r["source"], r["user_agent"]) for r in csv.DictReader(handle)]


def load_evaluation(
    path: Path = EVALUATION, *, half: str | None = None
) -> list[tuple[str, str, str]]:
    """The held-out set: (expected, source, user_agent), source naming the directory.

    ``half`` splits it by a hash of the user-agent: "dev" is the half whose mistakes we may
    read and fix (and say so), "test" the half reported untouched; None is both.
    """
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    rows = [
        (r["expected"], r["source"], r["user_agent"]) for r in csv.DictReader(io.StringIO(text))
    ]
    if half is None:
        return rows
    want = {"dev": 0, "test": 1}[half]
    return [r for r in rows if zlib.crc32(r[2].encode("utf-8")) % 2 == want]


def load_crawler_instances() -> list[tuple[str, str, str]]:
    """Example user-agents shipped with crawler-user-agents; NOT independent of our classifier."""
    text = (resources.files("crawleruseragents") / "crawler-user-agents.json").read_text("utf-8")
    rows: list[tuple[str, str, str]] = []
    for entry in json.loads(text):
        tags = [_TAG_CATEGORY.get(t, "other_bot") for t in entry.get("tags", ())] or ["other_bot"]
        for instance in entry["instances"]:
            rows.append((tags[0], entry["pattern"], instance))
    return rows


def score(
    rows: list[tuple[str, str, str]], classify: Callable[[str], str | None], *, categories: bool
) -> Scores:
    tp = fp = fn = correct = bots = 0
    for expected, _, ua in rows:
        got = classify(ua)
        is_bot = expected != "human"
        bots += is_bot
        if is_bot and got is not None:
            tp += 1
            correct += got == expected
        elif is_bot:
            fn += 1
        elif got is not None:
            fp += 1
    return Scores(len(rows), bots, len(rows) - bots, tp, fp, fn, correct if categories else None)


def ours(ua: str) -> str | None:
    return classify_user_agent_uncached(ua).category


def seed(ua: str) -> str | None:
    # The seed flags only what its regex matches; an empty user-agent passes.
    return "other_bot" if SEED_RE.search(ua) else None


def mistakes(rows: list[tuple[str, str, str]], *, flagging_only: bool = False) -> list[str]:
    out = []
    for expected, source, ua in rows:
        got = ours(ua) or "human"
        wrong = (got == "human") != (expected == "human") if flagging_only else got != expected
        if wrong:
            out.append(f"  expected {expected:<13} got {got:<13} {source}: {ua[:90]!r}")
    return out


def slices(rows: list[tuple[str, str, str]]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The evaluation set whole, its AI crawlers (with every person, so precision means the
    same), and per source."""
    people = [r for r in rows if r[0] == "human"]
    browsers = [r for r in rows if r[1] != "device-detector mobile apps"]
    out = [
        ("all", rows),
        ("all but WhichBrowser's", [r for r in rows if not r[1].startswith("whichbrowser")]),
        ("all but mobile apps", browsers),
        ("AI crawlers (+ all people)", [r for r in rows if r[0] == "ai_crawler"] + people),
    ]
    for source in sorted({r[1] for r in rows}):
        out.append((source, [r for r in rows if r[1] == source]))
    return out


# Sources whose bots carry no category (labelled other_bot): only flagging is measured there.
UNCATEGORISED = frozenset({"uap-core spiders", "whichbrowser bots"})

CATEGORY_HEADER = (
    f"{'category':<42} {'expected':>8} {'given':>6} {'right':>6} {'prec':>7} {'recall':>7} "
    f"{'flagged':>8}"
)


def category_lines(rows: list[tuple[str, str, str]]) -> list[str]:
    """Ours per bot category: precision (of the user-agents given the category, how many have
    it), recall (of those labelled with it, how many got it) and how many were flagged at all
    (any category: what a block by default sees). People given a category count against its
    precision, and so do bots the labels leave coarser: the evaluation's categories are
    device-detector's mapped to ours, whose "Crawler", feed and service bots (and its bots with
    no category) are other_bot, so a search engine or a monitor among them is "wrong" here.
    The bots of sources that give no category at all (`UNCATEGORISED`) are left out."""
    got = [
        (expected, ours(ua) or "human")
        for expected, source, ua in rows
        if expected == "human" or source not in UNCATEGORISED
    ]
    lines = [CATEGORY_HEADER]
    for category in sorted({e for e, _ in got} | {g for _, g in got} - {"human"}):
        if category == "human":
            continue
        expected = sum(e == category for e, _ in got)
        given = sum(g == category for _, g in got)
        right = sum(e == g == category for e, g in got)
        flagged = sum(e == category and g != "human" for e, g in got)
        prec = f"{right / given:.3f}" if given else "-"
        recall = f"{right / expected:.3f}" if expected else "-"
        caught = f"{flagged / expected:.3f}" if expected else "-"
        lines.append(
            f"{category:<42} {expected:>8} {given:>6} {right:>6} {prec:>7} {recall:>7} {caught:>8}"
        )
    return lines


HEADER = (
    f"{'data set':<42} {'classifier':<8} {'n':>6} {'bots':>5} {'prec':>7} {'recall':>7} "
    f"{'FP':>5} {'FN':>5} {'cat.acc':>8}"
)


def line(title: str, name: str, s: Scores) -> str:
    acc = "-" if s.category_accuracy is None or not s.bots else f"{s.category_accuracy:.3f}"
    # A slice of people only has no precision or recall; its false-positive count says it all.
    prec = f"{s.precision:.3f}" if s.bots else "-"
    recall = f"{s.recall:.3f}" if s.bots else "-"
    return (
        f"{title[:42]:<42} {name:<8} {s.samples:>6} {s.bots:>5} {prec:>7} "
        f"{recall:>7} {s.false_positives:>5} {s.false_negatives:>5} {acc:>8}"
    )


def report(*, show_mistakes: bool = True, against: str | None = None) -> str:
    """The tables; ``against`` (a git revision) adds that revision's classifier to each."""
    contenders: list[tuple[str, Callable[[str], str | None], bool]] = [
        ("ours", ours, True),
        ("seed", seed, False),
    ]
    if against:
        from benchmarks.useragent import classifier_at

        baseline = classifier_at(against)

        def before(ua: str) -> str | None:
            category: str | None = getattr(baseline(ua), "category", None)
            return category

        contenders.append((against[:8], before, True))
    lines: list[str] = []
    for half, title in (
        ("test", "evaluation set, test half: never looked at"),
        ("dev", "evaluation set, dev half: its mistakes were read and some fixed"),
        (None, "evaluation set, both halves"),
    ):
        lines += [f"{title} (tests/data/user_agents_evaluation.csv.gz)", HEADER]
        for name_, rows in slices(load_evaluation(half=half)):
            for name, fn, cats in contenders:
                lines.append(line(name_, name, score(rows, fn, categories=cats)))
        lines.append("")
        if half != "dev":
            lines.append(f"{title}, ours per category")
            lines += category_lines(load_evaluation(half=half))
            lines.append("")
    lines += ["regression sets (not independent of the rules)", HEADER]
    for title, rows in (
        ("hand-labelled (tests/data/user_agents.csv)", load_labelled()),
        ("crawler-user-agents instances", load_crawler_instances()),
    ):
        for name, fn, cats in contenders:
            lines.append(line(title, name, score(rows, fn, categories=cats)))
    if show_mistakes:
        wrong = mistakes(load_evaluation(half="dev"), flagging_only=True)
        lines.append(f"\nwrongly flagged or missed in the dev half: {len(wrong)}")
        lines.extend(wrong)
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="leave out the dev half's mistakes")
    parser.add_argument("--against", metavar="REF", help="also score the classifier at REF")
    args = parser.parse_args()
    print(report(show_mistakes=not args.quiet, against=args.against))
