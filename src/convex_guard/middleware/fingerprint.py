"""Fingerprint: the client's address (trusted proxies only) and a stable header fingerprint."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .._clientip import (
    UNKNOWN_CLIENT,
    ForwardedHeader,
    TrustedProxies,
    client_ip,
    peer_keys,
)
from .._context import GuardContext, guard_context
from .._errors import ConfigurationError
from .._fingerprint import DEFAULT_FIELDS, fingerprint
from .._headers import header_value
from .._order import FINGERPRINT, mark

_UNKNOWN = (UNKNOWN_CLIENT, UNKNOWN_CLIENT)


class FingerprintMiddleware:
    """Put `client_ip`, `client_key`, `fingerprint` and `user_agent` into the guard context.

    `X-Forwarded-For` (or `Forwarded`, with `forwarded_header="forwarded"`) is read only when
    the TCP peer is one of `trusted_proxies` (IPs or CIDRs): otherwise a client could pick its
    own rate-limit key. IPv6 clients are keyed by their `/ipv6_prefix` network, since one
    subscriber usually holds a whole /64. The fingerprint is xxh3-64 over `fields` (header
    names) in a canonical form: the same headers in any order or case give the same value.
    """

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
        self.app = app
        self.forwarded_header: ForwardedHeader = forwarded_header
        self.ipv6_prefix = ipv6_prefix
        self.fields = (
            DEFAULT_FIELDS
            if fields is None
            else tuple(name.lower().encode("latin-1") for name in fields)
        )
        if not self.fields:
            raise ConfigurationError("fields must name at least one header")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # a WebSocket handshake is identified too
            if kind == "lifespan":
                mark(scope, FINGERPRINT)
            await self.app(scope, receive, send)
            return
        self.identify(scope, guard_context(scope))
        await self.app(scope, receive, send)

    def identify(self, scope: Scope, ctx: GuardContext) -> None:
        """Fill the context's client fields and fingerprint (`GuardMiddleware` calls it too)."""
        headers = scope["headers"]
        client = scope.get("client")
        peer = client[0] if client else None
        if self._trusting:
            # Behind a trusted proxy the client is the first untrusted forwarded hop.
            peer = client_ip(
                peer, headers, self.trusted, ipv6_prefix=128, header=self.forwarded_header
            )
        # The address and its limit key, cached per address.
        ctx.client_ip, ctx.client_key = peer_keys(peer, self.ipv6_prefix) if peer else _UNKNOWN
        ctx.fingerprint = fingerprint(headers, self.fields)
        ctx.user_agent = header_value(headers, b"user-agent") or ""
