"""Who a bot really is: published crawler ranges, forward-confirmed reverse DNS, Web Bot Auth.

The design is *decide now, verify behind*: nothing here is awaited on the request path.
`CrawlerVerifier.verify` answers at once from what it knows — the published ranges (parsed
once, `core/crawlers.py`), a cache of reverse-DNS answers, a cache of agents' key
directories. What it does not know yet (the first request from an address outside the ranges
of a crawler that documents reverse DNS, the first signature of an agent whose directory was
never fetched) is looked up in a background task, one per address or directory at a time, with
its own timeout, and that request is decided without it: on the ranges (`pending="ranges"`,
the default: outside them is spoofed) or on its user-agent (`pending="claimed"`). The answer
lands in the cache, and the requests after it use it. So a nameserver or a key directory that
never answers costs no request its timeout, not even the first one, and a flood from one
address costs one lookup per cache lifetime.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from convex_guard.core.crawlers import (
    Crawler,
    CrawlerRanges,
    CrawlerVerdict,
    VerificationStatus,
    default_ranges,
    hostname_matches,
)
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.logs import ThrottledLog, logger, printable
from convex_guard.core.webbotauth import (
    MalformedSignature,
    parse_directory,
    signature_claim,
    verify_signature,
)

__all__ = ["CrawlerVerifier", "PendingPolicy"]

#: How a claim is decided while its background check runs: on the ranges (outside them is
#: spoofed) or on its user-agent alone (neither verified nor spoofed).
PendingPolicy = Literal["ranges", "claimed"]

DEFAULT_DNS_TIMEOUT: Final = 2.0
DEFAULT_DIRECTORY_TIMEOUT: Final = 3.0
#: A key directory is a few keys: anything larger is not one.
DEFAULT_DIRECTORY_MAX_BYTES: Final = 64 * 1024
#: Seconds an answer is kept: a confirmed crawler for long, a failure shorter, a timeout
#: shortest (the nameserver may be back soon).
TTL_CONFIRMED: Final = 6 * 3600.0
TTL_FAILED: Final = 3600.0
TTL_TIMEOUT: Final = 300.0
TTL_DIRECTORY: Final = 3600.0
TTL_DIRECTORY_FAILED: Final = 300.0
#: Entries per cache and lookups in flight: what a flood of made-up addresses or agents
#: can make this process hold.
CACHE_SIZE: Final = 10_000
MAX_IN_FLIGHT: Final = 64
#: PTR names followed per address (a crawler has one).
MAX_NAMES: Final = 3
_DIRECTORY_TYPES: Final = "application/http-message-signatures-directory+json, application/json"


@dataclass(frozen=True, slots=True)
class _DnsAnswer:
    """One address's forward-confirmed reverse DNS: the PTR names, those whose A/AAAA
    records lead back to the address, or why there is none."""

    names: tuple[str, ...] = ()
    confirmed: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Directory:
    keys: dict[str, Ed25519PublicKey]
    error: str | None = None


K = TypeVar("K")
V = TypeVar("V")


class _Cache(Generic[K, V]):
    """An LRU map whose entries expire (monotonic seconds)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, now: float) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: K, value: V, expires: float) -> None:
        self._items[key] = (expires, value)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class CrawlerVerifier:
    """Verifies claimed crawlers and signed agents for `BotDetectionMiddleware`.

    - `ranges`: the published crawlers (default: the shipped data, or the file
      `CONVEX_GUARD_CRAWLER_RANGES` names).
    - `reverse_dns`: check forward-confirmed reverse DNS for crawlers that document it, when
      the address is outside their ranges (ranges lag behind new addresses) or they
      publish none. `nameservers`: `"host"` or `"host:port"` (default: the system's).
    - `web_bot_auth`: verify `web-bot-auth` signatures; `allow_insecure_directories` lets a
      key directory be fetched over plain http or from a private address (tests, a lab),
      never on by default: the agent names the URL, so it must not reach inside your network.
    - `pending`: see `PendingPolicy`.
    """

    def __init__(
        self,
        *,
        ranges: CrawlerRanges | None = None,
        reverse_dns: bool = True,
        nameservers: Sequence[str] | None = None,
        dns_timeout: float = DEFAULT_DNS_TIMEOUT,
        web_bot_auth: bool = True,
        directory_timeout: float = DEFAULT_DIRECTORY_TIMEOUT,
        directory_max_bytes: int = DEFAULT_DIRECTORY_MAX_BYTES,
        allow_insecure_directories: bool = False,
        pending: PendingPolicy = "ranges",
    ) -> None:
        for name, value in (("dns_timeout", dns_timeout), ("directory_timeout", directory_timeout)):
            if not 0 < value < math.inf:
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        if pending not in ("ranges", "claimed"):
            raise ConfigurationError("pending must be 'ranges' or 'claimed'")
        if isinstance(nameservers, str):
            raise ConfigurationError("nameservers must be a list, not one string")
        self.ranges = ranges if ranges is not None else default_ranges()
        self.reverse_dns = reverse_dns
        self.web_bot_auth = web_bot_auth
        self.dns_timeout = dns_timeout
        self.directory_timeout = directory_timeout
        self.directory_max_bytes = directory_max_bytes
        self.allow_insecure_directories = allow_insecure_directories
        self.pending = pending
        self._nameservers = [_nameserver(n) for n in nameservers] if nameservers else None
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._dns: _Cache[str, _DnsAnswer] = _Cache(CACHE_SIZE)
        self._directories: _Cache[str, _Directory] = _Cache(CACHE_SIZE)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._trouble = ThrottledLog()
        # A crawler from a private, loopback or reserved address most likely means an untrusted
        # proxy in front of the app: said once, as it would be said of every crawler after.
        self._warned_private = False
        #: Lookups started (reverse DNS and directories), for tests and metrics.
        self.lookups = 0

    # -- the request path: never awaits ----------------------------------------------------

    def signature(
        self, method: str, url: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> CrawlerVerdict | None:
        """The request's Web Bot Auth verdict; None when it carries no `web-bot-auth`
        signature. Malformed → spoofed; a directory not fetched yet (or unreachable) →
        pending, decided on the user-agent."""
        if not self.web_bot_auth or not any(k == b"signature-input" for k, _ in headers):
            return None  # the common case: one scan of the names, nothing parsed
        try:
            claim = signature_claim(headers)
        except MalformedSignature as exc:
            return CrawlerVerdict("spoofed", "signed agent", "web-bot-auth", f"malformed: {exc}")
        if claim is None:
            return None
        name = urlsplit(claim.agent).hostname or claim.agent
        refused = self._refused_directory(claim.directory)
        if refused is not None:
            return CrawlerVerdict("pending", name, "web-bot-auth", refused)
        directory = self._directories.get(claim.directory, time.monotonic())
        if directory is None:
            self._start(claim.directory, self._fetch_directory(claim.directory))
            return CrawlerVerdict(
                "pending", name, "web-bot-auth", f"key directory {claim.directory} not fetched yet"
            )
        if directory.error is not None:
            why = f"key directory {claim.directory}: {directory.error}"
            return CrawlerVerdict("pending", name, "web-bot-auth", why)
        result = verify_signature(claim, directory.keys, method=method, url=url, headers=headers)
        return CrawlerVerdict(
            "verified" if result.valid else "spoofed", name, "web-bot-auth", result.reason
        )

    def crawler(self, user_agent: str, ip: str) -> CrawlerVerdict | None:
        """The verdict on the crawler `user_agent` claims to be, from `ip`; None when it
        claims none we can check."""
        crawler = self.ranges.claimed(user_agent)
        if crawler is None:
            return None
        name = crawler.name
        address = _public_address(ip)
        if address is None:
            if not self._warned_private:
                self._warned_private = True
                logger.warning(
                    "A request claiming to be %s came from %s, not a public address: every "
                    "crawler from there is judged spoofed. If the app is behind a proxy, list "
                    "it in trusted_proxies so the client's own address is used.",
                    printable(name),
                    printable(ip),
                )
            return CrawlerVerdict("spoofed", name, "address", f"ip {ip} is not a public address")
        network = self.ranges.network_of(crawler, address)
        if network is not None:
            why = f"ip {ip} in {name} {network} (ranges {self._date(crawler)})"
            return CrawlerVerdict("verified", name, "ranges", why)
        outside = (
            f"ip {ip} not in {name} ranges ({self._date(crawler)})"
            if crawler.prefixes
            else f"{crawler.operator} publishes no ranges"
        )
        if not (self.reverse_dns and crawler.reverse_dns):
            if not crawler.prefixes:
                return None  # nothing to check it against
            return CrawlerVerdict("spoofed", name, "ranges", outside)
        answer = self._dns.get(ip, time.monotonic())
        if answer is None:
            self._start("dns:" + ip, self._lookup(ip))
            status: VerificationStatus = (
                "spoofed" if self.pending == "ranges" and crawler.prefixes else "pending"
            )
            return CrawlerVerdict(status, name, "ranges", outside + "; fcrdns pending")
        return _fcrdns_verdict(crawler, ip, answer)

    def _date(self, crawler: Crawler) -> str:
        return (crawler.created or self.ranges.date or "?")[:10]

    def _refused_directory(self, url: str) -> str | None:
        if self.allow_insecure_directories:
            return None
        parts = urlsplit(url)
        if parts.scheme != "https":
            return f"key directory {url} is not https"
        try:
            literal = ipaddress.ip_address(parts.hostname or "")
        except ValueError:
            return None
        if not literal.is_global:
            return f"key directory {url} is on a private address"
        return None

    def _start(self, key: str, work: object) -> None:
        """Run `work` (a coroutine) in the background unless the same key is in flight, or
        too many are (then it is dropped; a later request starts it again)."""
        assert asyncio.iscoroutine(work)
        if key in self._tasks or len(self._tasks) >= MAX_IN_FLIGHT:
            work.close()
            return
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no loop (a synchronous caller): no background check
            work.close()
            return
        self.lookups += 1
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def wait(self) -> None:
        """Wait for the background lookups in flight (tests; a graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    # -- background work ---------------------------------------------------------------------

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self._nameservers is None:
                self._resolver = dns.asyncresolver.Resolver()
            else:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = list(self._nameservers)
            self._resolver.cache = None  # ours is the cache, with our lifetimes
        return self._resolver

    async def _lookup(self, ip: str) -> None:
        resolver = self._get_resolver()
        try:
            async with asyncio.timeout(self.dns_timeout):
                answer = await _fcrdns(resolver, ip, self.dns_timeout)
            ttl = TTL_CONFIRMED if answer.confirmed else TTL_FAILED
        except TimeoutError:
            answer, ttl = _DnsAnswer(error=f"no answer within {self.dns_timeout:g} s"), TTL_TIMEOUT
        except Exception as exc:
            self._trouble.warning("Reverse DNS of %s failed: %r", printable(ip), exc)
            answer, ttl = _DnsAnswer(error=type(exc).__name__), TTL_TIMEOUT
        self._dns.put(ip, answer, time.monotonic() + ttl)

    async def _fetch_directory(self, url: str) -> None:
        try:
            async with asyncio.timeout(self.directory_timeout):
                keys = await self._download(url)
            directory, ttl = _Directory(keys), TTL_DIRECTORY
        except TimeoutError:
            directory = _Directory({}, f"no answer within {self.directory_timeout:g} s")
            ttl = TTL_DIRECTORY_FAILED
        except Exception as exc:
            directory = _Directory({}, printable(str(exc) or type(exc).__name__))
            ttl = TTL_DIRECTORY_FAILED
        if directory.error is not None:
            self._trouble.warning("Key directory %s: %s", printable(url), directory.error)
        self._directories.put(url, directory, time.monotonic() + ttl)

    async def _download(self, url: str) -> dict[str, Ed25519PublicKey]:
        limit = self.directory_max_bytes
        async with (
            httpx.AsyncClient(timeout=self.directory_timeout, follow_redirects=False) as client,
            client.stream("GET", url, headers={"accept": _DIRECTORY_TYPES}) as response,
        ):
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ValueError(f"larger than {limit} bytes")
        keys = parse_directory(bytes(body))
        if not keys:
            raise ValueError("no Ed25519 key")
        return keys


async def _fcrdns(resolver: dns.asyncresolver.Resolver, ip: str, lifetime: float) -> _DnsAnswer:
    try:
        ptr = await resolver.resolve_address(ip, lifetime=lifetime)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return _DnsAnswer(error="no PTR record")
    names = tuple(str(r.target).rstrip(".").lower() for r in ptr)[:MAX_NAMES]
    record = "AAAA" if ipaddress.ip_address(ip).version == 6 else "A"
    wanted = ipaddress.ip_address(ip)
    confirmed = []
    for name in names:
        try:
            forward = await resolver.resolve(name, record, lifetime=lifetime)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        if any(ipaddress.ip_address(r.address) == wanted for r in forward):
            confirmed.append(name)
    return _DnsAnswer(names=names, confirmed=tuple(confirmed))


def _fcrdns_verdict(crawler: Crawler, ip: str, answer: _DnsAnswer) -> CrawlerVerdict:
    name = crawler.name
    for host in answer.confirmed:
        if hostname_matches(host, crawler.reverse_dns):
            return CrawlerVerdict("verified", name, "fcrdns", f"fcrdns {ip} {host}")
    if answer.error is not None:
        why = answer.error
    elif not answer.names:
        why = "no PTR record"
    elif not answer.confirmed:
        why = f"{answer.names[0]} does not resolve back to {ip}"
    else:
        why = f"{answer.confirmed[0]} is not under {', '.join(crawler.reverse_dns)}"
    return CrawlerVerdict("spoofed", name, "fcrdns", f"fcrdns {ip}: {why}")


@lru_cache(maxsize=4096)
def _public_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`ip` parsed, when it is a public address (`is_global` scans a dozen networks: once
    per address, not per request)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return address if address.is_global else None


def _nameserver(text: str) -> dns.nameserver.Nameserver:
    """`"10.0.0.2"`, `"127.0.0.1:5353"` or `"[::1]:5353"` → a nameserver."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, tail = text.partition(":")
        port = int(tail)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigurationError(f"nameserver {text!r} is not an address[:port]") from None
    return dns.nameserver.Do53Nameserver(host, port)
