"""Anomaly rules and their pure evaluation: counts in, findings out, no I/O and no clock.

The stores feed these functions the counts they read (`MemoryStore.write_logs`, and the same
logic in TypeScript in `convex/convex/lib/alerts.ts` for the batch mutation), so a rule decides
alike wherever it runs. Times are epoch milliseconds, as everywhere in the stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from convex_guard.core.errors import ConfigurationError
from convex_guard.core.keys import NO_KEY
from convex_guard.core.limits import HOUR, MINUTE, LimitConfig

AlertKind = Literal["auth_failures", "bot_wave", "error_rate", "limit_exhaustion"]
KINDS: Final = ("auth_failures", "bot_wave", "error_rate", "limit_exhaustion")
#: Kinds whose value is a share (0 to 1) of a total, and whose threshold is one.
SHARES: Final = ("error_rate", "limit_exhaustion")
#: The largest count threshold: a count reads up to threshold + 1 rows in the batch's own
#: transaction, which Convex bounds (16,384 rows read, with the batch's own work).
MAX_COUNT_THRESHOLD: Final = 4000
#: Limits one `limit_exhaustion` rule watches at most (each is read with every batch).
MAX_WATCHED: Final = 20


@dataclass(frozen=True, slots=True)
class WatchedLimit:
    """A limit whose state a `limit_exhaustion` rule reads: `name` (and `key`, for a keyed
    limit's one key, e.g. an API key's id), with the config the guard decides it by."""

    name: str
    config: LimitConfig
    key: str | None = None

    @property
    def subject(self) -> str:
        return f"limit:{self.name}" if self.key is None else f"limit:{self.name}:{self.key}"

    def to_convex(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "config": self.config.to_convex()}
        if self.key is not None:
            out["key"] = self.key
        return out


#: Subjects an evaluation looks at per batch and kind, at most: the reads a batch mutation
#: makes stay bounded however many distinct clients one batch holds.
MAX_SUBJECTS: Final = 50


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One rule: `kind` fires when its value over `window_ms` exceeds `threshold`.

    - `auth_failures`: failed authentications of one key hash, or of one client (its limit
      key: an IPv6 client's network), in the last `window_ms` (sliding); the seed's "more
      than 10 an hour" is the default.
    - `bot_wave`: flagged requests (bot events, any action) of all clients together per
      `window_ms`, counted over whole minutes that have ended, so the evaluation never reads
      the minute the hot path is still writing.
    - `error_rate`: the share of failed requests of one provider over the last `window_ms` of
      whole minutes, judged only with at least `min_requests` requests in it.
    - `limit_exhaustion`: the share of each of `limits` spent now (1 - remaining / capacity),
      read with every batch: limits near exhaustion, until budgets exist. `window_ms` is not
      used by it: each alert's window is its limit's period.

    `cooldown_ms`: after an alert opens, the same (kind, subject) updates it (`count`,
    `last_seen`, `value`) instead of opening another, until `cooldown_ms` after it opened.
    """

    kind: AlertKind
    threshold: float
    window_ms: float
    cooldown_ms: float = HOUR
    min_requests: int = 0
    limits: tuple[WatchedLimit, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigurationError(f"Alert rule kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("threshold", "window_ms", "cooldown_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(f"Alert rule {name} must be a number")
            if not 0 <= value < math.inf:
                raise ConfigurationError(f"Alert rule {name} must be finite and not negative")
        if self.window_ms <= 0:
            raise ConfigurationError("Alert rule window_ms must be positive")
        if self.kind in ("bot_wave", "error_rate") and self.window_ms % MINUTE:
            raise ConfigurationError(f"A {self.kind} rule's window_ms must be whole minutes")
        if self.kind not in SHARES and self.threshold > MAX_COUNT_THRESHOLD:
            raise ConfigurationError(
                f"A {self.kind} threshold is at most {MAX_COUNT_THRESHOLD} (rows read per batch)"
            )
        if self.kind in SHARES and self.threshold >= 1:
            raise ConfigurationError(f"A {self.kind} threshold is a share, below 1 (0.5 = 50%)")
        if isinstance(self.limits, (str, WatchedLimit)) or not all(
            isinstance(w, WatchedLimit) for w in self.limits
        ):
            raise ConfigurationError("Alert rule limits must be a tuple of WatchedLimit")
        if (self.kind == "limit_exhaustion") != bool(self.limits):
            raise ConfigurationError("limits are what a limit_exhaustion rule, and only it, needs")
        if len(self.limits) > MAX_WATCHED:
            raise ConfigurationError(f"A rule watches at most {MAX_WATCHED} limits")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int):
            raise ConfigurationError("Alert rule min_requests must be a whole number")
        if self.min_requests < 0:
            raise ConfigurationError("Alert rule min_requests must not be negative")

    @property
    def read_cap(self) -> int:
        """How many rows a count needs to read at most to decide: `threshold` + 1."""
        return math.floor(self.threshold) + 1

    def to_convex(self) -> dict[str, Any]:
        """The rule as the batch mutation's `alertRules` argument takes it (floats, camelCase)."""
        return {
            "kind": self.kind,
            "threshold": float(self.threshold),
            "windowMs": float(self.window_ms),
            "cooldownMs": float(self.cooldown_ms),
            "minRequests": float(self.min_requests),
            **({"limits": [w.to_convex() for w in self.limits]} if self.limits else {}),
        }


#: The defaults: the seed's auth-failure rule, a bot wave of more than 100 flagged requests in
#: a minute, and a provider failing more than half of at least 20 requests over 5 minutes.
DEFAULT_RULES: Final = (
    AlertRule("auth_failures", threshold=10, window_ms=HOUR, cooldown_ms=HOUR),
    AlertRule("bot_wave", threshold=100, window_ms=MINUTE, cooldown_ms=10 * MINUTE),
    AlertRule(
        "error_rate", threshold=0.5, window_ms=5 * MINUTE, cooldown_ms=15 * MINUTE, min_requests=20
    ),
)


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule that fired: what the store turns into a new alert or an update of an open one."""

    kind: AlertKind
    subject: str
    value: float
    threshold: float
    window_ms: float


def window(rule: AlertRule, now: float) -> tuple[float, float]:
    """The range `[start, end)` a rule counts over at `now`.

    Auth failures: the last `window_ms`, with no end (a row stamped by a client clock a little
    ahead of the store's still counts). Bot
    waves and error rates: whole minutes that have ended, so the rows the hot path and other
    writers are adding to the current minute are never read (on Convex, reading them would
    make every batch conflict with them).
    """
    if rule.kind == "auth_failures":
        return now - rule.window_ms, math.inf
    end = math.floor(now / MINUTE) * MINUTE
    return end - rule.window_ms, end


def key_subject(key_hash: str) -> str | None:
    """The subject of a key's failures; None for requests that presented no key (one shared
    hash, `NO_KEY`, that says nothing about a key: their client's subject covers them)."""
    return None if key_hash == NO_KEY else f"key:{key_hash}"


def client_subject(client_key: str | None) -> str | None:
    """The subject of a client's failures: its limit key (an IPv6 client's network, so one
    hopping addresses inside it is one subject), or its address on rows without a key."""
    return None if not client_key else f"client:{client_key}"


def provider_subject(provider: str) -> str:
    return f"provider:{provider}"


#: A bot wave is about all clients together.
ALL_CLIENTS: Final = "all"


def evaluate(
    rule: AlertRule,
    subject: str,
    count: float,
    total: float | None = None,
    *,
    window_ms: float | None = None,
) -> Finding | None:
    """Whether `rule` fires for `subject`: a `Finding`, or None.

    `count` is the rows counted in `window(rule, now)` (read up to `rule.read_cap`: more
    cannot change the answer); for `error_rate` it is the failed requests and `total` all
    requests, and for `limit_exhaustion` the tokens spent and `total` the capacity: the
    value is then their share. `window_ms`: the finding's window when it is not the rule's
    (a limit's period).
    """
    if rule.kind in SHARES:
        if total is None or total <= 0 or total < rule.min_requests:
            return None
        value = min(max(count, 0) / total, 1.0)
    else:
        value = float(count)
    if not value > rule.threshold:
        return None
    return Finding(rule.kind, subject, value, rule.threshold, window_ms or rule.window_ms)


def spent(config: LimitConfig, remaining: float) -> tuple[float, float]:
    """(tokens spent, capacity) of a limit with `remaining` tokens, for `evaluate`."""
    capacity = float(config.max)
    return min(max(capacity - remaining, 0.0), capacity), capacity


def opens_new(first_seen: float | None, now: float, cooldown_ms: float) -> bool:
    """Whether a finding opens a new alert: none is open for its (kind, subject), or the open
    one opened `cooldown_ms` or longer ago (then a still-running anomaly alerts again)."""
    return first_seen is None or now - first_seen >= cooldown_ms


def rules_by_kind(rules: Sequence[AlertRule]) -> dict[AlertKind, AlertRule]:
    """One rule per kind (the last given wins), as the stores evaluate them."""
    return {rule.kind: rule for rule in rules}
