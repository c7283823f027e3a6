"""API keys: generation and hashing (sans-IO), and a small service over the store.

Only the SHA-256 hash of a key is ever stored or logged; the raw key exists once, in the
`CreatedKey` handed back by `ApiKeys.create` / `ApiKeys.rotate`, whose repr hides it.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from ._errors import ConfigurationError, GuardError
from ._limits import DAY
from ._store import ApiKeyKind, ApiKeyRecord, KeyRateLimit, NewApiKey, Store

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

DEFAULT_LIFETIME_MS: Final = 30 * DAY  # the seed's default
DEFAULT_GRACE_MS: Final = 1 * DAY

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_CHARS = 43  # ceil(256 / log2(62))
#: What a presented key may be made of (RFC 6750 b64token); anything else is refused unhashed.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

Clock = Callable[[], float]
KeyStatus = Literal["valid", "unknown", "revoked", "expired", "wrong_kind"]


def _wall_clock_ms() -> float:
    return time.time() * 1000.0


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


def key_status(record: ApiKeyRecord | None, now: float, kind: ApiKeyKind | None) -> KeyStatus:
    """Why a looked-up key may (not) be used at `now` (epoch ms); the whole policy in one place."""
    if record is None:
        return "unknown"
    if not record.active:
        return "revoked"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    if kind is not None and record.kind != kind:
        return "wrong_kind"
    return "valid"


def check_rate_limit(limit: KeyRateLimit | None) -> KeyRateLimit | None:
    if limit is not None and not (limit.requests >= 1 and 0 < limit.period < float("inf")):
        raise ConfigurationError(
            "A key's rate limit needs requests >= 1 and a positive, finite period (ms)"
        )
    return limit


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A key just created: the stored record, and the raw key, shown this once only.

    The raw key is left out of the repr, so logging or printing this object cannot leak it.
    """

    record: ApiKeyRecord
    key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Verification:
    status: KeyStatus
    record: ApiKeyRecord | None

    @property
    def ok(self) -> bool:
        return self.status == "valid"


class KeyNotFoundError(GuardError, LookupError):
    """No key has this id; list the keys to find the right one."""


class KeyRevokedError(GuardError):
    """The key is revoked, so it cannot be rotated; create a new key instead."""


class ApiKeys:
    """Create, list, revoke, rotate and verify keys over any `Store`.

    `clock()` returns epoch milliseconds (injectable for tests). `lifetime` is how long a new
    key lives (ms, `None` for no expiry); `grace` is how long a rotated key keeps working.
    """

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        lifetime: float | None = DEFAULT_LIFETIME_MS,
        grace: float = DEFAULT_GRACE_MS,
    ) -> None:
        if lifetime is not None and not 0 < lifetime < float("inf"):
            raise ConfigurationError("lifetime must be a positive number of ms, or None")
        if not 0 <= grace < float("inf"):
            raise ConfigurationError("grace must be a non-negative number of ms")
        self.store = store
        self.clock: Clock = clock or _wall_clock_ms
        self.lifetime = lifetime
        self.grace = grace

    async def create(
        self,
        name: str,
        *,
        kind: ApiKeyKind = "ai",
        owner: str | None = None,
        scopes: Iterable[str] = (),
        rate_limit: KeyRateLimit | None = None,
        lifetime: float | Literal["default"] | None = "default",
    ) -> CreatedKey:
        if not name.strip():
            raise ConfigurationError("A key needs a non-empty name")
        if kind not in KEY_PREFIXES:
            raise ConfigurationError(f"kind must be one of {sorted(KEY_PREFIXES)}")
        check_rate_limit(rate_limit)
        life = self.lifetime if lifetime == "default" else lifetime
        if life is not None and not 0 < life < float("inf"):
            raise ConfigurationError("lifetime must be a positive number of ms, or None")
        now = self.clock()
        raw = generate_key(kind)
        record = await self.store.create_api_key(
            NewApiKey(
                kind=kind,
                key_hash=hash_key(raw),
                prefix=display_prefix(raw),
                name=name,
                owner=owner,
                scopes=tuple(dict.fromkeys(scopes)),
                rate_limit=rate_limit,
                created_at=now,
                expires_at=None if life is None else now + life,
            )
        )
        return CreatedKey(record, raw)

    async def list(
        self, *, kind: ApiKeyKind | None = None, owner: str | None = None
    ) -> builtins.list[ApiKeyRecord]:
        return await self.store.list_api_keys(kind=kind, owner=owner)

    async def get(self, key_id: str) -> ApiKeyRecord:
        for record in await self.store.list_api_keys():
            if record.id == key_id:
                return record
        raise KeyNotFoundError(f"No API key with id {key_id!r}")

    async def revoke(self, key_id: str) -> ApiKeyRecord:
        """Deactivate a key at once (middlewares notice within their cache time)."""
        record = await self.store.update_api_key(key_id, active=False)
        if record is None:
            raise KeyNotFoundError(f"No API key with id {key_id!r}")
        return record

    async def rotate(self, key_id: str, *, grace: float | None = None) -> CreatedKey:
        """A new key like the old one; the old one expires after `grace` ms (default: 24 h).

        The grace period lets deployed clients switch over; an old key that would expire
        sooner anyway keeps its earlier expiry.
        """
        grace = self.grace if grace is None else grace
        if not 0 <= grace < float("inf"):
            raise ConfigurationError("grace must be a non-negative number of ms")
        old = await self.get(key_id)
        if not old.active:
            raise KeyRevokedError(f"Key {key_id!r} is revoked; create a new key instead")
        created = await self.create(
            old.name,
            kind=old.kind,
            owner=old.owner,
            scopes=old.scopes,
            rate_limit=old.rate_limit,
        )
        until = self.clock() + grace
        if old.expires_at is None or old.expires_at > until:
            await self.store.update_api_key(key_id, expires_at=until)
        return created

    async def verify(self, raw: str, *, kind: ApiKeyKind | None = None) -> Verification:
        if not is_well_formed(raw):
            return Verification("unknown", None)
        record = await self.store.find_api_key(hash_key(raw))
        return Verification(key_status(record, self.clock(), kind), record)
