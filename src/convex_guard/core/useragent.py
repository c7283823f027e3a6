"""User-agent classification (sans-IO): person or bot, and which kind, from maintained lists."""

from __future__ import annotations

import json
import re
import re._parser as _sre  # type: ignore[import-not-found]  # keys of a pattern without examples
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, Literal, NamedTuple, get_args

__all__ = [
    "BOT_CATEGORIES",
    "SOURCES",
    "AgentSource",
    "BotCategory",
    "UserAgentClassifier",
    "UserAgentVerdict",
    "classify_user_agent",
    "classify_user_agent_uncached",
]

BotCategory = Literal[
    "ai_crawler",
    "search_engine",
    "headless",
    "http_library",
    "monitor",
    "preview",
    "scanner",
    "scraper",
    "other_bot",
    "suspicious",
]

BOT_CATEGORIES: Final[tuple[BotCategory, ...]] = get_args(BotCategory)

CACHE_SIZE: Final = 4096
MAX_LENGTH: Final = 1024  # real browsers stay far below; longer values are padding or probing
#: How much of an over-long user-agent is searched for known agents (servers cap headers anyway).
SEARCH_LENGTH: Final = 65536


@dataclass(frozen=True, slots=True)
class UserAgentVerdict:
    """What a user-agent says about its sender.

    ``category`` is ``None`` exactly when ``is_bot`` is false, so callers can branch on either.
    ``name`` is the agent that matched (e.g. ``"GPTBot"``) for logs and bot-detection events.
    """

    is_bot: bool
    category: BotCategory | None
    name: str | None = None


#: What bot detection asks about each request: any callable from a user-agent to a verdict.
#: The default is `classify_user_agent`; the middleware calls whatever it is given as it is
#: (a classifier that wants a cache brings its own, as the default does).
UserAgentClassifier = Callable[[str], UserAgentVerdict]

_HUMAN: Final = UserAgentVerdict(is_bot=False, category=None)
_SUSPICIOUS: Final = UserAgentVerdict(is_bot=True, category="suspicious")

# When one user-agent names several agents (a crawler also carrying its HTTP library, an AI agent
# driving a headless browser), the most specific purpose wins: policy is written per purpose.
_RANKED: Final[tuple[BotCategory, ...]] = (
    "ai_crawler",
    "scanner",
    "scraper",
    "headless",
    "preview",
    "monitor",
    "search_engine",
    "other_bot",
    "http_library",
)
_PRIORITY: Final[dict[BotCategory, int]] = {category: rank for rank, category in enumerate(_RANKED)}

# crawler-user-agents tags an entry with what it does; our categories are coarser.
_TAG_CATEGORY: Final[dict[str, BotCategory]] = {
    "ai-crawler": "ai_crawler",
    "browser-automation": "headless",
    "scanner": "scanner",
    "social-preview": "preview",
    "monitoring": "monitor",
    "search-engine": "search_engine",
    "http-library": "http_library",
    "seo": "other_bot",
    "advertising": "other_bot",
    "feed-reader": "other_bot",
    "archiver": "other_bot",
    "academic": "other_bot",
}


@dataclass(frozen=True, slots=True)
class AgentSource:
    """One list of known agents the default classifier is built from: a JSON file and its shape.

    ``kind`` says how its entries are read: ``"patterns"`` are crawler-user-agents records (a
    regex, the example user-agents it must match, tags naming its purpose); ``"regexes"`` are
    a regex and a ``category`` each, without examples (the prefilter's keys come from the text
    the regex can match); ``"names"`` are agent names, matched case-insensitively, each with an
    optional ``category``, ``version`` (the name counts only as a product token,
    ``name/<digit>``) and ``start`` (only at the start of the user-agent). ``entries`` is the
    key the list is under (None: the file is the list); ``category`` is for names that carry
    none. The file's other text fields are its provenance (``DATA_PROVENANCE``).
    """

    name: str
    kind: Literal["patterns", "regexes", "names"]
    package: str
    resource: str
    entries: str | None = None
    category: BotCategory | None = None


_DATA: Final = "convex_guard.core.data"

#: The lists, in order: of two rules of one category woken by one token, the earlier list's
#: is tried first.
SOURCES: Final[tuple[AgentSource, ...]] = (
    # Search engines, SEO and feed crawlers, archivers, monitors, previews, HTTP libraries
    # (crawler-user-agents on PyPI, MIT).
    AgentSource("crawler_user_agents", "patterns", "crawleruseragents", "crawler-user-agents.json"),
    # AI crawlers, assistants and agents by name (ai.robots.txt, MIT; vendored with its commit).
    AgentSource(
        "ai_robots_txt", "names", _DATA, "ai_robots.json", entries="agents", category="ai_crawler"
    ),
    # Matomo's device-detector bot list (LGPL-3.0-or-later): our names and patterns derived
    # from its regexes/bots.yml by benchmarks/build_useragent_data.py, commit recorded in the file.
    AgentSource("device_detector", "names", _DATA, "device_detector_bots.json", "agents"),
    AgentSource(
        "device_detector_regexes", "regexes", _DATA, "device_detector_bots.json", "patterns"
    ),
    # The agent names of isbot's pattern list (npm, Unlicense), version recorded in the file.
    AgentSource("isbot", "names", _DATA, "isbot_names.json", "agents"),
    # Ours: headless browsers and automation, scanners, HTTP libraries, monitors and previews
    # the lists miss, each entry naming its category.
    AgentSource("curated", "names", _DATA, "user_agents_curated.json", "agents"),
)

#: Corrections applied to every list, from our file: ``category_overrides`` (an agent's
#: category where a list's tags do not fit our policy, by lower-cased name) and
#: ``version_required`` (names that are also common words: "Spider", "Code").
CORRECTIONS: Final = (_DATA, "user_agents_curated.json")
#: Podcast and media apps whose own user-agents are people's (see `_app`).
APPS: Final = (_DATA, "opawg_apps.json")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Values sent by misconfigured clients and probes, never by a browser.
_PLACEHOLDERS: Final = frozenset(
    {
        "-",
        "--",
        "null",
        "none",
        "nil",
        "undefined",
        "unknown",
        "n/a",
        "test",
        "user-agent",
        "useragent",
        "user_agent",
        "mozilla",
        "mozilla/4.0",
        "mozilla/5.0",
        "anonymous",
        "default",
    }
)

# Tokens every browser sends; never used as a prefilter key, else every person takes the slow path.
_BROWSER_TOKENS: Final = _words(
    "mozilla linux android windows nt win x applewebkit khtml like gecko chrome safari mobile "
    "version iphone ipad cpu os mac intel macintosh firefox rv edg opr u wv build k en us crios "
    "fxios tablet arm wow trident msie compatible ubuntu samsungbrowser ucbrowser a b e s"
)

# Words many agents share; a key is better taken from the rest of the name.
_COMMON_BOT_TOKENS: Final = _words(
    "bot bots crawler spider http https www com org net html google search searchbot user agent web"
)

# Words in people's user-agents (browsers' names, vendors, device lines) that agents' names
# also contain; never keys, so those people stay on the fast path. Read off the people of the
# evaluation set's dev half, whose tokens woke rules, and said so in the benchmark.
_WEAK_KEYS: Final = _words(
    "pro browser desktop engine studio search microsoft amazon google webkit index explorer "
    "for red is beta cloud net hit silk odin nova orion cyber amazing ips gsa baidu"
)

# ASCII letters lower-cased, every other byte a space: ``bytes.translate`` + ``split`` is the
# cheapest tokenizer CPython offers, several times faster than any regex over the same text.
_TOKEN_TABLE: Final = bytes(
    (c | 0x20) if (65 <= c <= 90 or 97 <= c <= 122) else 32 for c in range(256)
)
# What disguises put inside a name ("GPT-Bot", "claude_bot", "Headless Chrome"): removed from
# the text a name is confirmed in, never from the text the prefilter splits.
_SEPARATORS: Final = b"-_. "

# Generic words that name a bot when a user-agent matches no known agent, and the category
# each implies: device-detector's and isbot's catch-all words that are agent nouns, and ours.
_GENERIC_WORDS: Final[dict[str, BotCategory]] = {
    "headless": "headless",
    "scraper": "scraper",
    "scrapers": "scraper",
    "scanner": "scanner",
    "monitor": "monitor",
    "uptime": "monitor",
    "checker": "other_bot",
    "crawler": "other_bot",
    "spider": "other_bot",
    "fetcher": "other_bot",
    "indexer": "other_bot",
    "archiver": "other_bot",
    "grabber": "other_bot",
    "validator": "other_bot",
    "transcoder": "other_bot",
    "analyzer": "other_bot",
    "collector": "other_bot",
    "searcher": "other_bot",
    # Ours, from the evaluation set's dev half: a contact address is a research crawler's.
    "mailto": "other_bot",
    "crawling": "other_bot",
    "watchdog": "monitor",
}
# Starts with a literal so the regex engine can skip ahead; the name is widened to its word after.
_GENERIC_RE: Final = re.compile(r"(?:bot|crawler|crawl|spider|scraper)(?![a-z])|https?://")
_GENERIC_TEXT: Final = {w.encode("ascii"): w for w in _GENERIC_WORDS}
_GENERIC_KEYS: Final = frozenset(_GENERIC_TEXT)
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
# The exclusion: a browser's platform comment, "(Linux; Android 9; CUBOT X19)". Device names
# live there and some contain "bot" (real Cubot phones), so the generic words are looked for
# only after it; bots put their name in a "(compatible; ...)" comment or after the platform.
_PLATFORM_RE: Final = re.compile(r"\A\s*mozilla/[\d.]+\s*\((?![^)]*compatible)[^)]*\)")
# The device model in an Android platform comment, a browser's or an app's: "(Linux; U;
# Android 15; en-US; RMX5020 Build/AP3A.240617.008)" is "rmx5020 build/ap3a.240617.008".
_DEVICE_RE: Final = re.compile(
    r"\(linux;(?: u;)? android[^;)]*;(?: [a-z]{2}[-_][a-z]{2};)?([^;)]+)"
)

# Two of isbot's (Unlicense) shapes, adopted as they are: a Mozilla token with one word after it
# ("Mozilla/5.0 OnlyScans") or with only a one-product "compatible" comment, the version
# optional here ("(compatible; blogger.com)": ours, from the evaluation set's dev half). No
# browser sends these. Its third, one bare product ("Hakai/2.0"), is left out: podcast
# players, watches and TVs send that shape too (device-detector's people fixtures: ~1 in 200).
_BARE_RE: Final = re.compile(
    r"mozilla/\d\.\d\s[\w.-]+$"
    r"|mozilla/\d\.\d\s\((?:compatible;?)?(?:\s?[\w\d.-]+(?:[\s/]\d+\.\d+)?)?\)$",
    re.IGNORECASE,
)

# Unicode format characters (category Cf: zero-width spaces and joiners, bidi controls, the
# soft hyphen, tag characters), which render as nothing and so hide a name from a substring
# test. Spelled out (Unicode 15) so nothing scans the code space at import; a test checks it
# against `unicodedata`.
_FORMAT_RE: Final = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
# Combining marks left by NFKD ("Ǵ" → "G" + U+0301) and variation selectors.
_MARKS_RE: Final = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f]")
# Letters of other scripts drawn like ASCII ones (Cyrillic, Greek), after lower-casing.
_HOMOGLYPHS: Final = str.maketrans(
    "\u0430\u0432\u0441\u0501\u0435\u04bb\u0456\u0458\u043a\u04cf\u043c\u043e\u0440\u051b\u0455\u0442\u0443\u051d\u0445\u0443\u03b1\u03b2\u03b5\u03b9\u03ba\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7",
    "abcdehijklmopqstuwxyabeikvoptux",
)


def _fold(ua: str) -> str:
    """A non-ASCII user-agent as the ASCII it looks like: what a person reads, the bot's name.

    NFKC first (full-width letters are ASCII ones), then format characters out, Cyrillic and
    Greek look-alikes to ASCII, and accents off (NFKD without its combining marks).
    """
    text = _FORMAT_RE.sub("", unicodedata.normalize("NFKC", ua))
    text = text.lower().translate(_HOMOGLYPHS)
    return _MARKS_RE.sub("", unicodedata.normalize("NFKD", text))


def _squash(text: str) -> str:
    """``text`` without separators, as names are confirmed against it when spelled apart."""
    return text.encode("ascii", "replace").translate(None, _SEPARATORS).decode("ascii")


@dataclass(frozen=True, slots=True, eq=False)
class _Rule:
    """One known agent. Most are confirmed by a substring test, a few need their regex.

    The prefilter has already found one of the rule's key tokens, so the confirmation runs only
    for user-agents that very likely are this agent. ``verdict`` is built once per rule: a frozen
    dataclass costs more to construct than the whole substring test. A rule is equal only to
    itself: the search asks whether it has found this rule, never whether two rules are alike.
    """

    category: BotCategory
    verdict: UserAgentVerdict | None  # None: named after the text the regex matched
    literal: str
    regex: re.Pattern[str] | None
    version: bool = False  # the literal counts only as a product token: "name/<digit>"
    start: bool = False  # the literal counts only at the start of the user-agent
    squashed: str = ""  # the literal without separators, for names spelled apart
    bounded: bool = False  # the regex must not start inside a name
    # Derived once, so the per-request loop reads attributes instead of computing them.
    rank: int = field(init=False)
    plain: bool = field(init=False)  # a substring test decides
    anywhere: bool = field(init=False)  # an AI agent's own name: counts even in the device model
    trimmed: str = field(init=False)  # what containment between matches compares
    lower_name: bool = field(init=False)  # the list wrote the name in lower case
    # The literal, trimmed as a displayed name is, is the list's name: a user-agent spelling it
    # as listed is named by ``verdict`` itself, with no slice, strip or lookup per request.
    as_listed: bool = field(init=False)
    simple: bool = field(init=False)  # plain and not `anywhere`: one substring test, as written
    # The verdict a match of this rule returns as it is: a list's name not written in lower
    # case (None for the others, whose name depends on the user-agent's spelling or match).
    fixed: UserAgentVerdict | None = field(init=False, repr=False)
    # How a match of this rule ranks against one of another in the user-agent (lower wins):
    # its category's rank, then a name from a list before one read off the regex's match.
    precedence: int = field(init=False)
    # What the search records when the literal confirms the rule, built once: (rank, trimmed,
    # the rule, no regex match).
    entry: tuple[int, str, _Rule, None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "rank", _PRIORITY[self.category])
        set_(self, "plain", self.regex is None and not self.version and not self.start)
        # A plain word ("Devin", "Spider") is a phone's model name or an app's before an agent's.
        plain_word = self.literal.partition("/")[0] in _COMMON_WORDS
        set_(self, "anywhere", self.category == "ai_crawler" and not plain_word)
        set_(self, "trimmed", self.squashed.rstrip("/;:()+"))
        name = self.verdict.name if self.verdict is not None else None
        set_(self, "lower_name", name is not None and name.isascii() and name == name.lower())
        set_(self, "as_listed", name is not None and self.literal.strip(" /;:()+-_.") == name)
        set_(self, "simple", self.plain and not self.anywhere)
        set_(self, "fixed", None if self.lower_name else self.verdict)
        set_(self, "precedence", 2 * self.rank + (self.verdict is None))
        set_(self, "entry", (self.rank, self.trimmed, self, None))


_LITERAL_RE: Final = re.compile(r"(?:\\[^\w]|[^\\.^$*+?{}\[\]|()])+")


def _category(value: str) -> BotCategory:
    """Check a category read from a data file, so a typo fails at import, not per request."""
    for category in _RANKED:
        if value == category:
            return category
    raise ValueError(f"unknown bot category {value!r} in convex_guard user-agent data")


def _load_json(package: str, name: str) -> Any:
    return json.loads((resources.files(package) / name).read_text(encoding="utf-8"))


def _lower_pattern(pattern: str) -> str:
    """Lower-case a regex's letters but not its escapes (``\\S`` must stay ``\\S``)."""
    return re.sub(r"\\.|[A-Z]", lambda m: m[0] if m[0][0] == "\\" else m[0].lower(), pattern)


def _tokens(text: str) -> list[bytes]:
    # Non-ASCII characters become "?" and so separators; every agent name is ASCII.
    return text.encode("ascii", "replace").translate(_TOKEN_TABLE).split()


def _alpha_runs(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _key_rank(token: str) -> tuple[bool, bool, bool, int, str]:
    # Short tokens come next to last: "e" of "15E148" is in every iPhone's user-agent.
    return (
        token in _BROWSER_TOKENS or token in _WEAK_KEYS,
        len(token) < 3,
        token in _COMMON_BOT_TOKENS,
        -len(token),
        token,
    )


def _best_key(candidates: Iterable[str]) -> str | None:
    """Prefer long tokens that browsers never send, so the prefilter stays quiet for people,
    and that few agents share, so a bot's user-agent wakes few rules."""
    return min(candidates, key=_key_rank, default=None)


def _crawler_keys(find: Callable[[str], tuple[int, int] | None], entry: dict[str, Any]) -> set[str]:
    """Tokens of which at least one occurs in every user-agent a crawler-user-agents entry matches.

    Derived from the entry's own example user-agents: a token lying wholly inside the match in all
    of them is certain; failing that, the token each example's match touches, plus the longest
    literal word of the pattern (entries without examples rely on that alone).
    """
    inside: set[str] | None = None
    touching: set[str] = set()
    for instance in entry["instances"]:
        text = instance.lower()
        span = find(text)
        if span is None:
            continue
        start, end = span
        spans = [(m[0], m.start(), m.end()) for m in re.finditer(r"[a-z]+", text)]
        whole = {t for t, s, e in spans if s >= start and e <= end}
        inside = whole if inside is None else inside & whole
        key = _best_key(t for t, s, e in spans if s < end and e > start)
        if key:
            touching.add(key)
    if inside:
        return {min(inside, key=_key_rank)}
    words = re.sub(r"\\.|\[[^]]*]|.[?*{]", " ", _lower_pattern(entry["pattern"]))
    literal = _best_key(_alpha_runs(words))
    return touching | ({literal} if literal else set())


_EXPANSIONS: Final = 64
_REPEATS: Final = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None))
_EMPTY_OPS: Final = (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT)


def _expand(items: Any, *, exact: bool = False) -> list[str] | None:
    """The texts a parsed regex matches, with each variable part as a separator; with
    `exact`, None for a regex with any variable part, so that the texts are all it matches.

    Branches and optional parts are spelled out (at most ``_EXPANSIONS`` texts, else None):
    ``Google(?:bot|Other)`` is "googlebot" and "googleother", each one token, which is what
    the prefilter must see; ``Baidu.*spider`` is "baidu spider".
    """
    texts = [""]
    for op, av in items:
        alternatives: list[str] | None
        if op is _sre.LITERAL:
            alternatives = [chr(av)]
        elif op is _sre.SUBPATTERN:
            alternatives = _expand(av[-1], exact=exact)
        elif op is _sre.BRANCH:
            alternatives = []
            for branch in av[1]:
                sub = _expand(branch, exact=exact)
                if sub is None:
                    return None
                alternatives.extend(sub)
        elif exact:
            return None  # a repeat, a class, a wildcard, an anchor inside
        elif op in _REPEATS:
            sub = _expand(av[2])
            if sub is None:
                return None
            alternatives = ([""] if av[0] == 0 else []) + sub
        elif op in _EMPTY_OPS:
            alternatives = [""]
        else:  # a class, a wildcard: some character, perhaps a letter, perhaps not
            alternatives = [" "]
        if alternatives is None:
            return None
        texts = [t + a for t in texts for a in alternatives]
        if len(texts) > _EXPANSIONS:
            return None
    return texts


def _regex_keys(pattern: str) -> set[str]:
    """Tokens of which one occurs in (nearly) every user-agent a regex without examples matches:
    the best token of each text it can match. A name the regex leaves open on the right
    ("Aboundex" in "Aboundexbot") is missed by the prefilter; the generic words still see most."""
    texts = _expand(_sre.parse(pattern))
    if texts is None:
        return set()
    keys: set[str] = set()
    for text in texts:
        key = _best_key(_alpha_runs(text))
        if key is None:
            return set()  # one branch without letters: no token covers every match
        keys.add(key)
    return keys


def _crawler_rule(
    entry: dict[str, Any], overrides: dict[str, BotCategory]
) -> tuple[_Rule, set[str]]:
    pattern: str = entry["pattern"]
    categories: list[BotCategory] = [
        _TAG_CATEGORY.get(tag, "other_bot") for tag in entry.get("tags", ())
    ]
    category: BotCategory = min(categories, key=_RANKED.index) if categories else "other_bot"
    find: Callable[[str], tuple[int, int] | None]
    if _LITERAL_RE.fullmatch(pattern):
        name = re.sub(r"\\(.)", r"\1", pattern)
        literal = name.lower()

        def find(text: str) -> tuple[int, int] | None:
            at = text.find(literal)
            return None if at < 0 else (at, at + len(literal))

        display = name.strip(" /;:()+-_.")
        category = overrides.get(display.lower(), category)
        verdict = UserAgentVerdict(True, category, display)
        rule = _Rule(category, verdict, literal, None, squashed=_squash(literal))
    else:
        regex = re.compile(_lower_pattern(pattern))

        def find(text: str) -> tuple[int, int] | None:
            match = regex.search(text)
            return None if match is None else match.span()

        rule = _Rule(category, None, "", regex)
    return rule, _crawler_keys(find, entry)


def _regex_rule(entry: dict[str, Any]) -> tuple[_Rule, set[str]]:
    """A device-detector pattern: matched, as device-detector does, after a non-name character."""
    pattern = _lower_pattern(entry["pattern"])
    # The boundary is checked after the search (`_bounded_search`): a look-behind in front
    # would stop the regex engine from skipping ahead to the pattern's literal text.
    bounded = not entry.get("anywhere", False)
    rule = _Rule(_category(entry["category"]), None, "", re.compile(pattern), bounded=bounded)
    return rule, _regex_keys(pattern)


_BOUNDARY: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def _bounded_search(regex: re.Pattern[str], text: str) -> re.Match[str] | None:
    """``regex.search`` where the match does not start inside a name (device-detector's rule)."""
    match = regex.search(text)
    while match is not None and match.start() and text[match.start() - 1] in _BOUNDARY:
        match = regex.search(text, match.start() + 1)
    return match


_CAMEL_RE: Final = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")


def _name_rule(
    name: str, category: BotCategory, *, version: bool, start: bool = False
) -> tuple[_Rule, set[str]]:
    """Agent names from ai.robots.txt, device-detector, isbot and our list, case-insensitively.

    An AI agent's name is also keyed by its parts ("GPTBot": "gpt"), so one spelled apart
    ("GPT-Bot/1.2") still wakes the rule, which then finds the name without separators.
    """
    lowered = name.lower()
    key = _best_key(_alpha_runs(lowered))
    keys = {key} if key else set()
    if category == "ai_crawler":
        keys |= {
            part
            for part in (p.lower() for p in _CAMEL_RE.findall(name))
            if len(part) >= 3 and part not in _COMMON_BOT_TOKENS and part not in _WEAK_KEYS
        }
    verdict = UserAgentVerdict(is_bot=True, category=category, name=name)
    literal = lowered + "/" if version else lowered
    rule = _Rule(category, verdict, literal, None, version, start, _squash(literal))
    return rule, keys


class _Built(NamedTuple):
    """What `_build` makes of the lists."""

    #: The prefilter's index: each key token to the rules it wakes.
    by_key: dict[bytes, tuple[_Rule, ...]]
    overrides: dict[str, BotCategory]
    provenance: dict[str, Any]
    #: The rules no key can wake (see `_whole_agents`).
    unkeyed: tuple[_Rule, ...]
    #: The patterns anchored at the start, as the lists write them, with their rules'
    #: categories (see `_whole_agents`, `_starting_agents`).
    anchored: tuple[tuple[str, BotCategory], ...]


def _build(sources: Iterable[AgentSource], corrections: tuple[str, str]) -> _Built:
    corrected = _load_json(*corrections)
    overrides = {k: _category(v) for k, v in corrected["category_overrides"].items()}
    version_required = {n.lower() for n in corrected["version_required"]}

    built: list[tuple[_Rule, set[str]]] = []
    anchored: list[tuple[str, BotCategory]] = []
    provenance: dict[str, Any] = {}
    for source in sources:
        document = _load_json(source.package, source.resource)
        entries = document if source.entries is None else document[source.entries]
        if isinstance(document, dict):
            about = {k: v for k, v in document.items() if isinstance(v, str)}
            if about:
                provenance[source.name] = about
        counted = "agents" if source.kind == "names" else "patterns"
        provenance[f"{source.name}_{counted}"] = len(entries)
        for entry in entries:
            if source.kind != "names":
                if source.kind == "patterns":
                    made = _crawler_rule(entry, overrides)
                else:
                    made = _regex_rule(entry)
                built.append(made)
                if entry["pattern"].startswith("^"):
                    anchored.append((entry["pattern"], made[0].category))
                continue
            name = entry["name"]
            lowered = name.lower()
            given = entry.get("category")
            if lowered in overrides:
                category = overrides[lowered]
            elif given is not None:
                category = _category(given)
            elif source.category is not None:
                category = source.category
            else:
                raise ValueError(f"{source.name}: agent {name!r} names no category")
            version = entry.get("version", lowered in version_required)
            built.append(
                _name_rule(name, category, version=version, start=entry.get("start", False))
            )

    index: dict[bytes, list[_Rule]] = {}
    unindexed: list[str] = []
    unkeyed: list[_Rule] = []
    # Several lists name the same agent: one rule for it, of the most specific category any
    # list gives it (what the search would pick from the duplicates anyway), keyed by all keys.
    first: dict[tuple[str, bool, bool], int] = {}
    merged: list[tuple[_Rule, set[str]]] = []
    for rule, keys in built:
        if rule.regex is None:
            identity = (rule.literal, rule.version, rule.start)
            at = first.get(identity)
            if at is not None:
                kept, kept_keys = merged[at]
                better = rule if rule.rank < kept.rank else kept
                merged[at] = (better, kept_keys | keys)
                continue
            first[identity] = len(merged)
        merged.append((rule, keys))
    for rule, keys in merged:
        # A rule whose only tokens are browser tokens would send every person down the slow
        # path; the few such entries (e.g. "s4a") are left out and listed in DATA_PROVENANCE.
        usable = {
            k for k in keys if k not in _BROWSER_TOKENS and k not in _WEAK_KEYS and len(k) >= 3
        }
        if not usable:
            named = rule.verdict.name if rule.verdict else None
            unindexed.append(named or (rule.regex.pattern if rule.regex else rule.literal))
            unkeyed.append(rule)
        for key in usable:
            index.setdefault(key.encode("ascii"), []).append(rule)
    provenance["unindexed"] = unindexed
    # Highest-priority rules first, so the search can stop at the first AI crawler it confirms.
    frozen = {
        key: tuple(sorted(rules, key=lambda r: _PRIORITY[r.category]))
        for key, rules in index.items()
    }
    return _Built(frozen, overrides, provenance, tuple(unkeyed), tuple(anchored))


def _whole_agents(
    anchored: Iterable[tuple[str, BotCategory]], unkeyed: Iterable[_Rule]
) -> dict[str, UserAgentVerdict]:
    """The user-agents a list names whole, by their text stripped and in lower case.

    A pattern anchored at both ends that spells out a few texts (device-detector's
    ``^(?:chrome|desktop|node|…)$``, ``^Google$``) names clients that send that word and
    nothing else: scripts, which no browser resembles. The prefilter cannot wake such a
    pattern when its words are browser tokens ("chrome") or too weak to be keys ("desktop"),
    so the whole user-agent is looked up instead (a short one: see `_WHOLE_LENGTH`). So is
    an agent's name that no key can wake (`unkeyed`: "xx032_bo9vs83_2a", "24x7"), sent alone.
    """
    whole: dict[str, UserAgentVerdict] = {}
    for rule in unkeyed:
        if rule.verdict is not None and rule.regex is None and not rule.version:
            key = rule.literal.strip()
            if key and len(key) < _WHOLE_LENGTH:
                whole.setdefault(key, rule.verdict)
    for pattern, category in anchored:
        if not pattern.endswith("$"):
            continue
        for text in _expand(_sre.parse(pattern[1:-1]), exact=True) or ():
            key = text.strip().lower()
            if key and len(key) < _WHOLE_LENGTH:
                whole.setdefault(key, UserAgentVerdict(True, category, text.strip()))
    return whole


def _starting_agents(
    anchored: Iterable[tuple[str, BotCategory]],
) -> tuple[tuple[str, re.Pattern[str], UserAgentVerdict], ...]:
    """The agents a list knows by how their user-agent begins (``^BW/``, ``^ds9``), each
    with the text it begins with, its pattern and its verdict.

    Some are too short or too weak to key ("bw", "silk"), so the prefilter never wakes
    them: a user-agent that nothing else claimed is checked against their beginnings (one
    `str.startswith` of them all, see `_started`).
    """
    found: list[tuple[str, re.Pattern[str], UserAgentVerdict]] = []
    for pattern, category in anchored:
        if pattern.endswith("$"):
            continue  # a whole user-agent: `_whole_agents`
        lead = _LITERAL_RE.match(pattern, 1)
        if lead is None:
            continue
        text = re.sub(r"\\(.)", r"\1", lead[0])
        name = text.strip(" /;:()+-_.")
        if len(name) < 2:
            continue
        regex = re.compile(_lower_pattern(pattern))
        found.append((text.lower(), regex, UserAgentVerdict(True, category, name)))
    return tuple(found)


def _started(lowered: str) -> UserAgentVerdict | None:
    """The agent a list knows by how its user-agent begins (see `_starting_agents`)."""
    if lowered[:1] not in _START_LETTERS or not lowered.startswith(_STARTS):
        return None
    for start, regex, verdict in _STARTING:
        if lowered.startswith(start) and regex.match(lowered):
            return verdict
    return None


# Names that are also plain words ("Devin", "Operator"), whatever list they come from:
# weak evidence, like a generic word (see `_Rule.anywhere` and `classify_user_agent_uncached`).
_COMMON_WORDS: Final = frozenset(n.lower() for n in _load_json(*CORRECTIONS)["version_required"])
_BUILT: Final = _build(SOURCES, CORRECTIONS)
_INDEX, _OVERRIDES, DATA_PROVENANCE = _BUILT.by_key, _BUILT.overrides, _BUILT.provenance
# Podcast and media apps' products (OPAWG user-agents-v2, MIT; derived by
# benchmarks/build_useragent_data.py apps, commit recorded in the file): see `_app`.
_APP_DATA: Final = _load_json(*APPS)
_APPS: Final = frozenset(_APP_DATA["products"])
_AGENT_APPS: Final = frozenset(_APP_DATA["agent_products"])
_APP_WORDS: Final = frozenset(_tokens(name)[0] for name in _APPS | _AGENT_APPS if _tokens(name))
DATA_PROVENANCE["opawg_apps"] = {k: v for k, v in _APP_DATA.items() if isinstance(v, str)}
# With "device", which apps write before the phone's model ("WhatsApp/2.11.107 S60Version/3.1
# Device/Nokia-E51"), and the older phones' systems.
_PHONE_PLATFORMS: Final = frozenset(
    b"iphone ipad ios ipados tvos watchos android darwin cfnetwork dalvik device symbianos"
    b" blackberry kaios tizen".split()
)
# The generic words are prefilter keys too: one set test per request answers both questions.
# So are "http" and "https", which stand alone in every URL: one substring test fewer.
_KEYS: Final = frozenset(_INDEX) | _GENERIC_KEYS | {b"http", b"https"}
#: How short a user-agent is looked at whole: its stripped, lower-cased text is checked against
#: the placeholders and the agents named whole (`_WHOLE`).
_WHOLE_LENGTH: Final = 32
_WHOLE: Final = _whole_agents(_BUILT.anchored, _BUILT.unkeyed)
#: What a short user-agent's stripped, lower-cased text alone decides: one lookup for both.
_SHORT: Final = {**_WHOLE, **dict.fromkeys(_PLACEHOLDERS, _SUSPICIOUS)}
_STARTING: Final = _starting_agents(_BUILT.anchored)
_STARTS: Final = tuple(start for start, _, _ in _STARTING)
#: Their first characters: a one-character slice is a cached string, so one set test spares
#: most user-agents (browsers' "mozilla", "opera") the test of every start.
_START_LETTERS: Final = frozenset(start[:1] for start in _STARTS)
_NO_RULES: Final[tuple[_Rule, ...]] = ()
#: Every prefilter key to the rules it wakes, none for most generic words and "http": the
#: search reads a hit's rules by subscript, with no default to pass.
_WAKES: Final = {key: _INDEX.get(key, _NO_RULES) for key in _KEYS}

# AI agents by name without separators, for the last look at a user-agent no rule confirmed
# ("G.P.T.B.o.t", "Claude Bot"): a word of the text without separators that is one of these
# names. Plain words ("Devin") and short names are left out: they occur by chance.
_DISGUISABLE: Final[dict[bytes, UserAgentVerdict]] = {
    rule.squashed.encode("ascii"): rule.verdict
    for rules in _INDEX.values()
    for rule in rules
    if rule.category == "ai_crawler"
    and rule.verdict is not None
    and not rule.version
    and not rule.start
    and len(rule.squashed) >= 5
    and rule.squashed.isalpha()
    and rule.literal not in _COMMON_WORDS
}
_DISGUISABLE_NAMES: Final = frozenset(_DISGUISABLE)
#: Every beginning and every end of those names, the whole names too. `_disguised` finds a name
#: only in a word made of tokens joined by separators: its first token begins the name, its last
#: ends it. A user-agent whose own tokens (its letters' runs, lower-cased) include no beginning,
#: or no end, has no disguised name.
_DISGUISE_HEADS: Final = frozenset(
    name[:end] for name in _DISGUISABLE for end in range(1, len(name) + 1)
)
_DISGUISE_TAILS: Final = frozenset(
    name[start:] for name in _DISGUISABLE for start in range(len(name))
)


#: Verdicts named after the text that matched, kept for reuse: building a frozen dataclass
#: costs more than a dict lookup, and a bot sends the same user-agent again. Bounded, so
#: user-agents made up to differ cannot grow it (nor long names: at most 4096 of 64 characters);
#: past the bound a verdict is built each time.
_NAMED: Final[dict[tuple[BotCategory, str | None], UserAgentVerdict]] = {}
_NAMED_SIZE: Final = 4096


def _verdict(category: BotCategory, name: str | None) -> UserAgentVerdict:
    key = (category, name)
    verdict = _NAMED.get(key)
    if verdict is None:
        verdict = UserAgentVerdict(True, category, name)
        if len(_NAMED) < _NAMED_SIZE and (name is None or len(name) <= 64):
            _NAMED[key] = verdict
    return verdict


def _display(ua: str, lowered: str, start: int, end: int) -> str:
    text = ua if len(ua) == len(lowered) else lowered
    return text[start:end].strip(" /;:()+-_.")


def _find_product(lowered: str, token: str) -> int:
    """Where ``token`` ("name/") starts as a product token followed by a version, or -1."""
    at = lowered.find(token)
    while at >= 0:
        after = at + len(token)
        if (at == 0 or lowered[at - 1] not in _NAME_CHARS) and lowered[after : after + 1].isdigit():
            return at
        at = lowered.find(token, at + 1)
    return -1


def _confirm(rule: _Rule, text: str, literal: str) -> bool:
    if rule.start:
        return text.startswith(literal)
    if rule.version:
        return _find_product(text, literal) >= 0
    return literal in text


def _most_specific(
    found: list[tuple[int, str, _Rule, re.Match[str] | None]], lowered: str
) -> tuple[int, str, _Rule, re.Match[str] | None]:
    """Of several confirmed rules, the best ranked one whose match lies inside no longer one
    (the longest lies inside none, so there is one); of equals, the agent named first.

    The order of ``found`` follows a set's, which differs between processes (hashes are
    salted), so it must never decide: "Googlebot/2.1; bingbot/2.0" is Googlebot on every
    instance, the crawler its claim is verified as (`core.crawlers`, the first name too).
    """
    if len(found) == 2:
        # Most often of several: a name and one inside it ("Python" of "python-requests",
        # "imagesift" of "ImagesiftBot"), or two lists' rules for one name ("curl"),
        # answered as the loops below would, without them.
        one, two = found
        if one[1] != two[1]:
            if two[1] in one[1]:
                return one
            if one[1] in two[1]:
                return two
        rule_one, rule_two = one[2], two[2]
        if rule_one is rule_two or rule_one.precedence < rule_two.precedence:
            return one
        if rule_one.precedence > rule_two.precedence:
            return two
        return two if _tie_order(two, lowered) < _tie_order(one, lowered) else one
    best = None
    for candidate in found:
        _, text, rule, _ = candidate
        if best is not None and rule is best[2]:
            continue  # the same agent again, woken by another of its keys ("you" of "YouBot")
        size = len(text)
        for _, other, _, _ in found:
            if len(other) > size and text in other:
                break  # inside a longer match
        else:
            if best is None or rule.precedence < best[2].precedence:
                best = candidate
            elif rule.precedence > best[2].precedence:
                continue
            elif _tie_order(candidate, lowered) < _tie_order(best, lowered):
                best = candidate  # equally ranked: the first named
    assert best is not None
    return best


def _tie_order(
    candidate: tuple[int, str, _Rule, re.Match[str] | None], lowered: str
) -> tuple[int, str, str]:
    """Between equally ranked agents: where the name is (one found only spelled apart comes
    after every one found as written), then the rule itself."""
    _, _, rule, match = candidate
    at = match.start() if match is not None else lowered.find(rule.literal)
    pattern = rule.regex.pattern if rule.regex is not None else ""
    return (at if at >= 0 else len(lowered), rule.literal, pattern)


def _without_device(lowered: str) -> str:
    """``lowered`` with an Android platform comment's device model blanked out.

    An Android browser names its device model, and some models are agents' names too
    ("Expanse", "Ruby", "Nitro"): only an AI agent's name counts there. (Agents do write
    their names elsewhere in the platform comment: "(X11; Linux x86_64; Storebot-Google/1.0)".)
    """
    device = _DEVICE_RE.search(lowered)
    if device is None:
        return lowered
    start, end = device.span(1)
    return lowered[:start] + " " * (end - start) + lowered[end:]


def _match_known(ua: str, lowered: str, hits: Iterable[bytes]) -> UserAgentVerdict | None:
    """Confirm the rules woken by the prefilter; the most specific match wins.

    A name is looked for as written, an AI agent's also without separators ("GPT-Bot" is
    GPTBot: disguises are for the agents a site blocks). A match
    lying inside another one is dropped ("Fetch/" inside "node-fetch/", "Applebot" inside
    "Applebot-Extended"): the longer name is the agent, the shorter an accident.
    """
    found: list[tuple[int, str, _Rule, re.Match[str] | None]] = []
    folded: str | None = None  # `lowered` without separators, made when first needed
    masked = _without_device(lowered) if "android" in lowered else lowered
    for key in hits:
        for rule in _WAKES[key]:
            if rule.simple:  # most rules: inlined and tested first, this loop is the bots' hot path
                if rule.literal in masked:
                    found.append(rule.entry)
                continue
            text = lowered if rule.anywhere else masked
            if rule.plain:  # an AI agent's name, looked for spelled apart too
                if rule.literal not in text:
                    if folded is None:
                        folded = _squash(lowered)  # an AI agent's `text` is `lowered`
                    if rule.squashed not in folded:
                        continue
                if rule.entry not in found:  # "YouBot" wakes it by "youbot" and by "you"
                    found.append(rule.entry)
                continue
            match = None
            if rule.regex is not None:
                match = (
                    _bounded_search(rule.regex, text) if rule.bounded else rule.regex.search(text)
                )
                if match is None:
                    continue
                matched = match[0]
                if not (matched.isalnum() and matched.isascii()):  # most matches: one word
                    matched = _squash(matched).rstrip("/;:()+")
                found.append((rule.rank, matched, rule, match))
                continue
            # A start or a product token, confirmed as `_confirm` would, without the call; a
            # product token is a substring first, the test most such rules woken fail.
            literal = rule.literal
            if not (
                text.startswith(literal)
                if rule.start
                else literal in text and _find_product(text, literal) >= 0
            ):
                if not rule.anywhere:
                    continue
                if folded is None:
                    folded = _squash(lowered)
                if rule.squashed not in folded or not _confirm(rule, folded, rule.squashed):
                    continue
            found.append(rule.entry)
    if not found:
        return None
    # Most bots: one rule confirmed, nothing to compare.
    best = found[0] if len(found) == 1 else _most_specific(found, lowered)
    rule = best[2]
    if rule.fixed is not None:  # most rules: the verdict as listed, whatever the spelling
        return rule.fixed
    match = best[3]
    if rule.verdict is not None:
        # A list that writes names in lower case (isbot's): the agent's own spelling, unless
        # the user-agent spells it as listed ("sqlmap/1.8", "jsdom/24.0"), so that the
        # rule's own verdict names it (no strip, no lookup).
        if len(ua) == len(lowered) and not (rule.as_listed and ua == lowered):
            at = lowered.find(rule.literal)
            if at >= 0:
                spelled = ua[at : at + len(rule.literal)]
                if not (rule.as_listed and spelled == rule.literal):
                    name = spelled.strip(" /;:()+-_.")
                    return _verdict(rule.category, name or rule.verdict.name)
        return rule.verdict
    assert match is not None
    start, end = match.span()
    while end > start and not lowered[end - 1].isalnum():
        end -= 1
    while start < end and not lowered[start].isalnum():
        start += 1  # punctuation a pattern's match may begin with
    name = _display(ua, lowered, start, end)
    category = _OVERRIDES.get(name.lower(), rule.category)
    return _verdict(category, name or None)


def _disguised(lowered: str) -> UserAgentVerdict | None:
    """An AI agent's name spelled apart so that no token is a key ("G.P.T.B.o.t")."""
    words = lowered.encode("ascii", "replace").translate(_TOKEN_TABLE, _SEPARATORS).split()
    if _DISGUISABLE_NAMES.isdisjoint(words):  # nearly every user-agent: one set test
        return None
    for word in words:  # the first in the text
        verdict = _DISGUISABLE.get(word)
        if verdict is not None:
            return verdict
    return None


def _match_generic(ua: str, lowered: str, tokens: list[bytes]) -> UserAgentVerdict | None:
    """A bot by its generic words, unless they belong to an AI agent spelled apart
    ("Claude Bot/1.0"); a device's "bot" (Cubot phones) costs no disguise check."""
    verdict = _generic_words(ua, lowered, tokens)
    if verdict is None:
        return None
    return _disguised(lowered) or verdict


def _generic_words(ua: str, lowered: str, tokens: list[bytes]) -> UserAgentVerdict | None:
    platform = _PLATFORM_RE.match(lowered)
    floor = platform.end() if platform else 0
    if floor and "+http" in lowered[:floor]:
        floor = lowered.index("+http")  # a bot's "+URL", which no platform comment carries
    # The generic words as whole tokens (a set test, not a regex that tries every position);
    # one with a category of its own ("headless", "scraper") outranks "bot" and a URL.
    words = [
        word
        for word in map(_GENERIC_TEXT.__getitem__, _GENERIC_KEYS.intersection(tokens))
        if lowered.find(word, floor) >= 0  # not only in the platform comment
    ]
    specific = [w for w in words if _GENERIC_WORDS[w] != "other_bot"]
    match = None if specific else _GENERIC_RE.search(lowered, floor)
    while match is not None and _device_maker(lowered, match.start()):
        match = _GENERIC_RE.search(lowered, match.end())
    if match is None:
        if not words:
            return None
        # The first in the text; the word itself breaks a tie (the set's order differs by process).
        word = min(specific or words, key=lambda w: (lowered.find(w, floor), w))
        start = lowered.find(word, floor)
        end = start + len(word)
        name = _display(ua, lowered, start, end)
        return _verdict(_GENERIC_WORDS[word], name or None)
    start, end = match.span()
    word = match[0]
    if word.startswith("http"):
        while end < len(lowered) and lowered[end] not in " ;)":
            end += 1  # name the bot after its URL
    else:
        while start > 0 and lowered[start - 1] in _NAME_CHARS:
            start -= 1  # widen "bot" to "foobot"
    name = _display(ua, lowered, start, end)
    return _verdict(_GENERIC_WORDS.get(word, "other_bot"), name or None)


# Phone makers whose name ends in "bot", which in-app browsers name after the platform comment
# ("... Instagram 94.0 Android (22/5.1; 320dpi; 720x1280; CUBOT; S550 Pro; ...)").
_DEVICE_MAKERS: Final = ("cu",)


def _device_maker(lowered: str, at: int) -> bool:
    """Whether the "bot" at ``at`` ends a phone maker's name rather than an agent's."""
    for maker in _DEVICE_MAKERS:
        start = at - len(maker)
        if lowered.startswith(maker, start) and (start == 0 or lowered[start - 1] in " ;("):
            return lowered[at + 3 : at + 4] in ("", " ", ";", ")", "_")
    return False


def _classify_long(ua: str) -> UserAgentVerdict:
    """An over-long user-agent is suspicious unless it names a known agent anywhere in it.

    Padding must not hide an agent: "GPTBot/1.2" after 10 kB of junk is still an AI crawler,
    blocked as one. The search covers the first ``SEARCH_LENGTH`` characters and the last 1 KiB.
    """
    text = ua if len(ua) <= SEARCH_LENGTH else ua[:SEARCH_LENGTH] + " " + ua[-MAX_LENGTH:]
    lowered = text.lower()
    hits = _KEYS.intersection(_tokens(lowered))
    found = _match_known(text, lowered, hits) if hits else None
    return found or _disguised(lowered) or _SUSPICIOUS


def classify_user_agent_uncached(ua: str) -> UserAgentVerdict:
    """Classify one user-agent without the cache; the benchmark measures this.

    Known agents are found through a token prefilter (one ``bytes.translate`` and a set lookup)
    so a person's browser, the common case, is answered without running any regex; only the few
    agents whose tokens occur are then confirmed by their own pattern. A non-ASCII user-agent is
    first folded to the ASCII it looks like (`_fold`), so invisible or look-alike characters
    cannot hide a name.
    """
    try:
        raw = ua.encode("ascii")  # raising costs nothing until it raises
    except UnicodeEncodeError:
        ua = _fold(ua)
        raw = ua.encode("ascii", "replace")
    size = len(ua)
    if _WHOLE_LENGTH <= size <= MAX_LENGTH:  # most user-agents: one test
        letters = raw.translate(_TOKEN_TABLE)  # `_tokens` inlined: a call costs ~10%
        if size in _SHAPE_SIZES and letters in _BROWSER_SHAPES:
            return _HUMAN  # a mainstream browser, answered by one set lookup
        tokens = letters.split()
        hits = _KEYS.intersection(tokens)  # one pass: a bot's keys are needed at once
        if not hits and len(tokens) > 6 and tokens[0] == b"mozilla" and ua.isascii():
            # Any other browser, answered as below but without lower-casing the user-agent:
            # the generic words are lower-case letters, so an ASCII user-agent's lower case
            # holds one exactly where ``letters`` does (a copy costs half of `str.lower`).
            words = letters.decode("ascii")
            if not ("bot" in words or "crawl" in words or "spider" in words):
                return _HUMAN
        lowered = ua.lower()
    elif size < _WHOLE_LENGTH:  # never a browser's shape (`_SHAPE_SIZES`): lowered at once, once
        lowered = ua.lower()
        stripped = lowered.strip()
        if len(stripped) < 4:
            return _SUSPICIOUS
        whole = _SHORT.get(stripped)  # a placeholder or an agent named whole
        if whole is not None:
            return whole
        tokens = raw.translate(_TOKEN_TABLE).split()
        hits = _KEYS.intersection(tokens)
    else:
        return _classify_long(ua)
    if not hits:
        if not tokens:  # not a single ASCII letter (and so no hits: tested only here)
            return _SUSPICIOUS
        # Spelled out rather than any(...): a generator costs more than the four searches.
        # On str: CPython's search over the table's output (bytes full of spaces) is 5x slower.
        if "bot" in lowered or "crawl" in lowered or "spider" in lowered:
            verdict = _match_generic(ua, lowered, tokens) or _bare(ua, tokens)
        elif len(tokens) > 6 and tokens[0] == b"mozilla":
            return _HUMAN  # every browser; a short or odd user-agent gets the closer look
        else:
            # No word of an ASCII user-agent begins (or none ends) an AI agent's name: nothing
            # is spelled apart (`_DISGUISE_HEADS`), answered from the tokens already hashed.
            spelled_apart = not (
                ua.isascii()
                and (_DISGUISE_HEADS.isdisjoint(tokens) or _DISGUISE_TAILS.isdisjoint(tokens))
            )
            disguised = _disguised(lowered) if spelled_apart else None
            verdict = disguised or _bare(ua, tokens) or _started(lowered)
        if verdict is None:
            return _HUMAN
        known = None  # no list names the agent, only generic signs
    else:
        known = verdict = _match_known(ua, lowered, hits)
        if verdict is None:
            verdict = _match_generic(ua, lowered, tokens) or _bare(ua, tokens)
            if verdict is None:
                return _HUMAN
    # A browser's user-agent (most bots send one) names no app's product: no call for it.
    if tokens[0] == b"mozilla":
        return verdict
    # Nor does a script whose first word is no app's, on no phone platform and not through
    # Apple's URL loading system (most HTTP libraries and crawlers): `_app` would say no.
    if (
        tokens[0] not in _APP_WORDS
        and "cfnetwork/" not in lowered
        and _PHONE_PLATFORMS.isdisjoint(tokens)
    ):
        return verdict
    # A list names the agent (an HTTP library counts as a generic sign, see `_app`).
    listed = verdict is known and verdict.category != "http_library"
    if listed or verdict.category == "ai_crawler":
        if (verdict.name or "").lower() in _COMMON_WORDS:
            # "Spider/3.1 (iPhone; iOS 16.0)": a plain word names an app as often as an
            # agent, so it weighs as a generic word does, even as an AI agent's name.
            listed = False
        elif verdict.category == "ai_crawler":
            return verdict
    return _HUMAN if _app(lowered, tokens, verdict, listed) else verdict


def _app(lowered: str, tokens: list[bytes], verdict: UserAgentVerdict, listed: bool) -> bool:
    """Whether a flagged user-agent is a phone or media app's own, sent for a person.

    Apps start with their product ("Podbean/Android App 8.3.2 (http://podbean.com)") and carry
    what bots carry (a URL, "OkHttp/4.9"), so the product decides: a known app's is a person's.
    Any other product that names a phone platform is an app too when ``listed`` is false (only
    a generic sign flagged it: a URL, a word, its HTTP library, as in "otg/1.5.1 (AppleTv;
    tvOS16.2) libcurl/7.58.0"), or when it is also an agent's name ("WhatsApp/2.18
    Android/6.0 Device/Meizu-MX5" beside WhatsApp's link preview "WhatsApp/2.23.20.0 A"); and
    so is whatever Apple's URL loading system sends ("DuckDuckGo/3 CFNetwork/1494.0.7
    Darwin/23.4.0"), which servers do not run. AI agents are not excused: a site blocks them
    by name whatever they start with (the caller's test; a name that is a plain word, "Spider",
    weighs as a generic word); nor is a browser ("Mozilla/5.0
    ... Googlebot/2.1").
    """
    # The first word, already hashed by the prefilter, says whether the product is worth
    # reading: most bots' is no app's.
    product = _product(lowered) if tokens[0] in _APP_WORDS else None
    if product in _APPS:
        return True
    apple = "cfnetwork/" in lowered and "darwin/" in lowered  # an app on an Apple device
    if listed:  # a list names the agent: a platform is part of its disguise, unless...
        return apple or (product in _AGENT_APPS and not _PHONE_PLATFORMS.isdisjoint(tokens))
    if not apple and _PHONE_PLATFORMS.isdisjoint(tokens):
        return False  # most HTTP libraries and generic bots: no platform named
    # The library is the product ("okhttp/4.9 (Android 14)"): a script, wherever it runs.
    return verdict.category != "http_library" or _product(lowered) != (verdict.name or "").lower()


def _product(lowered: str) -> str:
    """What a user-agent starts with, up to a version, a comment or its end. ("Castro 2,
    Episode Duration Lookup" is not the Castro app's "Castro/2023.5": a name and a number
    may be a bot's.)"""
    product = lowered.partition("/")[0]
    if "(" in product or ";" in product:
        product = product.partition("(")[0].partition(";")[0]
    return product.strip().rstrip("+")  # "WhatsApp+/2.11": a modified build of the app


def _plainly_a_browser(letters: bytes) -> bool:
    """Whether the search answers "person" from ``letters`` alone (the user-agent's letters,
    lower-cased, every other byte a space), as it does for any ordinary browser: it starts with
    Mozilla, has more than six words, none a key, and no generic word."""
    tokens = letters.split()
    return (
        len(tokens) > 6
        and tokens[0] == b"mozilla"
        and _KEYS.isdisjoint(tokens)
        and not any(word in letters for word in (b"bot", b"crawl", b"spider"))
    )


# Mainstream browsers' user-agents, in the shapes they take: "{3}" is a 3-digit number, "{1-2}"
# one of 1 or 2 digits. Digits are not letters, so each expansion is one text of letters and
# spaces (`_BROWSER_SHAPES`); a browser whose user-agent has one of these shapes (the same
# words, the same punctuation, numbers of the same lengths) is answered by one set lookup.
# The people of tests/data/user_agents.csv and the evaluation set played no part: these are
# the shapes browsers document (Chrome's and Safari's frozen platform strings, Firefox's).
_DESKTOPS: Final = (
    "Windows NT 10.0; Win64; x64",
    "Windows NT 10.0; WOW64",
    "Windows NT 10.0",
    "Windows NT 6.1; Win64; x64",
    "Windows NT 6.3; Win64; x64",
    "Macintosh; Intel Mac OS X 10_15_7",
    "X11; Linux x86_64",
    "X11; CrOS x86_64 {5}.{2-3}.0",
)
_CHROMIUM: Final = (
    "",
    " Edg/{3}.0.{4}.{1-3}",
    " OPR/{3}.0.0.0",
    " YaBrowser/{2}.{1}.{1}.{1-4}",
    " Vivaldi/{1}.{1}.{4}.{2}",
)
_IOS: Final = ("iPhone; CPU iPhone OS {2}_{1}", "iPhone; CPU iPhone OS {2}_{1}_{1}",
               "iPad; CPU OS {2}_{1}", "iPad; CPU OS {2}_{1}_{1}")  # fmt: skip
_IOS_BROWSERS: Final = (
    "Version/{2}.{1} Mobile/15E148 Safari/604.1",
    "Version/{2}.{1}.{1} Mobile/15E148 Safari/604.1",
    "CriOS/{3}.0.{4}.{1-3} Mobile/15E148 Safari/604.1",
    "FxiOS/{3}.{1} Mobile/15E148 Safari/605.1.15",
    "Version/{2}.{1} EdgiOS/{3}.{4}.{2} Mobile/15E148 Safari/605.1.15",
)
_FIREFOX_PLATFORMS: Final = (
    "Windows NT 10.0; Win64; x64",
    "Windows NT 6.1; Win64; x64",
    "Macintosh; Intel Mac OS X 10.15",
    "Macintosh; Intel Mac OS X {2}.{1}",
    "X11; Linux x86_64",
    "X11; Ubuntu; Linux x86_64",
)
_BROWSER_TEMPLATES: Final = (
    *(
        f"Mozilla/5.0 ({p}) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/{{3}}.0.0.0 "
        f"Safari/537.36{c}"
        for p in _DESKTOPS
        for c in _CHROMIUM
    ),
    *(f"Mozilla/5.0 ({p}; rv:{{3}}.0) Gecko/20100101 Firefox/{{3}}.0" for p in _FIREFOX_PLATFORMS),
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/{2}.{1} Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/{2}.{1}.{1} Safari/605.1.15",
    *(
        f"Mozilla/5.0 ({p} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) {b}"
        for p in _IOS
        for b in _IOS_BROWSERS
    ),
    "Mozilla/5.0 (Linux; Android {1-2}; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{3}.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android {1-2}; K) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/{2}.0 Chrome/{3}.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Android {1-2}; Mobile; rv:{3}.0) Gecko/{3}.0 Firefox/{3}.0",
)
_DIGITS_RE: Final = re.compile(r"\{(\d)(?:-(\d))?\}")


def _shapes(templates: Iterable[str]) -> frozenset[bytes]:
    """Every template's expansions as `_TOKEN_TABLE` output, each kept only if the search
    itself, run on it, answers "person" from its letters (`_plainly_a_browser`): the set can
    change no answer, only how fast it comes."""
    shapes: set[bytes] = set()
    for template in templates:
        texts = [""]
        at = 0
        for match in _DIGITS_RE.finditer(template):
            low = int(match[1])
            high = int(match[2] or low)
            texts = [
                t + template[at : match.start()] + "1" * n
                for t in texts
                for n in range(low, high + 1)
            ]
            at = match.end()
        for text in texts:
            letters = (text + template[at:]).encode("ascii").translate(_TOKEN_TABLE)
            if _plainly_a_browser(letters) and 32 <= len(letters) <= MAX_LENGTH:
                shapes.add(letters)
    return frozenset(shapes)


_BROWSER_SHAPES: Final = _shapes(_BROWSER_TEMPLATES)
#: Their lengths: an integer's set test spares most other user-agents hashing their text.
_SHAPE_SIZES: Final = frozenset(map(len, _BROWSER_SHAPES))


#: The most spaces `_BARE_RE` can match: its one ``\s`` after the version and, inside a comment,
#: its ``\s?`` and ``[\s/]``. Counting them is far cheaper than the regex failing on a browser.
_BARE_SPACES: Final = 3


def _bare(ua: str, tokens: list[bytes]) -> UserAgentVerdict | None:
    if tokens[0] != b"mozilla":
        return None
    stripped = ua.strip()
    if stripped.count(" ") > _BARE_SPACES or _BARE_RE.match(stripped) is None:
        return None
    rest = stripped.split(None, 1)
    name = rest[1].strip(" ()") if len(rest) > 1 else ""
    if name[:11].lower() == "compatible;":
        name = name[11:].lstrip()  # "(compatible; blogger.com)" is blogger.com
    return _verdict("other_bot", name[:64] or None)


class CacheInfo(NamedTuple):
    maxsize: int
    currsize: int


#: Up to this many characters a user-agent is its own cache key; a longer one is found by its
#: length and its ends, which cost the same to hash whatever its length.
_WHOLE_KEY: Final = 256
_EDGE: Final = 64


class _VerdictCache:
    """`classify` with its answers kept for the last `maxsize` user-agents seen.

    A dict keyed by the string hashes all of it on every request (a header value is a new
    string each time, so its hash is never cached), which for an 8 kB padded agent costs more
    than the rest of the check. Long agents are therefore keyed by (length, first and last
    64 characters) and the entry holds the whole agent, compared before its verdict is used:
    two agents that share the key but differ anywhere never share a verdict (the later one
    takes the slot). The oldest entry makes room for a new one.
    """

    __slots__ = ("_classify", "_long", "_short", "maxsize")

    def __init__(self, classify: UserAgentClassifier, maxsize: int) -> None:
        self._classify = classify
        self.maxsize = maxsize
        self._short: dict[str, UserAgentVerdict] = {}
        self._long: dict[tuple[int, str, str], tuple[str, UserAgentVerdict]] = {}

    def __call__(self, ua: str) -> UserAgentVerdict:
        """Classify a user-agent, caching the answer: a few clients send most requests."""
        if len(ua) <= _WHOLE_KEY:
            verdict = self._short.get(ua)
            if verdict is None:
                verdict = self._classify(ua)
                self._keep(self._short, ua, verdict)
            return verdict
        key = (len(ua), ua[:_EDGE], ua[-_EDGE:])
        entry = self._long.get(key)
        if entry is not None and entry[0] == ua:
            return entry[1]
        verdict = self._classify(ua)
        self._keep(self._long, key, (ua, verdict))
        return verdict

    def _keep(self, entries: dict[Any, Any], key: object, value: object) -> None:
        if key not in entries and len(entries) >= self.maxsize:
            del entries[next(iter(entries))]
        entries[key] = value

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self.maxsize, len(self._short) + len(self._long))

    def cache_clear(self) -> None:
        self._short.clear()
        self._long.clear()


#: Classify a user-agent, caching the answer (see `_VerdictCache`): the default classifier.
classify_user_agent: Final = _VerdictCache(classify_user_agent_uncached, CACHE_SIZE)
