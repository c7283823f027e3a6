"""Client IP resolution: trusted proxies only, right-to-left walk, IPv6 keyed by network."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convex_guard.core.clientip import ForwardedHeader, TrustedProxies, client_ip, ip_key, peer_keys

NONE = TrustedProxies()
LB = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])
TWO = TrustedProxies(["10.0.0.1", "192.0.2.7"])


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", v.encode()) for v in values]


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        # No trusted proxies: the header is ignored, whatever it says.
        ("203.0.113.9", xff("1.2.3.4"), NONE, "203.0.113.9"),
        ("203.0.113.9", [(b"forwarded", b"for=1.2.3.4")], NONE, "203.0.113.9"),
        # Peer not trusted: spoofed header ignored even when proxies are configured.
        ("203.0.113.9", xff("1.2.3.4"), LB, "203.0.113.9"),
        # One trusted hop.
        ("10.1.2.3", xff("198.51.100.4"), LB, "198.51.100.4"),
        # A client-supplied value left of the real one is never reached.
        ("10.1.2.3", xff("1.2.3.4, 198.51.100.4"), LB, "198.51.100.4"),
        # Two trusted hops: skip the inner proxy.
        ("10.0.0.1", xff("6.6.6.6, 198.51.100.4, 192.0.2.7"), TWO, "198.51.100.4"),
        # Multiple header lines concatenate in order.
        ("10.0.0.1", xff("6.6.6.6, 198.51.100.4", "192.0.2.7"), TWO, "198.51.100.4"),
        # Ports on IPv4, bracketed IPv6 with port.
        ("10.1.2.3", xff("198.51.100.4:5555"), LB, "198.51.100.4"),
        ("10.1.2.3", xff("[2001:db8:1:2::99]:443"), LB, "2001:db8:1:2::/64"),
        # A trusted proxy that wrote no address is the client: what is left of it is the
        # client's own writing, never believed (and garbage never raises).
        ("10.1.2.3", xff("198.51.100.4, not-an-ip, , unknown"), LB, "10.1.2.3"),
        ("10.1.2.3", xff("6.6.6.6, unknown"), LB, "10.1.2.3"),
        ("10.0.0.1", xff("6.6.6.6, garbage, 192.0.2.7"), TWO, "192.0.2.7"),
        ("10.1.2.3", xff("6.6.6.6, "), LB, "10.1.2.3"),
        ("10.1.2.3", xff("\x00\xff;;,,"), LB, "10.1.2.3"),
        # Every hop trusted: the left-most is the client.
        ("10.0.0.1", xff("192.0.2.7, 10.0.0.1"), TWO, "192.0.2.7"),
        # Upper-case header names (non-ASGI callers) still count.
        ("10.1.2.3", [(b"X-Forwarded-For", b"198.51.100.4")], LB, "198.51.100.4"),
        # IPv6 peers keyed by /64; IPv4-mapped normalised.
        ("2001:db8:1:2:3:4:5:6", [], NONE, "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", [], NONE, "203.0.113.9"),
        # Trusted IPv6 proxy.
        ("2001:db8:ffff::1", xff("2001:db8:aaaa:bbbb::1"), LB, "2001:db8:aaaa:bbbb::/64"),
        # No or unusable peer.
        (None, xff("1.2.3.4"), LB, "unknown"),
        ("", [], NONE, "unknown"),
        ("not an ip", [], LB, "unknown"),
    ],
)
def test_x_forwarded_for(
    peer: str | None, headers: list[tuple[bytes, bytes]], trusted: TrustedProxies, expected: str
) -> None:
    assert client_ip(peer, headers, trusted) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"for=198.51.100.4", "198.51.100.4"),
        (b'for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::/64"),
        (b"for=198.51.100.4;proto=https;by=10.0.0.1", "198.51.100.4"),
        (b"For=6.6.6.6, for=198.51.100.4", "198.51.100.4"),
        # An obfuscated or unknown hop: the proxy that wrote it is the client.
        (b"for=198.51.100.4, for=_hidden", "10.1.2.3"),
        (b"for=198.51.100.4, for=unknown", "10.1.2.3"),
        (b"for=unknown", "10.1.2.3"),
        # A quote the client left open does not swallow the proxy's element.
        (b'for="6.6.6.6, for="[2001:db8:cafe::17]"', "2001:db8:cafe::/64"),
        (b'for="198.51.100.4:80"', "198.51.100.4"),
        (b"by=10.0.0.1", "10.1.2.3"),  # no for= at all
        (b"for=6.6.6.6, proto=https", "10.1.2.3"),  # the proxy's element names no client
    ],
)
def test_forwarded(value: bytes, expected: str) -> None:
    headers = [(b"forwarded", value)]
    assert client_ip("10.1.2.3", headers, LB, header="forwarded") == expected


def test_forwarded_header_choice_prevents_spoofing_through_the_other_header() -> None:
    # The proxy appends to X-Forwarded-For; a client's own Forwarded header must not be read.
    headers = [(b"forwarded", b"for=1.2.3.4"), (b"x-forwarded-for", b"198.51.100.4")]
    assert client_ip("10.1.2.3", headers, LB) == "198.51.100.4"


@pytest.mark.parametrize(
    ("address", "prefix", "expected"),
    [
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 56, "2001:db8:1::/56"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6"),
        ("fe80::1%eth0", 128, "fe80::1"),
        ("::ffff:1.2.3.4", 64, "1.2.3.4"),
        ("192.0.2.1", 64, "192.0.2.1"),
    ],
)
def test_ip_key(address: str, prefix: int, expected: str) -> None:
    assert ip_key(ip_address(address), prefix) == expected


def test_rotating_inside_one_allocation_keeps_the_key() -> None:
    keys = {client_ip(f"2001:db8:1:2::{i:x}", [], NONE) for i in range(1, 200)}
    assert keys == {"2001:db8:1:2::/64"}


def test_ip_key_rejects_bad_prefix() -> None:
    with pytest.raises(ValueError, match="ipv6_prefix"):
        ip_key(ip_address("::1"), 129)


def test_trusted_proxies_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'"):
        TrustedProxies(["10.0.0.1", "10.0.0.300"])
    with pytest.raises(TypeError):
        TrustedProxies("10.0.0.1")
    assert not TrustedProxies()
    assert ip_address("::ffff:10.0.0.1") in TrustedProxies(["10.0.0.0/8"])
    assert "10.0.0.1" not in TrustedProxies(["10.0.0.0/8"])  # addresses, not strings


header_values = st.binary(max_size=200) | st.text(max_size=100).map(str.encode)


@given(
    peer=st.sampled_from(["203.0.113.9", "2001:db8::1", "::ffff:192.0.2.1"]),
    values=st.lists(
        st.tuples(st.sampled_from([b"x-forwarded-for", b"forwarded", b"X-Real-IP"]), header_values),
        max_size=5,
    ),
)
def test_without_trusted_proxies_no_header_changes_the_key(
    peer: str, values: list[tuple[bytes, bytes]]
) -> None:
    expected = client_ip(peer, [], NONE)
    assert client_ip(peer, values, NONE) == expected
    assert client_ip(peer, values, NONE, header="forwarded") == expected


@given(values=st.lists(header_values, max_size=5))
def test_garbage_never_raises_behind_a_trusted_proxy(values: list[bytes]) -> None:
    headers = [(b"x-forwarded-for", v) for v in values] + [(b"forwarded", v) for v in values]
    for header in ("x-forwarded-for", "forwarded"):
        key = client_ip("10.1.2.3", headers, LB, header=header)
        assert key == "10.1.2.3" or ip_address(key.split("/")[0])


peers = (
    st.ip_addresses().map(str)
    | st.sampled_from(["::ffff:192.0.2.1", "[2001:db8::1]:443", "1.2.3.4:80", "unknown", ""])
    | st.text(max_size=70)
)


@given(peer=peers, prefix=st.integers(0, 128))
def test_peer_keys_is_client_ip_without_proxies(peer: str, prefix: int) -> None:
    """The fingerprint middleware's cached shortcut answers as the general resolver does."""
    assert peer_keys(peer, prefix) == (
        client_ip(peer, [], NONE, ipv6_prefix=128),
        client_ip(peer, [], NONE, ipv6_prefix=prefix),
    )


# -- unix sockets ---------------------------------------------------------------------------------

UNIX = TrustedProxies(["unix:", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "headers", "trusted", "expected"),
    [
        # A proxy on the unix socket: its header is believed only when "unix:" is trusted.
        (None, xff("198.51.100.4"), UNIX, "198.51.100.4"),
        ("", xff("198.51.100.4"), UNIX, "198.51.100.4"),
        (None, xff("6.6.6.6, 198.51.100.4, 10.0.0.9"), UNIX, "198.51.100.4"),
        (None, xff("2001:db8:1:2::99"), UNIX, "2001:db8:1:2::/64"),
        (None, xff("198.51.100.4"), LB, "unknown"),
        # Nothing usable from the socket's proxy: it has no address of its own to key on.
        (None, [], UNIX, "unknown"),
        (None, xff("6.6.6.6, unknown"), UNIX, "unknown"),
        (None, xff("10.0.0.9"), UNIX, "10.0.0.9"),
        # "unix:" trusts no TCP peer.
        ("203.0.113.9", xff("1.2.3.4"), TrustedProxies(["unix:"]), "203.0.113.9"),
        ("not an ip", xff("1.2.3.4"), UNIX, "unknown"),
    ],
)
def test_unix_socket_proxy(
    peer: str | None, headers: list[tuple[bytes, bytes]], trusted: TrustedProxies, expected: str
) -> None:
    assert client_ip(peer, headers, trusted) == expected


def test_unix_entry_is_spelled_once() -> None:
    assert TrustedProxies(["unix:"]) and TrustedProxies(["unix:"]).unix
    assert not TrustedProxies(["10.0.0.1"]).unix
    assert repr(TrustedProxies(["10.0.0.1", "unix:"])) == "TrustedProxies(['10.0.0.1/32', 'unix:'])"
    with pytest.raises(ValueError, match="'unix:'"):
        TrustedProxies(["unix"])


# -- what a client writes left of the proxies' hops ------------------------------------------------

untrusted_clients = st.ip_addresses().filter(lambda a: a not in LB)
lb_proxies = st.integers(1, 2**24 - 2).map(lambda n: ip_address(0x0A000000 + n)) | st.integers(
    1, 2**80 - 1
).map(lambda n: ip_address((0x20010DB8FFFF << 80) + n))
no_address = st.sampled_from(["unknown", "_hidden", "", "not-an-ip", "999.1.1.1"])
# Anything at all, and what a spoofer would write: addresses, Forwarded nodes, open quotes.
spoofed = st.lists(
    st.ip_addresses().map(str)
    | st.ip_addresses().map(lambda a: f'for="[{a}]"' if a.version == 6 else f"for={a}")
    | st.sampled_from(['for="', '"', "for=", ";", "unknown"]),
    min_size=1,
    max_size=3,
).map(lambda parts: ", ".join(parts).encode())
client_writing = st.lists(
    spoofed
    | st.binary(max_size=80)
    | st.text(st.characters(max_codepoint=255), max_size=60).map(lambda s: s.encode("latin-1")),
    max_size=3,
)


def _node(hop: IPv4Address | IPv6Address | str, header: ForwardedHeader) -> str:
    """How a proxy writes the hop it saw: an address, or whatever it writes without one."""
    if header == "x-forwarded-for":
        return str(hop)
    if isinstance(hop, str):
        return "proto=https" if hop == "" else f"for={hop}"
    return f'for="[{hop}]"' if hop.version == 6 else f"for={hop}"


def _append(lines: list[bytes], node: str, merge: bool) -> list[bytes]:
    """A proxy appends one hop: merged into one line (nginx), or as a line of its own."""
    if not lines:
        return [node.encode("latin-1")]
    if merge:
        return [b", ".join(lines) + b", " + node.encode("latin-1")]
    return [*lines, node.encode("latin-1")]


LB_AND_UNIX = TrustedProxies(["unix:", "10.0.0.0/8", "2001:db8:ffff::/48"])


@given(
    header=st.sampled_from(["x-forwarded-for", "forwarded"]),
    client=untrusted_clients | no_address,
    proxies=st.lists(lb_proxies, min_size=1, max_size=3),
    merges=st.lists(st.booleans(), min_size=4, max_size=4),
    written=client_writing,
    on_socket=st.booleans(),
)
def test_what_a_client_writes_left_of_the_first_proxy_hop_cannot_change_its_key(
    header: ForwardedHeader,
    client: IPv4Address | IPv6Address | str,
    proxies: list[IPv4Address | IPv6Address],
    merges: list[bool],
    written: list[bytes],
    on_socket: bool,
) -> None:
    # proxies[0] received the request from the client and appended the client's node; each
    # later proxy appended its predecessor; the last one is the peer, or (`on_socket`) it
    # appended too and handed the request on over a trusted unix socket (no peer address).
    hops: list[IPv4Address | IPv6Address | str] = [client, *proxies]
    if not on_socket:
        hops.pop()
    trusted = LB_AND_UNIX if on_socket else LB

    def chain(start: list[bytes]) -> list[tuple[bytes, bytes]]:
        lines = start
        for hop, merge in zip(hops, merges, strict=False):
            lines = _append(lines, _node(hop, header), merge)
        return [(header.encode(), line) for line in lines]

    # A proxy that could not name the client is the client.
    expected = ip_key(proxies[0]) if isinstance(client, str) else ip_key(client)
    peer = None if on_socket else str(proxies[-1])
    assert client_ip(peer, chain([]), trusted, header=header) == expected
    assert client_ip(peer, chain(list(written)), trusted, header=header) == expected
