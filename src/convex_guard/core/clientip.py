"""Client IP resolution (sans-IO): the peer, or the first untrusted hop behind trusted proxies."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Final, Literal

__all__ = [
    "UNIX_SOCKET",
    "UNKNOWN_CLIENT",
    "ForwardedHeader",
    "TrustedProxies",
    "client_ip",
    "ip_key",
    "peer_ip",
    "peer_keys",
]

IPAddress = IPv4Address | IPv6Address
ForwardedHeader = Literal["x-forwarded-for", "forwarded"]

UNKNOWN_CLIENT: Final = "unknown"
#: The `trusted_proxies` entry that trusts the unix socket a server listens on (as nginx's
#: `set_real_ip_from unix:`): its connections carry no peer address (`scope["client"]` is None).
UNIX_SOCKET: Final = "unix:"

# RFC 7239 §4: for=token or for="quoted-string", searched in one forwarded-element.
_FORWARDED_FOR: Final = re.compile(r'(?:^|[;\s])for\s*=\s*("[^"]*"|[^;\s]*)', re.I)
_BRACKETED: Final = re.compile(r"\[([^\]]+)\](?::\d*)?")
#: An IPv4 address exactly as `ipaddress` writes one (ASCII digits, no leading zeros, each part
#: at most 255): such a peer is its own address and its own limit key, with nothing to parse.
_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_DOTTED_QUAD: Final = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


class TrustedProxies:
    """The proxies whose forwarding headers are believed, parsed once at start-up.

    Entries are IPs, CIDR networks, or `"unix:"` for a proxy that connects over the unix
    socket the server listens on (such a connection has no peer address to check).
    A bad entry raises here, naming it, so a typo in configuration fails the deploy instead of
    silently trusting nobody (or everybody) on every request.
    """

    __slots__ = ("_v4", "_v6", "unix")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        if isinstance(entries, str):
            raise TypeError("TrustedProxies takes a list of IPs/CIDRs, not one string")
        v4: list[IPv4Network] = []
        v6: list[IPv6Network] = []
        unix = False
        for entry in entries:
            if entry.strip() == UNIX_SOCKET:
                unix = True
                continue
            try:
                network = ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted proxy {entry!r} is not an IP address, a CIDR network or "
                    f"{UNIX_SOCKET!r} (e.g. '10.0.0.1', '10.0.0.0/8', '2001:db8::/32', 'unix:')"
                ) from None
            if isinstance(network, IPv4Network):
                v4.append(network)
            else:
                v6.append(network)
        self._v4: tuple[IPv4Network, ...] = tuple(v4)
        self._v6: tuple[IPv6Network, ...] = tuple(v6)
        self.unix = unix

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6 or self.unix)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if isinstance(address, IPv4Address):
            return any(address in network for network in self._v4)
        if isinstance(address, IPv6Address):
            return any(address in network for network in self._v6)
        return False

    def __repr__(self) -> str:
        entries = [str(n) for n in (*self._v4, *self._v6)] + [UNIX_SOCKET] * self.unix
        return f"TrustedProxies({entries!r})"


#: Addresses repeat from request to request; parsing one costs microseconds, a cache hit little.
_CACHE_SIZE: Final = 16_384


@lru_cache(maxsize=_CACHE_SIZE)
def ip_key(address: IPAddress, ipv6_prefix: int = 64) -> str:
    """The rate-limit key of an address: IPv4 as is, IPv6 as its network (a /64 by default).

    One IPv6 subscriber usually holds a whole /64 and can rotate through it at will, so keying
    single IPv6 addresses would let it reset its limits for free. IPv4-mapped IPv6 addresses
    ("::ffff:1.2.3.4", seen on dual-stack sockets) are keyed as the IPv4 address they are.
    """
    if not 0 <= ipv6_prefix <= 128:
        raise ValueError(f"ipv6_prefix must be between 0 and 128, got {ipv6_prefix}")
    if isinstance(address, IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ipv6_prefix == 128:
            return str(IPv6Address(int(address)))  # drops any %zone
        shift = 128 - ipv6_prefix
        return str(IPv6Network(((int(address) >> shift) << shift, ipv6_prefix)))
    return str(address)


@lru_cache(maxsize=_CACHE_SIZE)
def _parse(value: str) -> IPAddress | None:
    """One address from a header entry or peer, or None for anything else (never raises).

    Accepts "1.2.3.4", "1.2.3.4:8080", "2001:db8::1", "[2001:db8::1]:443" and quoted forms;
    obfuscated RFC 7239 identifiers ("_hidden") and "unknown" are not addresses.
    """
    text = value.strip().strip('"').strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        match = _BRACKETED.fullmatch(text)
        if match is None:
            return None
        text = match[1]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]  # IPv4 with a port
    try:
        return ip_address(text)
    except ValueError:
        return None


def _hops(headers: Sequence[tuple[bytes, bytes]], header: ForwardedHeader) -> list[str]:
    """Every hop the header lists, several header lines concatenated in arrival order.

    Split at every comma, quotes or not: a node (an address, a port, `unknown`) never holds
    one, and a quote a client left open must not swallow what a proxy appended after it. A
    Forwarded element without `for=` is a hop with no address (an empty string).
    """
    wanted = header.encode("ascii")
    hops: list[str] = []
    for name, raw in headers:
        if name != wanted and name.lower() != wanted:
            continue
        elements = raw.decode("latin-1").split(",")
        if header == "forwarded":
            for element in elements:
                match = _FORWARDED_FOR.search(element)
                hops.append(match[1] if match is not None else "")
        else:
            hops.extend(elements)
    return hops


def client_ip(
    peer: str | None,
    headers: Sequence[tuple[bytes, bytes]],
    trusted: TrustedProxies,
    *,
    ipv6_prefix: int = 64,
    header: ForwardedHeader = "x-forwarded-for",
) -> str:
    """The key of the client a request came from, safe to rate-limit on.

    The peer address (ASGI ``scope["client"][0]``) is the answer unless the peer is a trusted
    proxy: only then is ``header`` read, from the right, skipping trusted hops, up to the first
    untrusted address. Without trusted proxies the header is ignored entirely, so a client
    cannot choose its own key. One header is read, not both: a proxy that appends to
    X-Forwarded-For passes a client's own Forwarded header through untouched.

    A hop that is not an address (garbage, ``unknown``, an obfuscated ``_name``) ends the walk:
    a trusted proxy wrote it, so everything left of it came from the client, and the proxy
    that wrote it (the hop to its right, or the peer) is keyed as the client instead. If every
    hop is trusted, the left-most one is the client. No peer address (a unix socket) is a
    trusted proxy only when ``trusted`` names ``"unix:"``; else, like an unusable peer, it
    gives ``"unknown"``.
    """
    current = _parse(peer) if peer else None
    if current is None:
        if peer or not trusted.unix:
            return UNKNOWN_CLIENT
    elif not trusted or current not in trusted:
        return ip_key(current, ipv6_prefix)
    for hop in reversed(_hops(headers, header)):
        candidate = _parse(hop)
        if candidate is None:
            break  # written by the proxy `current`: the hops left of it are the client's
        if candidate not in trusted:
            return ip_key(candidate, ipv6_prefix)
        current = candidate
    return UNKNOWN_CLIENT if current is None else ip_key(current, ipv6_prefix)


@lru_cache(maxsize=_CACHE_SIZE)
def peer_keys(peer: str, ipv6_prefix: int = 64) -> tuple[str, str]:
    """A client's address and its rate-limit key, in one cached lookup.

    The same as ``client_ip(peer, (), TrustedProxies(), ipv6_prefix=128)`` and
    ``client_ip(peer, (), TrustedProxies(), ipv6_prefix=ipv6_prefix)``: `peer` is the TCP
    peer, or the address `client_ip` resolved behind trusted proxies. Every request from one
    client asks the same, so the pair is cached whole.

    A miss costs little for the common peer, an IPv4 address in canonical form: it is both
    answers as it is, and one regex match says so without building an address object. With
    more clients than the cache holds every request misses, so that miss must stay cheap.
    """
    if _DOTTED_QUAD.fullmatch(peer) is not None:
        return peer, peer
    address = _parse(peer)
    if address is None:
        return UNKNOWN_CLIENT, UNKNOWN_CLIENT
    return ip_key(address, 128), ip_key(address, ipv6_prefix)


def peer_ip(scope: Mapping[str, Any]) -> str:
    """The TCP peer's limit key (IPv6 by its /64), trusting no header: when no fingerprint runs."""
    client = scope.get("client")
    if not client or not client[0]:
        return UNKNOWN_CLIENT
    _, key = peer_keys(client[0])
    return key
