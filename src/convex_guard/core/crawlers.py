"""Crawlers whose operators publish their addresses (sans-IO): who a user-agent claims to be,
and whether the address it came from is one its operator publishes.

The data is `core/data/crawler_ranges.json` (each crawler's range file URL, the file's own
`creationTime`, where our copy came from, the prefixes), refreshed by `convex-guard bots
update-ranges` into a file named by `CONVEX_GUARD_CRAWLER_RANGES`. Networks are parsed once,
into sorted disjoint integer intervals per crawler and IP version: an address is matched by
one bisect, with no `ipaddress` network object on the request path.
"""

from __future__ import annotations

import bisect
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Final, Literal

__all__ = [
    "RANGES_ENV",
    "Crawler",
    "CrawlerRanges",
    "CrawlerVerdict",
    "VerificationStatus",
    "default_ranges",
    "hostname_matches",
    "parse_range_file",
]

#: A file written by `convex-guard bots update-ranges`, read instead of the shipped data.
RANGES_ENV: Final = "CONVEX_GUARD_CRAWLER_RANGES"

VerificationStatus = Literal["verified", "spoofed", "pending"]


@dataclass(frozen=True, slots=True)
class CrawlerVerdict:
    """What the guard concluded about a request's claimed identity, and why.

    ``status``: ``verified`` (its address is one the operator publishes, its forward-confirmed
    reverse DNS is the operator's, or its Web Bot Auth signature is valid), ``spoofed`` (the
    claim was checked and is false), ``pending`` (a check runs in the background; this request
    is decided on its user-agent). ``method`` names the check; ``evidence`` is one line for
    the bot event (request-derived text in it is escaped by whoever logs it).
    """

    status: VerificationStatus
    name: str
    method: Literal["ranges", "fcrdns", "web-bot-auth", "address"]
    evidence: str


@dataclass(frozen=True, slots=True)
class Crawler:
    """One published crawler: the user-agent tokens that claim it and where it may come from.

    ``url`` is the operator's range file (None: the operator documents reverse DNS only);
    ``reverse_dns`` the domains its forward-confirmed reverse DNS ends in (empty: none
    documented); ``created`` the range file's own `creationTime`.
    """

    name: str
    operator: str
    agents: tuple[str, ...]
    url: str | None = None
    reverse_dns: tuple[str, ...] = ()
    created: str | None = None
    prefixes: tuple[str, ...] = ()
    retrieved: Mapping[str, str] = field(default_factory=dict)


class _Intervals:
    """Disjoint sorted [start, end] integer intervals of one IP version, each with the
    published network it came from (a network nested in another is left out: the outer
    one is the evidence)."""

    __slots__ = ("ends", "networks", "starts")

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        spans = sorted(
            ((int(n.network_address), int(n.broadcast_address), str(n)) for n in networks),
            key=lambda span: (span[0], -span[1]),
        )
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.networks: list[str] = []
        for start, end, text in spans:
            if self.ends and start <= self.ends[-1]:
                continue  # CIDR blocks either nest or are disjoint: this one is inside
            self.starts.append(start)
            self.ends.append(end)
            self.networks.append(text)

    def find(self, value: int) -> str | None:
        i = bisect.bisect_right(self.starts, value) - 1
        if i >= 0 and value <= self.ends[i]:
            return self.networks[i]
        return None


class CrawlerRanges:
    """The published crawlers, parsed once: `claimed(user_agent)` and `network_of(crawler, ip)`.

    ``date`` is the newest range file's `creationTime` (what evidence lines cite);
    ``source`` says where the data was read from.
    """

    def __init__(
        self, crawlers: Sequence[Crawler], *, date: str = "", source: str = "shipped"
    ) -> None:
        self.crawlers = tuple(crawlers)
        self.date = date
        self.source = source
        self._v4: dict[str, _Intervals] = {}
        self._v6: dict[str, _Intervals] = {}
        by_token: dict[str, Crawler] = {}
        for crawler in self.crawlers:
            nets = []
            for prefix in crawler.prefixes:
                try:
                    nets.append(ipaddress.ip_network(prefix, strict=False))
                except ValueError:
                    raise ValueError(f"crawler {crawler.name}: bad prefix {prefix!r}") from None
            self._v4[crawler.name] = _Intervals(n for n in nets if n.version == 4)
            self._v6[crawler.name] = _Intervals(n for n in nets if n.version == 6)
            for agent in crawler.agents:
                by_token.setdefault(agent.lower(), crawler)
        self._by_token = by_token
        if by_token:
            # Longest first, so "GoogleOther-Image" is not read as a shorter token; a token
            # counts only as a whole word ("notgooglebot" claims nothing).
            alternatives = "|".join(re.escape(t) for t in sorted(by_token, key=len, reverse=True))
            pattern = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])", re.IGNORECASE)
        else:
            pattern = re.compile(r"(?!)")

        @lru_cache(maxsize=4096)
        def claimed(user_agent: str) -> Crawler | None:
            match = pattern.search(user_agent)
            return None if match is None else by_token[match.group(1).lower()]

        self.claimed = claimed

    def network_of(
        self, crawler: Crawler, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> str | None:
        """The published network of `crawler` holding `ip`, or None (also for a bad address)."""
        if isinstance(ip, str):
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                return None
        else:
            address = ip
        if address.version == 6:
            mapped = address.ipv4_mapped
            if mapped is not None:
                address = mapped
        table = (self._v4 if address.version == 4 else self._v6).get(crawler.name)
        return None if table is None else table.find(int(address))

    def by_name(self, name: str) -> Crawler | None:
        for crawler in self.crawlers:
            if crawler.name == name:
                return crawler
        return None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "shipped") -> CrawlerRanges:
        """Ranges from the data file's shape (see `core/data/crawler_ranges.json`)."""
        crawlers = []
        for entry in data.get("crawlers", ()):
            crawlers.append(
                Crawler(
                    name=str(entry["name"]),
                    operator=str(entry.get("operator", entry["name"])),
                    agents=tuple(str(a) for a in entry.get("agents", ())),
                    url=entry.get("url"),
                    reverse_dns=tuple(
                        str(d).lower().strip(".") for d in entry.get("reverse_dns", ())
                    ),
                    created=entry.get("created"),
                    prefixes=tuple(str(p) for p in entry.get("prefixes", ())),
                    retrieved=dict(entry.get("retrieved") or {}),
                )
            )
        return cls(crawlers, date=str(data.get("date", "")), source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> CrawlerRanges:
        """The file at `path`, else the one `CONVEX_GUARD_CRAWLER_RANGES` names, else the
        shipped data."""
        path = path or os.environ.get(RANGES_ENV) or None
        if path is None:
            text = (
                resources.files("convex_guard.core.data")
                .joinpath("crawler_ranges.json")
                .read_text("utf-8")
            )
            return cls.from_json(json.loads(text))
        with open(path, encoding="utf-8") as handle:
            return cls.from_json(json.load(handle), source=os.fspath(path))


@lru_cache(maxsize=1)
def default_ranges() -> CrawlerRanges:
    """`CrawlerRanges.load()`, once per process."""
    return CrawlerRanges.load()


def hostname_matches(host: str, domains: Iterable[str]) -> bool:
    """Whether `host` is one of `domains` or a name under one (`crawl-1.googlebot.com` is
    under `googlebot.com`; `evilgooglebot.com` is not)."""
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in domains)


def parse_range_file(data: Any) -> tuple[str | None, list[str]]:
    """An operator's range file (`{"creationTime": …, "prefixes": [{"ipv4Prefix": …} |
    {"ipv6Prefix": …}]}`, the shape Google, Bing, OpenAI, Perplexity, Apple and others
    publish): its creation time and its prefixes, each checked. Raises ValueError."""
    if not isinstance(data, Mapping) or not isinstance(data.get("prefixes"), list):
        raise ValueError("not a range file: no 'prefixes' list")
    prefixes = []
    for item in data["prefixes"]:
        if not isinstance(item, Mapping):
            raise ValueError(f"not a prefix entry: {item!r}"[:120])
        text = item.get("ipv4Prefix") or item.get("ipv6Prefix")
        if not isinstance(text, str):
            raise ValueError(f"not a prefix entry: {item!r}"[:120])
        prefixes.append(str(ipaddress.ip_network(text.strip(), strict=False)))
    created = data.get("creationTime")
    return (str(created) if created is not None else None), prefixes
