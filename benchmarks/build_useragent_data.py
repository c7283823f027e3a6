"""Build convex-guard's user-agent data and its evaluation set from upstream lists.

Not part of the package: a maintainer runs it when refreshing the data, from local copies of the
sources (nothing here touches the network)::

    python -m benchmarks.build_useragent_data rules \\
        --device-detector DIR --isbot DIR --date YYYY-MM-DD
    python -m benchmarks.build_useragent_data evaluation \\
        --device-detector DIR --uap-core DIR --top-user-agents DIR --opawg DIR \\
        --whichbrowser DIR --date YYYY-MM-DD
    python -m benchmarks.build_useragent_data apps --opawg DIR --date YYYY-MM-DD

``--device-detector``, ``--uap-core`` and ``--whichbrowser`` are git directories of
matomo-org/device-detector, ua-parser/uap-core and WhichBrowser/Parser-PHP, ``--opawg`` one of
opawg/user-agents-v2 (each read at HEAD with ``git show``);
``--isbot`` and ``--top-user-agents`` are the unpacked npm packages (``npm pack isbot &&
tar xzf isbot-*.tgz``: the ``package`` folder).

``rules`` writes ``src/convex_guard/core/data/device_detector_bots.json`` and ``isbot_names.json``:
our own lists derived from theirs (agent names, the few patterns that are not plain names, and
our category for each), with source, commit or version, date and licence recorded in each file.

``apps`` writes ``src/convex_guard/core/data/opawg_apps.json``: the product names podcast and
media apps announce (OPAWG user-agents-v2, MIT), so an app's user-agent is a person's.

``evaluation`` writes ``tests/data/user_agents_evaluation.csv.gz``: labelled user-agents from
sources the classifier does NOT learn from (device-detector's test fixtures, uap-core's test
fixtures, the top-user-agents package, WhichBrowser's test fixtures), minus every string that
occurs in a training source (OPAWG's examples included).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import re
import re._parser as _sre  # type: ignore[import-not-found]  # the texts a pattern can match
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "convex_guard" / "core" / "data"
EVALUATION = ROOT / "tests" / "data" / "user_agents_evaluation.csv.gz"

# device-detector's bot categories, in our coarser ones.
DD_CATEGORY = {
    "AI Data Scraper": "ai_crawler",
    "AI Assistant": "ai_crawler",
    "AI Search Crawler": "ai_crawler",
    "AI Agent": "ai_crawler",
    "Search bot": "search_engine",
    "Search tools": "search_engine",
    "Security search bot": "scanner",
    "Security Checker": "scanner",
    "Site Monitor": "monitor",
    "Network Monitor": "monitor",
    "Benchmark": "monitor",
    "Validator": "monitor",
    "Social Media Agent": "preview",
    "Crawler": "other_bot",
    "Service Agent": "other_bot",
    "Service bot": "other_bot",
    "Feed Fetcher": "other_bot",
    "Feed Reader": "other_bot",
    "Feed Parser": "other_bot",
    "Read-it-later Service": "other_bot",
    "": "other_bot",
}

# isbot entries that are ordinary words or a browser, not an agent: left out (recorded as such in
# the output). Chosen by reading the list, before any evaluation was run.
ISBOT_GENERIC = {
    "abuse", "advisor", "agent", "analyzer", "archive", "audit", "capture", "catch", "check",
    "checker", "classifier", "cloudflare", "crawl", "detect", "discovery", "download", "feed",
    "grab", "insight", "inspect", "library", "measure", "monitor", "optimize", "parser",
    "preview", "proxy", "radar", "retriever", "rss", "scrape", "server", "spider", "splash",
    "synapse", "synthetic", "tools", "torrent", "transcoder", "url", "validator", "java", "node",
    "active", "custom", "email", "offline", "rank", "read", "reed", "rest", "track", "client",
    "bot", "netsurf", "sogou", "mail.ru", "dmbrowser", "ibisbrowser", "chromeframe", "browsex",
    "offbyone", "firephp",  # a browser and a Firefox add-on: added from the dev half's mistakes
}  # fmt: skip
# OPAWG app product names that are generic words or platforms, not one app: left out.
APP_GENERIC = {
    "mozilla", "dalvik", "android", "ios", "darwin", "cfnetwork", "player", "radio", "app", "mac",
    "win", "url", "test", "browser", "client", "mobile", "mail", "audio", "files", "documents",
    "labs", "club", "cast", "queue", "mobileapp", "echo", "heart", "gold", "capital", "hyper",
    "expo", "bolt", "bear", "leaf", "juice", "canvas", "downloader", "downloads", "messages",
    "broadcast", "boom", "updates", "watch", "smooth", "highly", "copied", "filer", "feeder",
}  # fmt: skip
# Our category for isbot's agent names (the rest are other_bot).
ISBOT_CATEGORY = {
    "claude-code": "ai_crawler", "openai": "ai_crawler", "cursor": "ai_crawler",
    "manus-user": "ai_crawler",
    "headless": "headless", "phantomjs": "headless", "playwright": "headless",
    "selenium": "headless", "cypress": "headless", "chrome-lighthouse": "headless",
    "webkit2png": "headless", "functionize": "headless", "dejaclick": "headless",
    "blackbox exporter": "monitor", "pingdom": "monitor", "statuscake": "monitor",
    "speedcurve": "monitor", "dareboost": "monitor", "pagespeed": "monitor", "rigor": "monitor",
    "neustar wpm": "monitor", "iplabel": "monitor", "infrawatch": "monitor", "24x7": "monitor",
    "xenu link sleuth": "monitor", "linkcheck": "monitor", "w3c": "monitor",
    "jigsaw": "monitor", "testlocally": "monitor", "pageburst": "monitor",
    "openvas": "scanner", "burpcollaborator": "scanner", "securityheaders": "scanner",
    "hardenize": "scanner", "foregenix": "scanner", "watchtowr": "scanner", "clamav": "scanner",
    "wappalyzer": "scanner", "whatcms": "scanner",
    "httrack": "scraper", "webcopier": "scraper", "webbandit": "scraper", "getright": "scraper",
    "gozilla": "scraper", "igetter": "scraper",
    "python": "http_library", "php": "http_library", "postman": "http_library",
    "wget": "http_library", "apache": "http_library", "jetty": "http_library",
    "perl": "http_library", "microsoft bits": "http_library",
    "facebook": "preview", "whatsapp": "preview", "snapchat": "preview",
    "discourse": "preview", "collapsify": "preview", "yandex": "search_engine",
    "yahoo": "search_engine", "duckduckgo": "search_engine", "ask jeeves/teoma": "search_engine",
    "exaleadcloudview": "search_engine", "nutch": "other_bot",
}  # fmt: skip


def git(repo: Path, *args: str) -> str:
    """What git prints in a fetched snapshot (no work tree: every read goes through git)."""
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def git_show(repo: Path, path: str) -> str:
    return git(repo, "show", f"HEAD:{path}")


def git_ls(repo: Path, folder: str) -> list[str]:
    return git(repo, "ls-tree", "--name-only", "HEAD", folder).split()


def git_head(repo: Path) -> tuple[str, str]:
    out = git(repo, "log", "-1", "--format=%H %cs").split()
    return out[0], out[1]


# --- device-detector's regexes/bots.yml -> our names and patterns --------------------------------

_META = re.compile(r"[\\.^$*+?{}\[\]|()]")


def _literal(text: str) -> str | None:
    """The plain text a regex fragment matches, if it is plain text (``\\.`` allowed)."""
    unescaped = re.sub(r"\\([^\w])", r"\1", text)
    probe = re.sub(r"\\[^\w]", "", text)
    return None if _META.search(probe) else unescaped


def _split_top(pattern: str) -> list[str] | None:
    """``a|b|(c|d)`` at the top level (or wrapped in one group) as its alternatives."""
    inner = pattern
    m = re.fullmatch(r"\((?:\?:)?(.*)\)", pattern)
    if m and _balanced(m[1]):
        inner = m[1]
    parts, depth, start, i = [], 0, 0, 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            i += 2
            continue
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
        i += 1
    parts.append(inner[start:])
    return parts


def _balanced(text: str) -> bool:
    depth = 0
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


def device_detector_rules(repo: Path, date: str) -> dict[str, Any]:
    commit, committed = git_head(repo)
    entries = yaml.safe_load(git_show(repo, "regexes/bots.yml"))
    names: dict[str, str] = {}
    patterns: list[dict[str, str | bool]] = []
    skipped: list[str] = []
    for entry in entries:
        regex: str = entry["regex"]
        if entry.get("name") == "Generic Bot" and regex.startswith("[a-z0-9_-]*"):
            # Their last catch-all: generic words with look-arounds. Our own generic words
            # (useragent.py) take the agent nouns from it.
            skipped.append(regex[:60])
            continue
        category = DD_CATEGORY[entry.get("category") or ""]
        alternatives = _split_top(regex) or [regex]
        literal = [_literal(a) for a in alternatives]
        if entry.get("name") == "Generic Bot":
            # A list of odd agents: each alternative its own name or pattern.
            for alternative, name in zip(alternatives, literal, strict=True):
                if name and len(name) >= 3:
                    names.setdefault(name, category)
                    continue
                try:
                    re.compile(alternative, re.IGNORECASE)
                except re.error:
                    skipped.append(alternative)
                    continue
                patterns.append({"pattern": alternative, "category": category})
            continue
        if all(x and len(x) >= 3 for x in literal):
            for name in literal:
                assert name is not None
                names.setdefault(name, category)
            continue
        try:
            re.compile(regex, re.IGNORECASE)
        except re.error:
            skipped.append(regex[:60])
            continue
        patterns.append({"pattern": regex, "category": category})
    for pattern in patterns:
        text = str(pattern["pattern"])
        if text.startswith(".*"):
            # ".*x" is "x anywhere": said so, since a search that starts with .* is quadratic
            # in the user-agent's length.
            pattern["pattern"] = text[2:]
            pattern["anywhere"] = True
    return {
        "source": f"https://github.com/matomo-org/device-detector/blob/{commit}/regexes/bots.yml",
        "repository": "matomo-org/device-detector",
        "file": "regexes/bots.yml",
        "commit": commit,
        "committed": committed,
        "retrieved": date,
        "license": "LGPL-3.0-or-later",
        "note": (
            "Derived by benchmarks/build_useragent_data.py: each entry's regex as agent names "
            "where "
            "it is plain text (alternatives split), else the regex itself; device-detector's "
            "category mapped to ours; their last 'Generic Bot' catch-all (generic words) left out."
        ),
        "agents": [{"name": n, "category": c} for n, c in names.items()],
        "patterns": patterns,
        "skipped": skipped,
    }


# --- isbot's pattern list -> our names ----------------------------------------------------------


def isbot_rules(package: Path, date: str) -> dict[str, Any]:
    meta = json.loads((package / "package.json").read_text("utf-8"))
    source = (package / "index.js").read_text("utf-8")
    block = re.search(r"var patterns_default = (\[.*?\]);", source, re.S)
    assert block, "isbot's index.js no longer has patterns_default"
    patterns: list[str] = json.loads(block[1])
    agents: list[dict[str, Any]] = []
    generic: list[str] = []
    structural: list[str] = []
    for pattern in patterns:
        start = pattern.startswith("^")
        body = pattern[1:] if start else pattern
        body = body.replace("[_-]", "-").replace("\\.", ".")
        product = bool(re.search(r"/(?:\\d)?$", body))  # "cursor/": only as a product token
        body = re.sub(r"(\\b|\(\?!;\)|/\\d|\[ /\]|;)$", "", body).strip("/ ")
        if not body or _META.search(body):
            structural.append(pattern)
            continue
        if body in ISBOT_GENERIC:
            generic.append(pattern)
            continue
        entry: dict[str, Any] = {"name": body, "category": ISBOT_CATEGORY.get(body, "other_bot")}
        if product:
            entry["version"] = True
        if start:
            entry["start"] = True  # isbot anchors it: "Snapchat/" starts a preview bot's UA only
        agents.append(entry)
    return {
        "source": f"https://www.npmjs.com/package/isbot/v/{meta['version']}",
        "package": "isbot",
        "version": meta["version"],
        "retrieved": date,
        "license": meta["license"],
        "note": (
            "Derived by benchmarks/build_useragent_data.py from isbot's pattern list: plain agent "
            "names kept (anchored ones as 'start'), with our category; ordinary words and "
            "structural heuristics left out and listed."
        ),
        "agents": agents,
        "generic_left_out": generic,
        "structural_left_out": structural,
    }


# --- OPAWG's podcast and media apps -> the products people's apps announce ----------------------


def _app_names(alternative: str) -> list[str]:
    """The product names one OPAWG pattern alternative starts an app's user-agent with.

    Each text the alternative can match ("^Campfire(FM)?/" is "campfire/" and "campfirefm/")
    up to its first "/", or to a variable part when anchored ("^castero \\d"); a name with a gap
    the pattern leaves open ("^Podcast.*Addict/") is none.
    """
    from convex_guard.core import useragent

    anchored = alternative.startswith("^")
    try:
        texts = useragent._expand(_sre.parse(alternative.lstrip("^")))
    except re.error:
        return []
    spaced = " " in alternative or "%20" in alternative
    names = []
    for text in texts or []:
        text = text.replace("%20", " ")
        head, slash, _ = text.partition("/")
        if head[:1] == " ":
            continue  # begins with a variable part ("[sS]aavn")
        if not slash and not anchored:
            continue  # neither a product token nor a name the user-agent starts with
        if " " in head.strip() and not spaced:
            continue  # a variable part, not a space of the name
        name = head.strip()
        # A name, not a platform comment; ASCII, as the classifier compares products folded
        # to ASCII (the localised names of Apple's Podcasts app are its only others).
        if name.isascii() and re.fullmatch(r"\w[\w .'&-]*", name):
            names.append(name)
    return names


def _known_agent(name: str) -> bool:
    """Whether one of the bot lists names ``name`` (its generic words do not count: Tweetbot
    is an app)."""
    from convex_guard.core import useragent

    ua = f"{name}/1.0"
    lowered = ua.lower()
    hits = useragent._KEYS.intersection(useragent._tokens(lowered))
    return useragent._match_known(ua, lowered, hits) is not None


def opawg_apps(repo: Path, date: str) -> dict[str, Any]:
    """Product names of OPAWG's apps (podcast players, media apps, smart speakers).

    Only what a pattern spells as a leading product ("Name/", a whole name) is kept: an app's
    user-agent starts with it, and a bot's hardly ever does, so the classifier can take
    such a user-agent for a person whatever else it carries (an HTTP library, a URL).
    Names a bot list also knows are kept apart: the same product sends both shapes.
    """
    commit, committed = git_head(repo)
    entries = json.loads(git_show(repo, "src/apps.json"))["entries"]
    # Products OPAWG lists as bots too (a feed fetcher named like its app): agents as well.
    bots = {
        name.lower()
        for entry in json.loads(git_show(repo, "src/bots.json"))["entries"]
        for alternative in _split_top(entry["pattern"]) or [entry["pattern"]]
        for name in _app_names(alternative)
    }
    products: dict[str, str] = {}
    left_out: list[str] = []
    agent_products: dict[str, str] = {}
    for entry in entries:
        kept = False
        for alternative in _split_top(entry["pattern"]) or [entry["pattern"]]:
            for name in _app_names(alternative):
                if len(name) < 3 or name.lower() in APP_GENERIC:
                    continue
                agent = name.lower() in bots or _known_agent(name)
                target = agent_products if agent else products
                target.setdefault(name.lower(), entry["name"])
                kept = True
        if not kept:
            left_out.append(entry["pattern"])
    return {
        "source": f"https://github.com/opawg/user-agents-v2/blob/{commit}/src/apps.json",
        "repository": "opawg/user-agents-v2",
        "file": "src/apps.json",
        "commit": commit,
        "committed": committed,
        "retrieved": date,
        "license": "MIT",
        "note": (
            "Derived by benchmarks/build_useragent_data.py: the leading product name of each "
            "app pattern (lower-cased), with the app it names; generic words and patterns "
            "without one left out. 'agent_products' are the names a bot list (OPAWG's own "
            "included) also knows as an agent (WhatsApp's link previews, Overcast's feed "
            "fetcher): an app only when its user-agent names a phone platform."
        ),
        "products": dict(sorted(products.items())),
        "agent_products": dict(sorted(agent_products.items())),
        "left_out": left_out,
    }


def write_json(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=1, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


# --- the evaluation set ---------------------------------------------------------------------


def _training_strings(opawg: Path) -> set[str]:
    """Every user-agent a training source ships as an example: never evaluated on.

    OPAWG's examples count whole (apps, bots, libraries, …): its app list is learnt from, and
    device-detector's app fixtures share many strings with it.
    """
    from importlib import resources

    text = (resources.files("crawleruseragents") / "crawler-user-agents.json").read_text("utf-8")
    seen = {i for e in json.loads(text) for i in e["instances"]}
    labelled = ROOT / "tests" / "data" / "user_agents.csv"
    with labelled.open(newline="", encoding="utf-8") as handle:
        seen |= {r["user_agent"] for r in csv.DictReader(handle)}
    listing = git_ls(opawg, "src/")
    for path in listing:
        if path.endswith(".json"):
            for entry in json.loads(git_show(opawg, path)).get("entries", ()):
                seen.update(entry.get("examples", ()))
    return seen


def whichbrowser_cases(repo: Path) -> dict[str, bool]:
    """WhichBrowser's fixtures as user-agent -> is a bot (its device type "bot").

    Cases run with bot detection switched off (``detectBots: false``: bots' names parsed as the
    browsers they carry) and cases with more headers than the user-agent are left out, and so is
    a string labelled both ways.
    """
    labels: dict[str, set[bool]] = {}
    for path in git(repo, "ls-tree", "-r", "--name-only", "HEAD", "tests/data/").split():
        if not path.endswith(".yaml"):
            continue
        for case in yaml.safe_load(git_show(repo, path)) or []:
            headers = case.get("headers")
            if case.get("detectBots", True) is False or not isinstance(headers, str):
                continue
            if not headers.startswith("User-Agent: "):
                continue
            device = (case.get("result") or {}).get("device") or {}
            labels.setdefault(headers[len("User-Agent: ") :], set()).add(
                device.get("type") == "bot"
            )
    return {ua: kinds.pop() for ua, kinds in labels.items() if len(kinds) == 1}


def evaluation(args: argparse.Namespace) -> None:
    dd, uap, wb = Path(args.device_detector), Path(args.uap_core), Path(args.whichbrowser)
    dd_commit, _ = git_head(dd)
    uap_commit, _ = git_head(uap)
    wb_commit, _ = git_head(wb)
    rows: dict[str, tuple[str, str]] = {}  # ua -> (expected, source)
    conflicts: set[str] = set()

    def add(ua: str, expected: str, source: str) -> None:
        if not isinstance(ua, str) or not ua.strip():
            return
        old = rows.get(ua)
        if old is not None and (old[0] == "human") != (expected == "human"):
            conflicts.add(ua)
        rows.setdefault(ua, (expected, source))

    for item in yaml.safe_load(git_show(dd, "Tests/fixtures/bots.yml")):
        category = DD_CATEGORY[(item.get("bot") or {}).get("category") or ""]
        add(item["user_agent"], category, "device-detector bots")
    listing = git_ls(dd, "Tests/fixtures/")
    people = 0
    for path in sorted(listing):
        if path.endswith("bots.yml") or not path.endswith(".yml"):
            continue
        for item in yaml.safe_load(git_show(dd, path)) or []:
            client = item.get("client") or {}
            # People: browsers, and in-app browsers (mobile apps that render pages).
            if client.get("type") not in ("browser", "mobile app"):
                continue
            kind = "browser" if client["type"] == "browser" else "mobile app"
            add(item["user_agent"], "human", f"device-detector {kind}s")
            people += 1
    for item in yaml.safe_load(git_show(uap, "tests/test_device.yaml"))["test_cases"]:
        if item.get("family") == "Spider":
            add(item["user_agent_string"], "other_bot", "uap-core spiders")
    top = json.loads((Path(args.top_user_agents) / "src" / "index.json").read_text("utf-8"))
    for ua in top:
        add(ua, "human", "top-user-agents")
    # Last, and only strings no other source has: the rows above stay as they were.
    for ua, bot in whichbrowser_cases(wb).items():
        if ua not in rows:
            add(
                ua,
                "other_bot" if bot else "human",
                "whichbrowser bots" if bot else "whichbrowser people",
            )

    training = _training_strings(Path(args.opawg))
    kept = [
        (expected, source, ua)
        for ua, (expected, source) in rows.items()
        if ua not in training and ua not in conflicts
    ]
    kept.sort(key=lambda r: (r[1], r[2]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["expected", "source", "user_agent"])
    writer.writerows(kept)
    EVALUATION.write_bytes(gzip.compress(buffer.getvalue().encode("utf-8"), mtime=0))
    about = EVALUATION.with_name("user_agents_evaluation.md")
    counts: dict[str, int] = {}
    for _, source, _ in kept:
        counts[source] = counts.get(source, 0) + 1
    lines = [
        "# user_agents_evaluation.csv.gz",
        "",
        "Labelled user-agents the classifier does not learn from, built by",
        "`benchmarks/build_useragent_data.py evaluation` on " + args.date + ".",
        "Strings that occur in a training source (crawler-user-agents' examples,",
        f"`user_agents.csv`, OPAWG user-agents-v2 {git_head(Path(args.opawg))[0][:12]}'s examples)",
        "or with both a bot and a person label are dropped.",
        "",
        "| source | rows | from | licence |",
        "|---|---|---|---|",
    ]
    origin = {
        "device-detector bots": (f"matomo-org/device-detector {dd_commit[:12]}, "
                                 "Tests/fixtures/bots.yml", "LGPL-3.0-or-later"),
        "device-detector browsers": (f"matomo-org/device-detector {dd_commit[:12]}, "
                                     "Tests/fixtures/*.yml (client type browser)",
                                     "LGPL-3.0-or-later"),
        "device-detector mobile apps": (f"matomo-org/device-detector {dd_commit[:12]}, "
                                        "Tests/fixtures/*.yml (client type mobile app)",
                                        "LGPL-3.0-or-later"),
        "uap-core spiders": (f"ua-parser/uap-core {uap_commit[:12]}, tests/test_device.yaml "
                             "(family Spider)", "Apache-2.0"),
        "top-user-agents": ("npm top-user-agents " + args.top_version, "MIT"),
        "whichbrowser bots": (f"WhichBrowser/Parser-PHP {wb_commit[:12]}, tests/data/**/*.yaml "
                              "(device type bot)", "MIT"),
        "whichbrowser people": (f"WhichBrowser/Parser-PHP {wb_commit[:12]}, tests/data/**/*.yaml "
                                "(any other device type)", "MIT"),
    }  # fmt: skip
    for source, n in sorted(counts.items()):
        where, licence = origin[source]
        lines.append(f"| {source} | {n} | {where} | {licence} |")
    lines += [
        "",
        "Caveat: device-detector's bot fixtures are the tests of its own regexes/bots.yml, which",
        "the classifier learns from (device_detector_bots.json), so that row measures how well",
        "the derived rules carry device-detector's knowledge, not independence; the uap-core,",
        "WhichBrowser and people rows are independent of every training source. WhichBrowser's",
        "rows are only the strings no other source has; like uap-core's, its bots carry no",
        "category (labelled other_bot), so only flagging is measured there.",
        "",
    ]
    about.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {len(kept)} rows ({len(conflicts)} conflicts dropped)", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rules = sub.add_parser("rules")
    rules.add_argument("--device-detector", required=True)
    rules.add_argument("--isbot", required=True)
    rules.add_argument("--date", required=True)
    ev = sub.add_parser("evaluation")
    ev.add_argument("--device-detector", required=True)
    ev.add_argument("--uap-core", required=True)
    ev.add_argument("--top-user-agents", required=True)
    ev.add_argument("--opawg", required=True)
    ev.add_argument("--whichbrowser", required=True)
    ev.add_argument("--date", required=True)
    apps = sub.add_parser("apps")
    apps.add_argument("--opawg", required=True)
    apps.add_argument("--date", required=True)
    args = parser.parse_args()
    if args.command == "rules":
        write_json(
            DATA / "device_detector_bots.json",
            device_detector_rules(Path(args.device_detector), args.date),
        )
        write_json(DATA / "isbot_names.json", isbot_rules(Path(args.isbot), args.date))
    elif args.command == "apps":
        write_json(DATA / "opawg_apps.json", opawg_apps(Path(args.opawg), args.date))
    else:
        meta = json.loads((Path(args.top_user_agents) / "package.json").read_text("utf-8"))
        args.top_version = meta["version"]
        evaluation(args)


if __name__ == "__main__":
    main()
