"""User-agent classification (sans-IO): person or bot, and which kind, from maintained lists."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    "other_bot",
    "suspicious",
]

BOT_CATEGORIES: Final[tuple[BotCategory, ...]] = get_args(BotCategory)

CACHE_SIZE: Final = 4096
MAX_LENGTH: Final = 1024  # real browsers stay far below; longer values are padding or probing


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
    regex, the example user-agents it must match, tags naming its purpose); ``"names"`` are
    agent names, matched case-insensitively as words, each with an optional ``category`` and
    ``version`` (the name counts only as a product token, ``name/<digit>``). ``entries`` is
    the key the list is under (None: the file is the list); ``category`` is for names that
    carry none. The file's other text fields are its provenance (``DATA_PROVENANCE``).
    """

    name: str
    kind: Literal["patterns", "names"]
    package: str
    resource: str
    entries: str | None = None
    category: BotCategory | None = None


#: The lists, in order: of two rules of one category woken by one token, the earlier list's
#: is tried first.
SOURCES: Final[tuple[AgentSource, ...]] = (
    # Search engines, SEO and feed crawlers, archivers, monitors, previews, HTTP libraries
    # (crawler-user-agents on PyPI, MIT).
    AgentSource("crawler_user_agents", "patterns", "crawleruseragents", "crawler-user-agents.json"),
    # AI crawlers, assistants and agents by name (ai.robots.txt, MIT; vendored with its commit).
    AgentSource(
        "ai_robots_txt",
        "names",
        "convex_guard.core.data",
        "ai_robots.json",
        entries="agents",
        category="ai_crawler",
    ),
    # Ours: headless browsers and automation, scanners, HTTP libraries, monitors and previews
    # the lists miss, each entry naming its category.
    AgentSource("curated", "names", "convex_guard.core.data", "user_agents_curated.json", "agents"),
)

#: Corrections applied to every list, from our file: ``category_overrides`` (an agent's
#: category where a list's tags do not fit our policy, by lower-cased name) and
#: ``version_required`` (names that are also common words: "Spider", "Code").
CORRECTIONS: Final = ("convex_guard.core.data", "user_agents_curated.json")


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

# ASCII letters lower-cased, every other byte a space: ``bytes.translate`` + ``split`` is the
# cheapest tokenizer CPython offers, several times faster than any regex over the same text.
_TOKEN_TABLE: Final = bytes(
    (c | 0x20) if (65 <= c <= 90 or 97 <= c <= 122) else 32 for c in range(256)
)

# Words that name a bot when a user-agent does not match any known agent.
# Starts with a literal so the regex engine can skip ahead; the name is widened to its word after.
_GENERIC_RE: Final = re.compile(r"(?:bot|crawler|crawl|spider|scraper)(?![a-z])|https?://")
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")
# The exclusion: a browser's platform comment, "(Linux; Android 9; CUBOT X19)". Device names
# live there and some contain "bot" (real Cubot phones), so the generic words are looked for
# only after it; bots put their name in a "(compatible; ...)" comment or after the platform.
_PLATFORM_RE: Final = re.compile(r"\A\s*mozilla/[\d.]+\s*\((?![^)]*compatible)[^)]*\)")


@dataclass(frozen=True, slots=True)
class _Rule:
    """One known agent. Most are confirmed by a substring test, a few need their regex.

    The prefilter has already found one of the rule's key tokens, so the confirmation runs only
    for user-agents that very likely are this agent. ``verdict`` is built once per rule: a frozen
    dataclass costs more to construct than the whole substring test.
    """

    category: BotCategory
    verdict: UserAgentVerdict | None  # None: named after the text the regex matched
    literal: str
    regex: re.Pattern[str] | None
    version: bool = False  # the literal counts only as a product token: "name/<digit>"


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
        token in _BROWSER_TOKENS,
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
        rule = _Rule(category, UserAgentVerdict(True, category, display), literal, None)
    else:
        regex = re.compile(_lower_pattern(pattern))

        def find(text: str) -> tuple[int, int] | None:
            match = regex.search(text)
            return None if match is None else match.span()

        rule = _Rule(category, None, "", regex)
    return rule, _crawler_keys(find, entry)


def _name_rule(name: str, category: BotCategory, *, version: bool) -> tuple[_Rule, set[str]]:
    """Agent names from ai.robots.txt and our list: matched as words, case-insensitively."""
    lowered = name.lower()
    key = _best_key(_alpha_runs(lowered))
    keys = {key} if key else set()
    verdict = UserAgentVerdict(is_bot=True, category=category, name=name)
    if version:
        # Names that are also common words ("Spider", "Code") only count as a product token.
        return _Rule(category, verdict, lowered + "/", None, version=True), keys
    return _Rule(category, verdict, lowered, None), keys


def _build(
    sources: Iterable[AgentSource], corrections: tuple[str, str]
) -> tuple[dict[bytes, tuple[_Rule, ...]], dict[str, BotCategory], dict[str, Any]]:
    corrected = _load_json(*corrections)
    overrides = {k: _category(v) for k, v in corrected["category_overrides"].items()}
    version_required = {n.lower() for n in corrected["version_required"]}

    built: list[tuple[_Rule, set[str]]] = []
    provenance: dict[str, Any] = {}
    for source in sources:
        document = _load_json(source.package, source.resource)
        entries = document if source.entries is None else document[source.entries]
        if isinstance(document, dict):
            about = {k: v for k, v in document.items() if isinstance(v, str)}
            if about:
                provenance[source.name] = about
        counted = "patterns" if source.kind == "patterns" else "agents"
        provenance[f"{source.name}_{counted}"] = len(entries)
        for entry in entries:
            if source.kind == "patterns":
                built.append(_crawler_rule(entry, overrides))
                continue
            name = entry["name"]
            lowered = name.lower()
            given = entry.get("category")
            if given is not None:
                category = _category(given)
            elif source.category is not None:
                category = overrides.get(lowered, source.category)
            else:
                raise ValueError(f"{source.name}: agent {name!r} names no category")
            version = entry.get("version", lowered in version_required)
            built.append(_name_rule(name, category, version=version))

    index: dict[bytes, list[_Rule]] = {}
    unindexed: list[str] = []
    for rule, keys in built:
        # A rule whose only tokens are browser tokens would send every person down the slow
        # path; the few such entries (e.g. "s4a") are left out and listed in DATA_PROVENANCE.
        usable = {k for k in keys if k not in _BROWSER_TOKENS}
        if not usable:
            named = rule.verdict.name if rule.verdict else None
            unindexed.append(named or (rule.regex.pattern if rule.regex else rule.literal))
        for key in usable:
            index.setdefault(key.encode("ascii"), []).append(rule)
    provenance["unindexed"] = unindexed
    # Highest-priority rules first, so the search can stop at the first AI crawler it confirms.
    frozen = {
        key: tuple(sorted(rules, key=lambda r: _PRIORITY[r.category]))
        for key, rules in index.items()
    }
    return frozen, overrides, provenance


_INDEX, _OVERRIDES, DATA_PROVENANCE = _build(SOURCES, CORRECTIONS)
_KEYS: Final = frozenset(_INDEX)


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


def _match_known(ua: str, lowered: str, hits: Iterable[bytes]) -> UserAgentVerdict | None:
    """Confirm the rules woken by the prefilter; the most specific match wins.

    A match lying inside another one is dropped first ("Fetch/" inside "node-fetch/",
    "Applebot" inside "Applebot-Extended"): the longer name is the agent, the shorter an accident.
    """
    found: list[tuple[int, int, int, _Rule, re.Match[str] | None]] = []
    for key in hits:
        for rule in _INDEX[key]:
            match = None
            if rule.regex is not None:
                match = rule.regex.search(lowered)
                if match is None:
                    continue
                start, end = match.span()
            else:
                if rule.version:
                    start = _find_product(lowered, rule.literal)
                else:
                    start = lowered.find(rule.literal)
                if start < 0:
                    continue
                end = start + len(rule.literal)
            while end > start and not lowered[end - 1].isalnum():
                end -= 1  # "Fetch/" and "fetch" name the same span
            found.append((_PRIORITY[rule.category], start, end, rule, match))
    best = None
    best_order = None
    for candidate in found:
        rank, start, end, rule, _ = candidate
        for _, s, e, _, _ in found:
            if s <= start and end <= e and e - s > end - start:
                break  # inside a longer match
        else:
            order = (rank, rule.verdict is None)
            if best_order is None or order < best_order:
                best, best_order = candidate, order
    if best is None:
        return None
    _, start, end, rule, match = best
    if rule.verdict is not None:
        return rule.verdict
    name = _display(ua, lowered, start, end)
    category = _OVERRIDES.get(name.lower(), rule.category)
    return UserAgentVerdict(is_bot=True, category=category, name=name or None)


def _match_generic(ua: str, lowered: str) -> UserAgentVerdict | None:
    platform = _PLATFORM_RE.match(lowered)
    match = _GENERIC_RE.search(lowered, platform.end() if platform else 0)
    if match is None:
        return None
    start, end = match.span()
    if match[0].startswith("http"):
        while end < len(lowered) and lowered[end] not in " ;)":
            end += 1  # name the bot after its URL
    else:
        while start > 0 and lowered[start - 1] in _NAME_CHARS:
            start -= 1  # widen "bot" to "foobot"
    name = _display(ua, lowered, start, end)
    return UserAgentVerdict(is_bot=True, category="other_bot", name=name or None)


def classify_user_agent_uncached(ua: str) -> UserAgentVerdict:
    """Classify one user-agent without the cache; the benchmark measures this.

    Known agents are found through a token prefilter (one ``bytes.translate`` and a set lookup)
    so a person's browser, the common case, is answered without running any regex; only the few
    agents whose tokens occur are then confirmed by their own pattern.
    """
    lowered = ua.lower()
    if len(lowered) < 32:
        stripped = lowered.strip()
        if len(stripped) < 4 or stripped in _PLACEHOLDERS:
            return _SUSPICIOUS
    elif len(lowered) > MAX_LENGTH:
        # Padding must not hide a known agent: classify both ends (bounded work), so
        # "GPTBot/1.2" followed by 10 kB of junk is still an AI crawler, blocked as one.
        for end in (ua[:MAX_LENGTH], ua[-MAX_LENGTH:]):
            found = classify_user_agent_uncached(end)
            if found.is_bot and found.category != "suspicious":
                return found
        return _SUSPICIOUS
    tokens = _tokens(lowered)
    if not tokens:  # not a single ASCII letter
        return _SUSPICIOUS
    if _KEYS.isdisjoint(tokens):
        # Spelled out rather than any(...): a generator costs more than the four searches.
        if "bot" in lowered or "crawl" in lowered or "spider" in lowered or "http" in lowered:
            return _match_generic(ua, lowered) or _HUMAN
        return _HUMAN
    verdict = _match_known(ua, lowered, _KEYS.intersection(tokens))
    return verdict or _match_generic(ua, lowered) or _HUMAN


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
