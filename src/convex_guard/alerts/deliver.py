"""Alert delivery: to Python logging and an optional webhook, each alert by one instance.

The deliverer polls its store for pending alerts, claims each one (on Convex a mutation that
succeeds for one caller), logs it and posts it, on tasks of its own: a request never waits
for a webhook. Every alert ends delivered or, after its attempts, failed, and both are
counted and logged: none is lost silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from convex_guard.core.alerts import DEFAULT_RULES, AlertRule
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.logs import ThrottledLog, logger
from convex_guard.core.settings import redact_url
from convex_guard.stores.base import Alert, AlertOutcome, AlertStore, require

DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_QUEUE_SIZE = 100
#: Added to the time one delivery can take, so a slow but live claimer keeps its lease.
_LEASE_MARGIN = 5.0
#: Seconds `close()` spends handing claimed alerts back, at most.
_CLOSE_TIMEOUT = 5.0


def alert_body(alert: Alert) -> dict[str, Any]:
    """The webhook's JSON body: the alert's own fields, nothing of the store or its keys."""
    return {
        "source": "convex-guard",
        "id": alert.id,
        "kind": alert.kind,
        "subject": alert.subject,
        "value": alert.value,
        "threshold": alert.threshold,
        "windowMs": alert.window_ms,
        "firstSeen": alert.first_seen,
        "lastSeen": alert.last_seen,
        "count": alert.count,
    }


def describe(alert: Alert) -> str:
    return (
        f"{alert.kind} on {alert.subject}: {alert.value:g} > {alert.threshold:g} "
        f"over {alert.window_ms / 1000:g} s"
    )


@dataclass(frozen=True)
class AlertSettings:
    """What `GuardSettings(alerts=…)` takes: the rules and where their alerts go.

    - `rules`: evaluated by the store with every log batch (default `DEFAULT_RULES`).
    - `webhook_url`: POSTed each alert as JSON (`alert_body`); None: logging only. Shown
      redacted wherever it is printed.
    - `timeout`: seconds per post; `retries` posts more after a failure (a connection error,
      a timeout or a non-2xx answer), `backoff` seconds before the first, doubling.
    - `max_attempts`: claims (rounds of posts) before an alert is marked failed; a round that
      fails hands the alert back for any instance to claim.
    - `poll_interval`: seconds between looks for new alerts; `queue_size`: alerts claimed and
      waiting to be sent, at most (past it they stay pending in the store, counted `dropped`).
    """

    rules: Sequence[AlertRule] = DEFAULT_RULES
    webhook_url: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    poll_interval: float = DEFAULT_POLL_INTERVAL
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.rules, AlertRule):
            raise ConfigurationError("alert rules must be a list of AlertRule, not one rule")
        for rule in self.rules:
            if not isinstance(rule, AlertRule):
                raise ConfigurationError(f"alert rules must be AlertRule, got {type(rule)}")
        url = self.webhook_url
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"webhook_url must start with http:// or https://, got {redact_url(url)!r}"
            )
        for name in ("timeout", "poll_interval"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigurationError(f"alert {name} must be a positive number of seconds")
        if not 0 <= self.backoff < float("inf"):
            raise ConfigurationError("alert backoff must be a number of seconds, not negative")
        for name, least in (("retries", 0), ("max_attempts", 1), ("queue_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigurationError(f"alert {name} must be a whole number >= {least}")

    def attach(self, store: object) -> AlertDeliverer:
        """Configure `store`'s rules and return the deliverer over it (not started yet)."""
        require(store, {AlertStore: "alerts (off with alerts=None)"}, "GuardMiddleware")
        assert isinstance(store, AlertStore)
        store.configure_alerts(tuple(self.rules))
        return AlertDeliverer(store, self)


class AlertDeliverer:
    """Claims pending alerts from its store and delivers them, on two tasks of its own.

    `sent`: alerts delivered (logged, and posted when there is a webhook); `failed`: alerts
    given up after `max_attempts`; `retried`: rounds of posts that failed and handed the alert
    back; `dropped`: pending alerts left in the store for a later poll because the queue was
    full. `start()` and `close()` come from the log writer's (the ASGI lifespan's).
    """

    def __init__(
        self,
        store: AlertStore,
        settings: AlertSettings,
        *,
        owner: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        #: This process's name in claims: another instance's claim is never ended by it.
        self.owner = owner or secrets.token_hex(8)
        s = settings
        posting = s.timeout * (s.retries + 1) + s.backoff * (2 ** (s.retries + 1))
        self.lease_ms = (posting + _LEASE_MARGIN) * 1000.0
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._queue: asyncio.Queue[Alert] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._sending: Alert | None = None  # claimed, being delivered now
        self._store_trouble = ThrottledLog()
        self._full = ThrottledLog()

    def __repr__(self) -> str:
        return (
            f"AlertDeliverer(sent={self.sent}, failed={self.failed}, "
            f"retried={self.retried}, dropped={self.dropped})"
        )

    async def start(self) -> None:
        if self._tasks:
            return
        if self.settings.webhook_url is not None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.timeout), transport=self._transport
            )
        self._queue = asyncio.Queue(self.settings.queue_size)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._poll(), name="convex-guard alert poller"),
            loop.create_task(self._send(), name="convex-guard alert sender"),
        ]

    async def close(self) -> None:
        """Stop both tasks; claimed alerts not yet sent go back to pending for any instance."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        queue = self._queue
        back = [] if self._sending is None else [self._sending]  # cut short mid-post: resend
        self._sending = None
        while queue is not None and not queue.empty():
            back.append(queue.get_nowait())
        try:
            # Bounded: what is not handed back in time waits for its lease to run out.
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                for alert in back:
                    await self._end(alert, "retry")
        except TimeoutError:
            logger.warning("Alerts: store slow at shutdown; claimed alerts wait for their lease")
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def poll_once(self) -> int:
        """Claim what is pending and queue it; how many were claimed (tests call it)."""
        queue = self._queue
        assert queue is not None, "start() first"
        room = queue.maxsize - queue.qsize()
        try:
            # Twice what fits, so that what does not fit is seen, and counted.
            pending = await self.store.pending_alerts(limit=2 * self.settings.queue_size)
        except Exception as exc:
            self._store_trouble.warning("Alerts: the store did not answer: %r", exc)
            return 0
        claimed = 0
        for alert in pending:
            if claimed >= room:
                self.dropped += len(pending) - claimed
                self._full.warning(
                    "Alerts: the send queue is full; %d alerts stay pending for the next poll",
                    len(pending) - claimed,
                )
                break
            try:
                ok = await self.store.claim_alert(alert.id, self.owner, self.lease_ms)
            except Exception as exc:
                self._store_trouble.warning("Alerts: claiming %s failed: %r", alert.id, exc)
                continue
            if ok:
                queue.put_nowait(alert)
                claimed += 1
        return claimed

    async def _poll(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.settings.poll_interval)

    async def _send(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            alert = self._sending = await queue.get()
            try:
                await self._deliver(alert)
            except Exception:
                # A bug or an error nobody foresaw must not end delivery for this process.
                logger.exception("Alert %s: delivery failed unexpectedly", alert.id)
                await self._end(alert, "retry")
            self._sending = None

    async def _deliver(self, alert: Alert) -> None:
        logger.warning("Alert: %s", describe(alert))
        if await self._post(alert):
            self.sent += 1
            await self._end(alert, "delivered")
            return
        attempts = alert.attempts + 1  # the claim that handed it to us counted one
        if attempts >= self.settings.max_attempts:
            self.failed += 1
            logger.error(
                "Alert %s: the webhook failed %d times; marked failed: %s",
                alert.id,
                attempts,
                describe(alert),
            )
            await self._end(alert, "failed")
        else:
            self.retried += 1
            logger.warning("Alert %s: the webhook failed; handed back for a retry", alert.id)
            await self._end(alert, "retry")

    async def _post(self, alert: Alert) -> bool:
        client, url = self._client, self.settings.webhook_url
        if client is None or url is None:
            return True  # logging was the delivery
        body = alert_body(alert)
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                response = await client.post(url, json=body)
            except Exception as exc:  # httpx's errors, and whatever a transport raises
                logger.warning(
                    "Alert %s: webhook %s: %s", alert.id, redact_url(url), type(exc).__name__
                )
                continue
            if 200 <= response.status_code < 300:
                return True
            logger.warning(
                "Alert %s: webhook %s answered %d", alert.id, redact_url(url), response.status_code
            )
        return False

    async def _end(self, alert: Alert, outcome: AlertOutcome) -> None:
        try:
            if not await self.store.mark_alert(alert.id, self.owner, outcome):
                logger.warning("Alert %s: the claim had expired before it was marked", alert.id)
        except Exception as exc:
            # The claim's lease runs out and another poll claims it again: late, not lost.
            self._store_trouble.warning("Alerts: marking %s failed: %r", alert.id, exc)
