"""API keys over a store: create, list, revoke, rotate and verify (the key text is `core.keys`).

Only the SHA-256 hash of a key is ever stored or logged; the raw key exists once, in the
`CreatedKey` handed back by `ApiKeys.create` / `ApiKeys.rotate`, whose repr hides it.
"""

from __future__ import annotations

import builtins
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from convex_guard.core.errors import ConfigurationError, GuardError
from convex_guard.core.keys import (
    KEY_PREFIXES,
    ApiKeyKind,
    display_prefix,
    generate_key,
    hash_key,
    is_well_formed,
)
from convex_guard.core.limits import DAY, SECOND
from convex_guard.stores.base import (
    ApiKeyRecord,
    KeyQuota,
    KeyRateLimit,
    KeyStore,
    NewApiKey,
    require,
)

DEFAULT_LIFETIME_MS: Final = 30 * DAY  # the seed's default
DEFAULT_GRACE_MS: Final = 1 * DAY

Clock = Callable[[], float]
KeyStatus = Literal["valid", "unknown", "revoked", "expired", "wrong_kind"]


def _wall_clock_ms() -> float:
    return time.time() * 1000.0


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


def check_quotas(quotas: Iterable[KeyQuota]) -> tuple[KeyQuota, ...]:
    """A key's tier as given, or `ConfigurationError`: one quota per unit, each a positive
    finite amount per a period of at least a second (milliseconds, as every period)."""
    tier = tuple(quotas)
    for quota in tier:
        if not isinstance(quota, KeyQuota) or quota.unit not in ("tokens", "cost"):
            raise ConfigurationError("quotas must be KeyQuota('tokens' | 'cost', amount, period)")
        if not 0 < quota.amount < math.inf:
            raise ConfigurationError(f"{quota.unit} quota: amount must be a positive number")
        if not SECOND <= quota.period < math.inf:
            raise ConfigurationError(f"{quota.unit} quota: period is ms, at least 1000")
    units = [quota.unit for quota in tier]
    if len(set(units)) != len(units):
        raise ConfigurationError("a key holds at most one quota per unit")
    # Floats, as Convex keeps every number: a record reads back the same from either store.
    return tuple(KeyQuota(q.unit, float(q.amount), float(q.period)) for q in tier)


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
    """Create, list, revoke, rotate and verify keys over any `KeyStore`.

    `clock()` returns epoch milliseconds (injectable for tests). `lifetime` is how long a new
    key lives (ms, `None` for no expiry); `grace` is how long a rotated key keeps working.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Clock | None = None,
        lifetime: float | None = DEFAULT_LIFETIME_MS,
        grace: float = DEFAULT_GRACE_MS,
    ) -> None:
        if lifetime is not None and not 0 < lifetime < float("inf"):
            raise ConfigurationError("lifetime must be a positive number of ms, or None")
        if not 0 <= grace < float("inf"):
            raise ConfigurationError("grace must be a non-negative number of ms")
        require(store, (KeyStore,), "ApiKeys")
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
        quotas: Iterable[KeyQuota] = (),
    ) -> CreatedKey:
        if not name.strip():
            raise ConfigurationError("A key needs a non-empty name")
        if kind not in KEY_PREFIXES:
            raise ConfigurationError(f"kind must be one of {sorted(KEY_PREFIXES)}")
        check_rate_limit(rate_limit)
        tier = check_quotas(quotas)
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
                quotas=tier,
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
            quotas=old.quotas,
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
