"""Precision and recall of the user-agent classifier against the seed's regex, on labelled data."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from convex_guard.core.useragent import _TAG_CATEGORY, classify_user_agent_uncached

LABELLED = Path(__file__).resolve().parent.parent / "tests" / "data" / "user_agents.csv"
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


def mistakes(rows: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for expected, source, ua in rows:
        got = ours(ua) or "human"
        if got != expected:
            out.append(f"  expected {expected:<13} got {got:<13} {source}: {ua[:70]!r}")
    return out


def report() -> str:
    labelled = load_labelled()
    instances = load_crawler_instances()
    lines = [
        f"{'data set':<40} {'classifier':<8} {'n':>5} {'bots':>5} {'prec':>7} {'recall':>7} "
        f"{'FP':>4} {'FN':>4} {'cat.acc':>8}"
    ]
    for title, rows in (
        ("independent labelled (tests/data)", labelled),
        ("crawler-user-agents instances (not indep.)", instances),
    ):
        for name, fn, cats in (("ours", ours, True), ("seed", seed, False)):
            s = score(rows, fn, categories=cats)
            acc = "-" if s.category_accuracy is None else f"{s.category_accuracy:.3f}"
            lines.append(
                f"{title[:40]:<40} {name:<8} {s.samples:>5} {s.bots:>5} {s.precision:>7.3f} "
                f"{s.recall:>7.3f} {s.false_positives:>4} {s.false_negatives:>4} {acc:>8}"
            )
    wrong = mistakes(labelled)
    lines.append(f"\nmisclassified in the independent set: {len(wrong)}")
    lines.extend(wrong)
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
