"""The in-process alert book: what `MemoryStore` evaluates with each batch, and its claims.

It keeps only what the rules need (the last `threshold` + 1 failure times per subject, request
and failure counts per provider minute), pruned as windows pass, so memory stays bounded by
the subjects active within one window, and the alerts themselves up to `MAX_ALERTS`.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from convex_guard.core.alerts import (
    ALL_CLIENTS,
    MAX_SUBJECTS,
    AlertKind,
    AlertRule,
    Finding,
    WatchedLimit,
    client_subject,
    evaluate,
    key_subject,
    opens_new,
    provider_subject,
    rules_by_kind,
    spent,
    window,
)
from convex_guard.core.limits import MINUTE
from convex_guard.core.logs import logger
from convex_guard.stores.base import Alert, AlertOutcome, BotEvent, LogBatch

#: Alerts kept at most; the oldest finished (delivered or failed) ones go first.
MAX_ALERTS = 10_000
#: Subjects tracked before a sweep drops those with nothing inside their window.
_SWEEP_AT = 10_000


class AlertBook:
    """Rules, the counts they read, the alerts raised and who holds a delivery claim."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._rules: dict[AlertKind, AlertRule] = {}
        self._failures: dict[str, deque[float]] = {}  # subject -> last failure times
        self._minutes: dict[tuple[str, float], list[int]] = {}  # (provider, minute) -> [n, failed]
        self._alerts: OrderedDict[str, Alert] = OrderedDict()  # in opening order
        self._open: dict[tuple[str, str], str] = {}  # (kind, subject) -> latest alert id
        self._claims: dict[str, tuple[str, float]] = {}  # id -> (owner, lease end)
        self._ids = itertools.count(1)
        #: The limits whose remaining tokens `observe` wants with each batch.
        self.watched: tuple[WatchedLimit, ...] = ()

    def configure(self, rules: Sequence[AlertRule]) -> None:
        self._rules = rules_by_kind(rules)
        limits = self._rules.get("limit_exhaustion")
        self.watched = () if limits is None else limits.limits

    # -- evaluation ------------------------------------------------------------------------
    def observe(
        self,
        batch: LogBatch,
        bot_events: Sequence[BotEvent],
        remaining: Sequence[tuple[WatchedLimit, float]] = (),
    ) -> None:
        """Count the batch's rows and raise or update an alert for every rule that fires.

        `bot_events` is the store's whole event history in timestamp order (bot waves count
        every flagged request, those `check` recorded too); `remaining`, the tokens left now
        in each of `watched`.
        """
        if not self._rules:
            return
        now = self._clock()
        findings: list[Finding] = []
        auth = self._rules.get("auth_failures")
        if auth is not None and batch.auth_failures:
            start, _ = window(auth, now)
            touched: dict[str, None] = {}
            for row in batch.auth_failures:
                client = client_subject(row.client_key or row.ip)
                for subject in (key_subject(row.key_hash), client):
                    if subject is None:
                        continue
                    times = self._failures.get(subject)
                    if times is None:
                        times = self._failures[subject] = deque(maxlen=auth.read_cap)
                    times.append(row.timestamp)
                    touched[subject] = None
            for subject in itertools.islice(touched, MAX_SUBJECTS):
                count = sum(1 for t in self._failures[subject] if t >= start)
                found = evaluate(auth, subject, count)
                if found is not None:
                    findings.append(found)
            if len(self._failures) > _SWEEP_AT:
                self._failures = {s: t for s, t in self._failures.items() if max(t) >= start}
        errors = self._rules.get("error_rate")
        if errors is not None and batch.ai_requests:
            providers: dict[str, None] = {}
            for log in batch.ai_requests:
                minute = log.timestamp // MINUTE * MINUTE
                sums = self._minutes.setdefault((log.provider, minute), [0, 0])
                sums[0] += 1
                sums[1] += 0 if log.success else 1
                providers[log.provider] = None
            start, end = window(errors, now)
            for provider in itertools.islice(providers, MAX_SUBJECTS):
                total = failed = 0
                for (name, minute), (n, bad) in self._minutes.items():
                    if name == provider and start <= minute < end:
                        total += n
                        failed += bad
                found = evaluate(errors, provider_subject(provider), failed, total)
                if found is not None:
                    findings.append(found)
            self._minutes = {k: v for k, v in self._minutes.items() if k[1] >= start}
        wave = self._rules.get("bot_wave")
        if wave is not None:
            start, end = window(wave, now)
            lo = bisect.bisect_left(bot_events, start, key=lambda e: e.timestamp)
            hi = bisect.bisect_left(bot_events, end, key=lambda e: e.timestamp)
            found = evaluate(wave, ALL_CLIENTS, min(hi - lo, wave.read_cap))
            if found is not None:
                findings.append(found)
        exhaustion = self._rules.get("limit_exhaustion")
        if exhaustion is not None:
            for watched, left in remaining:
                used, capacity = spent(watched.config, left)
                found = evaluate(
                    exhaustion, watched.subject, used, capacity, window_ms=watched.config.period
                )
                if found is not None:
                    findings.append(found)
        for finding in findings:
            self._raise(finding, now)

    def _raise(self, finding: Finding, now: float) -> None:
        rule = self._rules[finding.kind]
        which = (finding.kind, finding.subject)
        open_id = self._open.get(which)
        current = self._alerts.get(open_id) if open_id is not None else None
        if current is not None and not opens_new(current.first_seen, now, rule.cooldown_ms):
            self._alerts[current.id] = replace(
                current, value=finding.value, last_seen=now, count=current.count + 1
            )
            return
        alert_id = f"alert-{next(self._ids)}"
        self._alerts[alert_id] = Alert(
            id=alert_id,
            kind=finding.kind,
            subject=finding.subject,
            value=finding.value,
            threshold=finding.threshold,
            window_ms=finding.window_ms,
            first_seen=now,
            last_seen=now,
            count=1,
            status="pending",
            attempts=0,
        )
        self._open[which] = alert_id
        if len(self._alerts) > MAX_ALERTS:
            self._forget_one()

    def _forget_one(self) -> None:
        victim = next(
            (a for a in self._alerts.values() if a.status != "pending"),
            next(iter(self._alerts.values())),
        )
        if victim.status == "pending":
            # Every kept alert is pending (no deliverer keeps up): one is lost, and said so.
            logger.error(
                "Alert book full (%d): dropped the oldest pending alert, %s on %s",
                MAX_ALERTS,
                victim.kind,
                victim.subject,
            )
        del self._alerts[victim.id]
        self._claims.pop(victim.id, None)
        if self._open.get((victim.kind, victim.subject)) == victim.id:
            del self._open[(victim.kind, victim.subject)]

    # -- reading and claiming ----------------------------------------------------------------
    def recent(self, since: float, limit: int) -> list[Alert]:
        found = sorted(
            (a for a in self._alerts.values() if a.last_seen >= since),
            key=lambda a: a.last_seen,
            reverse=True,
        )
        return found[: max(limit, 0)]

    def pending(self, limit: int) -> list[Alert]:
        now = self._clock()
        out: list[Alert] = []
        for alert in self._alerts.values():
            if len(out) >= limit:
                break
            claim = self._claims.get(alert.id)
            if alert.status == "pending" and (claim is None or claim[1] <= now):
                out.append(alert)
        return out

    def claim(self, alert_id: str, owner: str, lease_ms: float) -> bool:
        alert = self._alerts.get(alert_id)
        now = self._clock()
        if alert is None or alert.status != "pending":
            return False
        claim = self._claims.get(alert_id)
        if claim is not None and claim[1] > now:
            return False
        self._claims[alert_id] = (owner, now + lease_ms)
        self._alerts[alert_id] = replace(alert, attempts=alert.attempts + 1)
        return True

    def mark(self, alert_id: str, owner: str, outcome: AlertOutcome) -> bool:
        alert = self._alerts.get(alert_id)
        claim = self._claims.get(alert_id)
        if alert is None or claim is None or claim[0] != owner:
            return False
        del self._claims[alert_id]
        if outcome != "retry":
            self._alerts[alert_id] = replace(alert, status=outcome)
        return True
