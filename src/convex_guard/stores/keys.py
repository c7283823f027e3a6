"""API keys over a store: create, list, revoke, rotate and verify (the key text is `core.keys`).

Only the SHA-256 hash of a key is ever stored or logged; the raw key exists once, in the
`CreatedKey` handed back by `ApiKeys.create` / `ApiKeys.rotate`, whose repr hides it.

Every change goes to the store's audit trail (`AuditStore`) with the actor who made it, in
the same store call as the change.
"""

from __future__ import annotations

import builtins
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

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
    UNKNOWN_ACTOR,
    ApiKeyRecord,
    AuditStore,
    KeyQuota,
    KeyRateLimit,
    KeyStore,
    NewApiKey,
    check_actor,
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

    Each change is recorded in the store's audit trail, so the store must be an `AuditStore`
    (checked here, at construction); `actor` names who makes the changes (each call may name
    another), `UNKNOWN_ACTOR` when nobody is named. `audit=False` takes a plain `KeyStore`
    and records nothing: for a store of your own that keeps no trail, knowingly.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Clock | None = None,
        lifetime: float | None = DEFAULT_LIFETIME_MS,
        grace: float = DEFAULT_GRACE_MS,
        actor: str = UNKNOWN_ACTOR,
        audit: bool = True,
    ) -> None:
        if lifetime is not None and not 0 < lifetime < float("inf"):
            raise ConfigurationError("lifetime must be a positive number of ms, or None")
        if not 0 <= grace < float("inf"):
            raise ConfigurationError("grace must be a non-negative number of ms")
        if audit:
            require(
                store,
                {KeyStore: "", AuditStore: "the audit trail (off with audit=False)"},
                "ApiKeys",
            )
        else:
            require(store, (KeyStore,), "ApiKeys")
        self.store = store
        self.actor = check_actor(actor)
        self.audit = audit
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
        actor: str | None = None,
    ) -> CreatedKey:
        return await self._create(
            name,
            kind=kind,
            owner=owner,
            scopes=scopes,
            rate_limit=rate_limit,
            lifetime=lifetime,
            quotas=quotas,
            audit=self._audit(actor),
        )

    def _audit(self, actor: str | None, **more: Any) -> dict[str, Any]:
        """The audit arguments of a store write: none without a trail, else who (checked now,
        before anything is written) and what."""
        if not self.audit:
            return {}
        return {"actor": self.actor if actor is None else check_actor(actor), **more}

    async def _create(
        self,
        name: str,
        *,
        kind: ApiKeyKind,
        owner: str | None,
        scopes: Iterable[str],
        rate_limit: KeyRateLimit | None,
        lifetime: float | Literal["default"] | None,
        quotas: Iterable[KeyQuota],
        audit: dict[str, Any],
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
            ),
            **audit,
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

    async def revoke(self, key_id: str, *, actor: str | None = None) -> ApiKeyRecord:
        """Deactivate a key at once (middlewares notice within their cache time)."""
        record = await self.store.update_api_key(
            key_id, active=False, **self._audit(actor, action="key.revoked")
        )
        if record is None:
            raise KeyNotFoundError(f"No API key with id {key_id!r}")
        return record

    async def rotate(
        self, key_id: str, *, grace: float | None = None, actor: str | None = None
    ) -> CreatedKey:
        """A new key like the old one; the old one expires after `grace` ms (default: 24 h).

        The grace period lets deployed clients switch over; an old key that would expire
        sooner anyway keeps its earlier expiry. Two changes, two entries: the new key's
        `key.created` and the old key's `key.rotated` (its `expires_at`, unless it was
        already sooner), each naming the other key as `related`.
        """
        grace = self.grace if grace is None else grace
        if not 0 <= grace < float("inf"):
            raise ConfigurationError("grace must be a non-negative number of ms")
        self._audit(actor)  # a bad actor is refused before the new key exists
        old = await self.get(key_id)
        if not old.active:
            raise KeyRevokedError(f"Key {key_id!r} is revoked; create a new key instead")
        created = await self._create(
            old.name,
            kind=old.kind,
            owner=old.owner,
            scopes=old.scopes,
            rate_limit=old.rate_limit,
            lifetime="default",
            quotas=old.quotas,
            audit=self._audit(actor, related=key_id),
        )
        until = self.clock() + grace
        expires = until if old.expires_at is None or old.expires_at > until else None
        if self.audit:
            # Recorded even when the expiry stays: who rotated the key, and into which.
            await self.store.update_api_key(
                key_id,
                expires_at=expires,
                **self._audit(actor, action="key.rotated", related=created.record.id),
            )
        elif expires is not None:
            await self.store.update_api_key(key_id, expires_at=expires)
        return created

    async def verify(self, raw: str, *, kind: ApiKeyKind | None = None) -> Verification:
        if not is_well_formed(raw):
            return Verification("unknown", None)
        record = await self.store.find_api_key(hash_key(raw))
        return Verification(key_status(record, self.clock(), kind), record)
