"""Web Bot Auth (sans-IO): RFC 9421 HTTP Message Signatures from signed agents.

A signed agent sends `Signature-Agent` (the origin of its key directory), `Signature-Input`
and `Signature`; the signature tagged `web-bot-auth` covers `@authority` and
`signature-agent`, names its key by `keyid` (the key's JWK thumbprint, RFC 7638), and has
`created` and `expires`. The keys are the Ed25519 JWKs of the agent's
`/.well-known/http-message-signatures-directory`. Fetching that directory is the caller's
(`middleware/botverify.py`); here: what a request claims (`signature_claim`), the directory's
URL and its keys (`parse_directory`), and the verification itself, done by the
`http-message-signatures` library (its RFC 9421 signature base, parameter and time checks),
with our profile on top (tag, covered components, directory origin).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver, algorithms
from http_message_signatures.exceptions import HTTPMessageSignaturesException

__all__ = [
    "DIRECTORY_PATH",
    "TAG",
    "MalformedSignature",
    "SignatureClaim",
    "SignatureResult",
    "jwk_thumbprint",
    "parse_directory",
    "signature_claim",
    "verify_signature",
]

TAG: Final = "web-bot-auth"
DIRECTORY_PATH: Final = "/.well-known/http-message-signatures-directory"
#: Longest signature header we parse: a real one is a few hundred bytes.
MAX_HEADER: Final = 4096
#: A signature older than this is refused even before its `expires` (the drafts advise
#: minutes; a day is the library's default and far too long for a replayable header).
MAX_AGE: Final = datetime.timedelta(minutes=10)


class MalformedSignature(ValueError):
    """A `web-bot-auth` signature that cannot be read: the request is `spoofed`."""


@dataclass(frozen=True, slots=True)
class SignatureClaim:
    """What a request's `web-bot-auth` signature claims, before any key is known.

    ``agent`` is the `Signature-Agent` origin (`https://agent.example`), ``directory`` its
    key directory's URL, ``label`` the signature's label, ``keyid`` the key it names.
    """

    agent: str
    directory: str
    label: str
    keyid: str


@dataclass(frozen=True, slots=True)
class SignatureResult:
    valid: bool
    reason: str


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    values = [v for k, v in headers if k == name]
    if not values:
        return None
    joined = b", ".join(values)
    if len(joined) > MAX_HEADER:
        raise MalformedSignature(f"{name.decode()} is longer than {MAX_HEADER} bytes")
    return joined.decode("latin-1")


def signature_claim(headers: Iterable[tuple[bytes, bytes]]) -> SignatureClaim | None:
    """The request's `web-bot-auth` claim; None when it has no signature with that tag (a
    signature for another purpose, or none: nothing is claimed). Raises
    `MalformedSignature` when the headers mention `web-bot-auth` but cannot be read."""
    headers = list(headers)
    raw_input = _header(headers, b"signature-input")
    if raw_input is None or TAG not in raw_input:
        return None
    try:
        inputs: Any = http_sf.parse(raw_input.encode("latin-1"), tltype="dictionary")
    except Exception:
        raise MalformedSignature("Signature-Input is not a structured dictionary") from None
    assert isinstance(inputs, dict)
    label: str | None = None
    components: list[Any] | None = None
    params: dict[str, Any] | None = None
    for name, (members, member_params) in inputs.items():
        if isinstance(members, list) and member_params.get("tag") == TAG:
            label, components, params = name, members, member_params
            break
    if label is None or components is None or params is None:
        raise MalformedSignature("no Signature-Input member is tagged web-bot-auth")
    keyid = params.get("keyid")
    if not isinstance(keyid, str) or not keyid:
        raise MalformedSignature("the web-bot-auth signature names no keyid")
    if not isinstance(params.get("created"), int) or not isinstance(params.get("expires"), int):
        raise MalformedSignature("the web-bot-auth signature lacks created or expires")
    covered = {c[0]: c[1] for c in components if isinstance(c, tuple)}
    if "@authority" not in covered:
        raise MalformedSignature("the web-bot-auth signature does not cover @authority")
    if "signature-agent" not in covered:
        raise MalformedSignature("the web-bot-auth signature does not cover signature-agent")
    raw_agent = _header(headers, b"signature-agent")
    if raw_agent is None:
        raise MalformedSignature("a web-bot-auth signature without a Signature-Agent header")
    key = covered["signature-agent"].get("key")
    try:
        if isinstance(key, str):  # the dictionary form: `Signature-Agent: sig1="https://…"`
            agents: Any = http_sf.parse(raw_agent.encode("latin-1"), tltype="dictionary")
            assert isinstance(agents, dict)
            agent = agents[key][0] if key in agents else None
        else:  # the first drafts' form: one string
            item: Any = http_sf.parse(raw_agent.encode("latin-1"), tltype="item")
            agent = item[0]
    except Exception:
        raise MalformedSignature("Signature-Agent is not a structured field string") from None
    if not isinstance(agent, str):
        raise MalformedSignature("Signature-Agent names no agent for this signature")
    return SignatureClaim(
        agent=agent, directory=directory_url(agent), label=str(label), keyid=keyid
    )


def directory_url(agent: str) -> str:
    """The key directory of `agent` (an origin; a path in it is ignored). Raises
    `MalformedSignature` for anything but an http(s) URL with a host."""
    try:
        parts = urlsplit(agent)
        port = parts.port
    except ValueError:
        raise MalformedSignature("Signature-Agent is not a URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username:
        raise MalformedSignature("Signature-Agent is not an http(s) origin")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{DIRECTORY_PATH}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an OKP key: what `keyid` names."""
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def parse_directory(body: bytes) -> dict[str, Ed25519PublicKey]:
    """A key directory (a JWKS) → its Ed25519 keys by thumbprint; other keys are skipped.
    Raises ValueError when it is not a JWKS."""
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS: no 'keys' list")
    keys: dict[str, Ed25519PublicKey] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        x = jwk.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys[jwk_thumbprint(jwk)] = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            continue
    return keys


class _Fields:
    """The request's header fields as the library reads them (read-only, in order)."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._items = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]

    def items(self) -> list[tuple[str, str]]:
        return self._items

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self._items))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(k.lower() == name.lower() for k, _ in self._items)


@dataclass
class _Message:
    method: str
    url: str
    headers: _Fields


class _Keys(HTTPSignatureKeyResolver):
    def __init__(self, keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.keys = keys

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self.keys.get(key_id)


def verify_signature(
    claim: SignatureClaim,
    keys: Mapping[str, Ed25519PublicKey],
    *,
    method: str,
    url: str,
    headers: Iterable[tuple[bytes, bytes]],
    max_age: datetime.timedelta = MAX_AGE,
) -> SignatureResult:
    """Verify the request's `web-bot-auth` signature with the agent's `keys`.

    `url` is the request's absolute URL as the client sent it (scheme, the Host header,
    the raw path and query): `@authority` and `@target-uri` are taken from it.
    """
    if claim.keyid not in keys:
        return SignatureResult(False, f"keyid {claim.keyid} is not in {claim.directory}")
    message = _Message(method.upper(), url, _Fields(list(headers)))
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=_Keys(keys))
    try:
        verifier.verify(message, max_age=max_age, expect_tag=TAG, expect_label=claim.label)
    except HTTPMessageSignaturesException as exc:
        return SignatureResult(False, f"keyid {claim.keyid}: {exc}")
    except Exception as exc:  # a malformed component the library did not wrap
        return SignatureResult(False, f"keyid {claim.keyid}: {type(exc).__name__}")
    return SignatureResult(True, f"keyid {claim.keyid} valid ({claim.agent})")
