"""Fingerprint: the client's address (trusted proxies only) and a stable header fingerprint."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope

from convex_guard.core.clientip import (
    UNIX_SOCKET,
    UNKNOWN_CLIENT,
    ForwardedHeader,
    TrustedProxies,
    client_ip,
    peer_keys,
)
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.fingerprint import DEFAULT_FIELDS
from convex_guard.core.headers import header_reader
from convex_guard.core.logs import logger
from convex_guard.middleware.context import GuardContext
from convex_guard.middleware.order import FINGERPRINT
from convex_guard.middleware.steps import StepMiddleware

_UNKNOWN = (UNKNOWN_CLIENT, UNKNOWN_CLIENT)


class FingerprintMiddleware(StepMiddleware):
    """Put `client_ip`, `client_key`, `fingerprint` and `user_agent` into the guard context.

    `X-Forwarded-For` (or `Forwarded`, with `forwarded_header="forwarded"`) is read only when
    the TCP peer is one of `trusted_proxies` (IPs or CIDRs, or `"unix:"` for a proxy on the
    unix socket the server listens on): otherwise a client could pick its own rate-limit key.
    A request with no peer address (a unix socket) and no trusted `"unix:"` is keyed
    `"unknown"`, shared by every such client; the first one logs a warning saying so.

    IPv6 clients are keyed by their `/ipv6_prefix` network, since one subscriber usually holds
    a whole /64: a shorter prefix puts more subscribers in one bucket, and a longer one lets
    each rotate through many (a /48 holds 65,536 /64s, so keying per /64 gives a /48's holder
    that many buckets). The fingerprint is xxh3-64 over `fields` (header names) in a
    canonical form: the same headers in any order or case give the same value.
    """

    marker = FINGERPRINT

    def __init__(
        self,
        app: ASGIApp,
        *,
        trusted_proxies: Iterable[str] = (),
        forwarded_header: ForwardedHeader = "x-forwarded-for",
        ipv6_prefix: int = 64,
        fields: Iterable[str] | None = None,
    ) -> None:
        if forwarded_header not in ("x-forwarded-for", "forwarded"):
            raise ConfigurationError("forwarded_header must be 'x-forwarded-for' or 'forwarded'")
        if not 0 <= ipv6_prefix <= 128:
            raise ConfigurationError("ipv6_prefix must be between 0 and 128")
        try:
            self.trusted = TrustedProxies(trusted_proxies)
        except ValueError as exc:
            raise ConfigurationError(f"trusted_proxies: {exc}") from None
        self._trusting = bool(self.trusted)
        super().__init__(app)
        self.forwarded_header: ForwardedHeader = forwarded_header
        self.ipv6_prefix = ipv6_prefix
        self.fields = (
            DEFAULT_FIELDS
            if fields is None
            else tuple(name.lower().encode("latin-1") for name in fields)
        )
        if not self.fields:
            raise ConfigurationError("fields must name at least one header")
        self._reader = header_reader(self.fields)
        self._warned_no_peer = False

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> None:
        """Fill the context's client fields, fingerprint and headers; never refuses."""
        headers = scope["headers"]
        client = scope.get("client")
        peer = client[0] if client else None
        if self._trusting:
            # Behind a trusted proxy the client is the first untrusted forwarded hop.
            peer = client_ip(
                peer, headers, self.trusted, ipv6_prefix=128, header=self.forwarded_header
            )
        # The address and its limit key, cached per address.
        ctx.client_ip, key = peer_keys(peer, self.ipv6_prefix) if peer else _UNKNOWN
        ctx.client_key = key
        if key == UNKNOWN_CLIENT and not self._warned_no_peer and not (client and client[0]):
            self._warn_no_peer()
        # The one pass over the headers: every step after this one reads it (`request_headers`).
        found = ctx.headers = self._reader.read(headers)
        ctx.fingerprint = found.fingerprint
        ctx.user_agent = found.user_agent

    def _warn_no_peer(self) -> None:
        """Say once that clients without an address share one key: only a request shows it.

        The ASGI server does not tell an app where it listens, so this cannot be known before
        the first request that arrives without `scope["client"]` (a unix socket).
        """
        self._warned_no_peer = True
        if self.trusted.unix:
            logger.warning(
                "convex-guard: a request on the unix socket carried no usable %s: such "
                "requests share the client key %r (one rate limit, one failed-auth count); "
                "make the proxy in front set it",
                self.forwarded_header,
                UNKNOWN_CLIENT,
            )
        else:
            logger.warning(
                "convex-guard: requests arrive without a client address (a unix socket?): "
                "every client shares the key %r (one rate limit, one failed-auth count); "
                "if a proxy in front sets %s, add %r to trusted_proxies",
                UNKNOWN_CLIENT,
                self.forwarded_header,
                UNIX_SOCKET,
            )
