"""API keys as text: generating, hashing and checking the form of a key (sans-IO).

Only the SHA-256 hash of a key is ever stored or logged; the raw key exists once, when it is
generated, and is compared by its hash from then on.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final, Literal

ApiKeyKind = Literal["ai", "embedding"]

#: Recorded as the `key_hash` of an auth failure or an embedding log when no key was presented.
#: Not a hex digest, so it can never collide with a real key's hash.
NO_KEY: Final = "no-key"

#: Keys look like `cg_ai_<43 base62 chars>`: the prefix makes a leaked key recognisable to
#: secret scanners and to people, and tells the kinds apart at a glance.
KEY_PREFIXES: Final[dict[ApiKeyKind, str]] = {"ai": "cg_ai_", "embedding": "cg_emb_"}
KEY_BYTES: Final = 32  # 256 bits from `secrets`
#: Enough of the key to tell keys apart in a listing (4 chars ≈ 24 of its 256 bits).
DISPLAY_CHARS: Final = 4
#: A presented key longer than this is refused before hashing or any store lookup.
MAX_KEY_LENGTH: Final = 256

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_CHARS = 43  # ceil(256 / log2(62))
#: What a presented key may be made of (RFC 6750 b64token); anything else is refused unhashed.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def generate_key(kind: ApiKeyKind = "ai") -> str:
    """A new raw key: the kind's prefix and 256 random bits in base62."""
    number = int.from_bytes(secrets.token_bytes(KEY_BYTES), "big")
    chars = []
    for _ in range(_BODY_CHARS):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return KEY_PREFIXES[kind] + "".join(chars)


def hash_key(raw: str | bytes) -> str:
    """The SHA-256 hex digest stored in place of the key.

    A plain fast hash is right here (unlike passwords): the key carries 256 random bits, so
    there is nothing to brute-force, and the hash must be cheap enough for every request.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    return hashlib.sha256(data).hexdigest()


def display_prefix(raw: str) -> str:
    """The part of a key safe to show in listings: its kind prefix and a few characters."""
    for prefix in KEY_PREFIXES.values():
        if raw.startswith(prefix):
            return raw[: len(prefix) + DISPLAY_CHARS]
    return raw[:DISPLAY_CHARS]


def is_well_formed(raw: str) -> bool:
    """Whether a presented key is worth a lookup: bounded length and token characters only."""
    return 0 < len(raw) <= MAX_KEY_LENGTH and _TOKEN.fullmatch(raw) is not None
