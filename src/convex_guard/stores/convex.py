"""The shared store: a self-hosted Convex deployment, called over Convex's HTTP API."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal

import httpx
from pydantic import SecretStr

from convex_guard.core.alerts import AlertRule
from convex_guard.core.errors import (
    ConfigurationError,
    ConvexAuthError,
    ConvexFunctionNotFoundError,
    ConvexValidationError,
    StoreAnswerError,
    StoreConflictError,
    StoreError,
    StoreOverloadedError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from convex_guard.core.keys import ApiKeyKind
from convex_guard.core.leases import DEFAULT_FRACTION, DEFAULT_HORIZON, DEFAULT_IDLE, Lease
from convex_guard.core.limits import LimitConfig, LimitResult, _until_full, check_count
from convex_guard.core.settings import GuardEnvironment, load_environment
from convex_guard.stores.base import (
    AUDITED_KEY_FIELDS,
    REFUSAL_REASONS,
    UNKNOWN_ACTOR,
    AIRequestLog,
    Alert,
    AlertOutcome,
    ApiKeyList,
    ApiKeyRecord,
    AuditAction,
    AuditChange,
    AuditEntry,
    AuditValue,
    AuthFailure,
    BotCheck,
    BotEvent,
    BotVerdict,
    CheckResult,
    DashboardSnapshot,
    EmbeddingRequestLog,
    EmbeddingUsage,
    KeyQuota,
    KeyRateLimit,
    KeyUsage,
    KeyUsageSummary,
    LimitRequest,
    LimitThroughCheck,
    LogBatch,
    NewApiKey,
    ProviderSeries,
    ProviderStats,
    Settlement,
    check_actor,
    check_dashboard_range,
    check_update_action,
)

DEFAULT_TIMEOUT = 2.0
#: The backend's error codes (`{"code": ..., "message": ...}` bodies) for a mutation whose
#: optimistic-concurrency retries ran out (HTTP 503) and for a full function queue (HTTP 429).
OCC_FAILURE = "OptimisticConcurrencyControlFailure"
#: How many more times a mutation the backend gave up on for conflicts is sent (see `_call`).
CONFLICT_RESENDS = 2
TOO_MANY_CONCURRENT = "TooManyConcurrentRequests"
#: The most bot events one query returns (`BOT_EVENTS_CAP` in convex/ai/analytics.ts).
BOT_EVENTS_PAGE = 1000
#: The most audit entries one query returns (`AUDIT_PAGE_CAP` in convex/convex/apiKeys.ts).
AUDIT_PAGE = 200
Json = Any

logger = logging.getLogger("convex_guard.store")


def _wall_ms() -> float:
    return time.time() * 1000.0


def _redact_url(url: str) -> str:
    """`url` without the credentials of its userinfo (`http://user:pw@host` → `http://***@host`)."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://***@{authority.rpartition('@')[2]}{slash}{path}"


def _hidden(url: str, shown_url: str, admin_key: str) -> tuple[tuple[str, str], ...]:
    """What error messages must not show, each with what to show instead (longest first)."""
    pairs = [(admin_key, "**********")]
    if url != shown_url:
        userinfo = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
        pairs.append((url, shown_url))
        pairs.extend((secret, "***") for secret in (userinfo, *userinfo.split(":", 1)) if secret)
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    # Convex's `v.optional` means absent, not null.
    return {k: v for k, v in values.items() if v is not None}


def _limit_request(request: LimitRequest) -> dict[str, Any]:
    return _drop_none(
        {
            "name": request.name,
            "key": request.key,
            "count": float(request.count),
            "reserve": request.reserve or None,
            "config": request.config.to_convex(),
        }
    )


def _limit_result(config: LimitConfig, raw: Mapping[str, Any], now: float) -> LimitResult:
    """Remaining tokens and time-to-full derived from the state the function returns."""
    ok = bool(raw["ok"])
    value = float(raw["value"])
    ts = float(raw["ts"])
    retry = raw.get("retryAfter")
    remaining = value if value > 0 else 0.0
    return LimitResult(
        ok,
        float(retry) if retry is not None else None,
        remaining,
        _until_full(config, remaining, ts, now),
    )


def _bot_check(bot: BotCheck) -> dict[str, Any]:
    return _drop_none(
        {
            "fingerprint": bot.fingerprint,
            "ip": bot.ip,
            "userAgent": bot.user_agent,
            "detectionType": bot.detection_type,
            "action": bot.action,
            "metadata": dict(bot.metadata) if bot.metadata else None,
            "limit": _limit_request(bot.limit) if bot.limit is not None else None,
            "clientKey": bot.client_key,
        }
    )


def _bot_event_json(event: BotEvent) -> dict[str, Any]:
    return _drop_none(
        {
            "timestamp": float(event.timestamp),
            "fingerprint": event.fingerprint,
            "ip": event.ip,
            "userAgent": event.user_agent,
            "detectionType": event.detection_type,
            "action": event.action,
            "metadata": dict(event.metadata) if event.metadata else None,
            "clientKey": event.client_key,
        }
    )


def _bot_event(raw: Mapping[str, Any]) -> BotEvent:
    return BotEvent(
        timestamp=float(raw["timestamp"]),
        fingerprint=raw["fingerprint"],
        ip=raw["ip"],
        user_agent=raw["userAgent"],
        detection_type=raw["detectionType"],
        action=raw["action"],
        metadata=raw.get("metadata"),
        client_key=raw.get("clientKey"),
    )


#: Counts above this lose their units digit in a float64, so sums of them stop being exact.
_MAX_EXACT = float(2**53)


def _number(name: str, value: object, *, whole: bool = False, signed: bool = False) -> float:
    """A row's number as Convex stores it (a float64), or ValueError naming the field.

    NaN, infinities, negatives, a count that is fractional or past 2**53, or an int too big
    for a float would be refused by the deployment or poison every sum over the table; the
    log writer drops a row that raises here and writes the rest of its batch.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} is too large") from None
    if signed and math.isfinite(number):
        return number
    if not 0 <= number < math.inf:
        raise ValueError(f"{name} must be finite and non-negative")
    if whole and (number > _MAX_EXACT or not number.is_integer()):
        raise ValueError(f"{name} must be a whole number of at most 2**53")
    return number


def _ai_log(row: AIRequestLog) -> dict[str, Any]:
    tokens = row.tokens_used
    cost = row.cost
    ttft = row.ttft_ms
    return _drop_none(
        {
            "timestamp": _number("timestamp", row.timestamp),
            "provider": row.provider,
            "model": row.model,
            "userId": row.user_id,
            "fingerprint": row.fingerprint,
            "ip": row.ip,
            "success": row.success,
            "error": row.error,
            "tokensUsed": _number("tokensUsed", tokens, whole=True) if tokens is not None else None,
            "latencyMs": _number("latencyMs", row.latency_ms),
            "cost": _number("cost", cost) if cost is not None else None,
            "ttftMs": _number("ttftMs", ttft) if ttft is not None else None,
            "shadow": row.shadow,
        }
    )


def _embedding_log(row: EmbeddingRequestLog) -> dict[str, Any]:
    return _drop_none(
        {
            "requestId": row.request_id,
            "apiKeyHash": row.api_key_hash,
            "timestamp": _number("timestamp", row.timestamp),
            "batchSize": _number("batchSize", row.batch_size, whole=True),
            "latencyMs": _number("latencyMs", row.latency_ms),
            "tokensUsed": _number("tokensUsed", row.tokens_used, whole=True),
            "success": row.success,
            "error": row.error,
            "model": row.model,
        }
    )


def _auth_failure(row: AuthFailure) -> dict[str, Any]:
    return _drop_none(
        {
            "keyHash": row.key_hash,
            "timestamp": float(row.timestamp),
            "ip": row.ip,
            "userAgent": row.user_agent,
            "clientKey": row.client_key,
        }
    )


def _key_usage(row: KeyUsage) -> dict[str, Any]:
    return {"keyId": row.key_id, "lastUsed": float(row.last_used), "requests": float(row.requests)}


def _settlement(row: Settlement) -> dict[str, Any]:
    return _drop_none(
        {
            "name": row.name,
            "key": row.key,
            "config": row.config.to_convex(),
            "amount": _number("amount", row.amount, signed=True),
            "reservedAt": _number("reservedAt", row.reserved_at),
        }
    )


def _api_key(raw: Mapping[str, Any]) -> ApiKeyRecord:
    limit = raw.get("rateLimit")
    return ApiKeyRecord(
        id=raw["id"],
        kind=raw["kind"],
        key_hash=raw["keyHash"],
        prefix=raw["prefix"],
        name=raw["name"],
        owner=raw.get("owner"),
        scopes=tuple(raw["scopes"]),
        rate_limit=(
            KeyRateLimit(int(limit["requests"]), float(limit["period"])) if limit else None
        ),
        created_at=float(raw["createdAt"]),
        expires_at=float(raw["expiresAt"]) if raw.get("expiresAt") is not None else None,
        last_used=float(raw["lastUsed"]) if raw.get("lastUsed") is not None else None,
        request_count=int(raw["requestCount"]),
        active=bool(raw["active"]),
        quotas=tuple(
            KeyQuota(q["unit"], float(q["amount"]), float(q["period"]))
            for q in raw.get("quotas") or ()
        ),
    )


#: An audited field as `apiKeys.ts` names it (camelCase) -> as `ApiKeyRecord` names it.
_AUDIT_FIELDS = {
    "".join(w.capitalize() if i else w for i, w in enumerate(name.split("_"))): name
    for name in AUDITED_KEY_FIELDS
}


def _audit_value(raw: Any) -> AuditValue:
    if isinstance(raw, list):
        if raw and isinstance(raw[0], dict):  # a tier's quotas
            return tuple(KeyQuota(q["unit"], float(q["amount"]), float(q["period"])) for q in raw)
        return tuple(raw)
    if isinstance(raw, dict):
        return KeyRateLimit(int(raw["requests"]), float(raw["period"]))
    if isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    return raw  # type: ignore[no-any-return]


def _audit_entry(raw: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(
        id=raw["id"],
        timestamp=float(raw["timestamp"]),
        action=raw["action"],
        record=raw["record"],
        actor=raw["actor"],
        changes=tuple(
            AuditChange(
                _AUDIT_FIELDS.get(c["field"], c["field"]),
                _audit_value(c.get("before")),
                _audit_value(c.get("after")),
            )
            for c in raw["changes"]
        ),
        related=raw.get("related"),
    )


class ConvexStore(LimitThroughCheck):
    """State shared by every app instance, in a self-hosted Convex deployment.

    Calls the internal functions of `convex/` with the admin key, over one keep-alive HTTP
    connection pool; every call is bounded by `timeout` seconds. The hot path (`check`) is at
    most one mutation per request. Errors derive from `StoreError` and never include the admin
    key or credentials given in the URL (`url` is the URL without them); the backend's 503
    conflict and 429 overload answers are `StoreConflictError` and `StoreOverloadedError`.

    Keyed limits (a request with a `key`, or with `reserve`) are decided exactly, per request,
    in that one `guard:check` mutation. Unkeyed limits (one state shared by every instance:
    global, per provider) are admitted from local leases instead: the process takes a block of
    the limit's tokens in the same mutation when it runs out (sized from its own demand over
    the last second times `lease_horizon` seconds, at least the request's count, at most
    `lease_fraction` of capacity), so the shared document is written once per block, not per
    request; a request whose limits are all unkeyed and covered locally, with no bot check,
    makes no call at all. Requests that find the pool empty while a lease is in flight wait
    for it (the next ask is sized for them), and a pool below half a block asks ahead in a
    call the request makes anyway, never in one of its own. A refused lease means the limit
    is spent everywhere: it is refused locally, with no call, until its `retryAfter`. Unused
    tokens go back (a negative count) with the next call after `lease_idle` seconds without
    use, and at `close()`; a fixed window's tokens are dropped when their window ends, never
    returned to a later one.

    The bound: over any interval, an unkeyed limit admits at most what an exact limiter would
    plus the tokens held when the interval began, so with N instances, admitted <= limit +
    N x largest block. The slack is only in time, never in total: every admitted request
    spends a token the store granted. A token bucket's tokens are subtracted when leased,
    so tokens held from before an interval are spent in it on top of its own refill; a fixed
    window's tokens are used until this process sees the window end (its clock is the
    store's, offset by the last answer, so up to the skew and half a round trip late) while
    another instance already takes the next window's. Where it does not exist: the requests
    admitted on one fixed window's tokens are <= limit exactly (a token is only ever used in
    the window it was granted in, or dropped), and a token bucket admits <= capacity + its
    refill since it started.

    The results of unkeyed limits carry a `remaining` / `reset_after` estimate: the store's
    state at the last lease plus the tokens held here, blind to other instances' blocks since.
    For a sharded limit, Convex's answers are themselves estimates (one sampled shard).

    `writer` is this store's random id, sent with every log batch: the rollup and key-usage
    rows a batch adds to are this writer's own, so many instances never write one document.
    """

    def __init__(
        self,
        url: str,
        admin_key: str | SecretStr,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        lease_horizon: float = DEFAULT_HORIZON,
        lease_fraction: float = DEFAULT_FRACTION,
        lease_idle: float = DEFAULT_IDLE,
        clock: Callable[[], float] = _wall_ms,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"Convex URL must start with http:// or https://, got {_redact_url(url)!r}"
            )
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if not 0 < lease_horizon < math.inf:
            raise ConfigurationError("lease_horizon must be a positive number of seconds")
        if not 0 < lease_fraction <= 1:
            raise ConfigurationError("lease_fraction must be in (0, 1]")
        if not 0 < lease_idle < math.inf:
            raise ConfigurationError("lease_idle must be a positive number of seconds")
        self._lease_options = {
            "horizon": lease_horizon,
            "fraction": lease_fraction,
            "idle": lease_idle,
        }
        self._clock = clock
        # The store's clock minus ours, from the last answer: leases expire on the store's time.
        self._offset = 0.0
        self._leases: dict[str, Lease] = {}
        # Names with a lease call in flight: concurrent requests wait for its block.
        self._asking: dict[str, asyncio.Event] = {}
        key = admin_key if isinstance(admin_key, SecretStr) else SecretStr(admin_key)
        if not key.get_secret_value():
            raise ConfigurationError("The Convex admin key is empty")
        # Credentials in the URL are used to connect but never shown: `url` is the form that
        # is safe to print, log and put in errors.
        self._url = url.rstrip("/")
        self.url = _redact_url(self._url)
        self.timeout = timeout
        self._admin_key = key
        self._hidden = _hidden(self._url, self.url, key.get_secret_value())
        # Names this process's log writes: the rollup and key-usage rows it adds to are its
        # own, so instances never write the same document from their batches.
        self.writer = secrets.token_hex(8)
        self._client = httpx.AsyncClient(
            base_url=self._url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={
                "Authorization": f"Convex {key.get_secret_value()}",
                "Convex-Client": "convex-guard-python",
            },
            transport=transport,
        )
        # `alertRules` for every batch, once `configure_alerts` gave some.
        self._alert_args: dict[str, Any] = {}

    @classmethod
    def from_env(cls, env: GuardEnvironment | None = None, **options: Any) -> ConvexStore:
        """The deployment named by CONVEX_SELF_HOSTED_URL (or CONVEX_URL) and its admin key."""
        env = env if env is not None else load_environment()
        url = env.deployment_url
        if not url:
            raise ConfigurationError(
                "No Convex deployment configured: set CONVEX_SELF_HOSTED_URL (or CONVEX_URL)"
            )
        if env.convex_self_hosted_admin_key is None:
            raise ConfigurationError(
                "CONVEX_SELF_HOSTED_ADMIN_KEY is not set: generate one with "
                "`docker compose exec backend ./generate_admin_key.sh`"
            )
        return cls(url, env.convex_self_hosted_admin_key, **options)

    def __repr__(self) -> str:
        return f"ConvexStore(url={self.url!r}, admin_key=SecretStr('**********'))"

    # -- the wire -------------------------------------------------------------------------
    async def _call(
        self, kind: Literal["query", "mutation"], path: str, args: Mapping[str, Any]
    ) -> Json:
        """One function call; a mutation the backend gave up on for conflicts is sent again.

        The backend answers `OptimisticConcurrencyControlFailure` only after retrying the
        mutation itself, and such a mutation committed nothing: sending it once or twice more
        (after a short random pause, so that the writers it met spread out) cannot count
        anything twice. The store's `timeout` still bounds each attempt, and the caller's
        (`ResilientStore`) the whole.
        """
        # Imported here: the `convex` package loads a native extension we only need for Convex.
        from convex.values import convex_to_json

        body = {"path": path, "format": "convex_encoded_json", "args": convex_to_json(dict(args))}
        attempt = 0
        while True:
            try:
                return await self._post(kind, path, body)
            except StoreConflictError:
                if kind != "mutation" or attempt >= CONFLICT_RESENDS:
                    raise
            attempt += 1
            await asyncio.sleep(random.uniform(0.05, 0.25) * attempt)

    async def _post(self, kind: str, path: str, body: Mapping[str, Any]) -> Json:
        from convex.values import json_to_convex

        try:
            response = await self._client.post(f"/api/{kind}", json=body)
        except httpx.TimeoutException:
            raise StoreTimeoutError(
                f"Convex {kind} {path} did not answer within {self.timeout} s"
            ) from None
        except httpx.TransportError as exc:
            raise StoreUnavailableError(
                f"Convex deployment {self.url} unreachable: {type(exc).__name__}"
            ) from None
        status = response.status_code
        if status in (401, 403):
            raise ConvexAuthError(
                f"Convex deployment {self.url} refused the admin key (HTTP {status})"
            )
        try:
            payload = response.json()
        except ValueError:
            raise self._http_error(kind, path, status, None, None) from None
        if status >= 400 or not isinstance(payload, dict):
            code = payload.get("code") if isinstance(payload, dict) else None
            message = payload.get("message") if isinstance(payload, dict) else None
            raise self._http_error(
                kind, path, status, str(code) if code else None, str(message or "")
            )
        if payload.get("status") == "success":
            return json_to_convex(payload["value"])
        raise self._error(kind, path, str(payload.get("errorMessage", "unknown error")))

    def _scrub(self, message: str) -> str:
        """`message` without the admin key or the URL's credentials, cut to a readable size."""
        for secret, shown in self._hidden:
            message = message.replace(secret, shown)
        return message[:500]

    def _http_error(
        self, kind: str, path: str, status: int, code: str | None, message: str | None
    ) -> StoreError:
        """The error for an HTTP error answer: the backend's `{"code", "message"}` by its code.

        `message` is None when the body was not JSON (a proxy's page, say).
        """
        where = f"Convex {kind} {path}"
        if message is None:
            if status == 429:
                return StoreOverloadedError(f"{where}: HTTP 429 from {self.url}, not JSON")
            if status in (502, 503, 504):
                return StoreUnavailableError(f"{where}: {self.url} unavailable (HTTP {status})")
            return StoreError(f"{where}: HTTP {status}, not JSON")
        detail = self._scrub(f"{code}: {message}" if code else message)
        if code == OCC_FAILURE:
            return StoreConflictError(
                f"{where} kept conflicting with concurrent writes and the backend gave up "
                f"retrying it (HTTP {status} {detail})"
            )
        if code == TOO_MANY_CONCURRENT or status == 429:
            return StoreOverloadedError(
                f"{where} found no free function slot on {self.url} (HTTP {status} {detail})"
            )
        if status in (502, 503, 504):
            return StoreUnavailableError(
                f"{where}: {self.url} unavailable (HTTP {status} {detail})"
            )
        return self._error(kind, path, message or f"HTTP {status}")

    def _error(self, kind: str, path: str, message: str) -> StoreError:
        # Classified before scrubbing: a hidden user name may be a word the checks look for.
        lowered = message.lower()
        message = self._scrub(message)
        if "could not find" in lowered or "not found" in lowered:
            return ConvexFunctionNotFoundError(
                f"Convex {kind} {path} not found on {self.url}: deploy convex/ ({message})"
            )
        if "validator" in lowered or "argumentvalidationerror" in lowered:
            return ConvexValidationError(f"Convex {kind} {path} rejected its arguments: {message}")
        if "admin" in lowered and ("key" in lowered or "auth" in lowered):
            return ConvexAuthError(f"Convex {kind} {path}: {message}")
        return StoreError(f"Convex {kind} {path} failed: {message}")

    # -- rate limits -------------------------------------------------------------------------
    def _lease(self, name: str, config: LimitConfig) -> Lease:
        lease = self._leases.get(name)
        # Identity first: a rule hands the same config on every request, and model equality
        # costs more than the rest of a locally covered decision.
        if lease is None or (lease.config is not config and lease.config != config):
            lease = self._leases[name] = Lease(config, **self._lease_options)
        return lease

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        for request in limits:
            check_count(request.name, request.config, request.count, request.reserve)
        now = self._clock() + self._offset
        results: list[LimitResult | None] = [None] * len(limits)
        keyed: list[int] = []
        local: list[int] = []
        # Tokens taken locally for this request: put back if the request is denied.
        taken: list[tuple[Lease, float, float | None]] = []
        # (index, lease, want) of each unkeyed limit the call must carry a lease for.
        asks: list[tuple[int, Lease, float]] = []
        refused: list[tuple[int, Lease]] = []
        for i, request in enumerate(limits):
            if request.key is not None or request.reserve or request.settled:
                # A settled limit (a token or cost rule's) is decided exactly even when
                # unkeyed: its reservation is corrected later by another amount, which a
                # block held here would have to carry as a debt of its own.
                keyed.append(i)
                continue
            name, count = request.name, request.count
            lease = self._lease(name, request.config)
            covered = lease.take(count, now)
            while not covered and lease.retry_after(now) is None:
                waiting = self._asking.get(name)
                if waiting is None:
                    break
                # A block is on its way: wait for it rather than write the shared document
                # once more for this request alone (the next ask counts the queue).
                lease.queued += count
                try:
                    await waiting.wait()
                finally:
                    lease.queued -= count
                now = self._clock() + self._offset
                covered = lease.take(count, now)
            if covered:
                taken.append((lease, count, lease.window))
                local.append(i)
                results[i] = lease.result(True, now)
            elif lease.retry_after(now) is not None:
                refused.append((i, lease))
            else:
                asks.append((i, lease, lease.ask(count, now)))
        if refused and not keyed and bot is None:
            # Spent everywhere until retryAfter: no call, and nothing of this request is kept.
            for lease, count, window in taken:
                lease.untake(count, window)
            for i, lease in refused:
                results[i] = lease.result(False, now)
            for i, lease, want in asks:
                lease.pending = max(0.0, lease.pending - want)
                results[i] = lease.result(True, now)
            return CheckResult(False, tuple(r for r in results if r is not None), None, now)
        if not keyed and not asks and not refused and bot is None:
            return CheckResult(True, tuple(r for r in results if r is not None), None, now)
        # A call is made. A locally refused limit is spent everywhere until its retryAfter: it
        # is not asked again (that would read its shared document in every such call), the
        # request is refused, and the mutation decides its keyed limits only for their answers
        # (`deny`), consuming none. A running-low lease asks ahead for its next block, and
        # idle leases hand their tokens back.
        for i, lease in refused:
            results[i] = lease.result(False, now)
        asked = {limits[i].name for i, _, _ in asks}
        ahead: list[tuple[str, Lease, float]] = []
        for i in local:
            name = limits[i].name
            lease = self._leases[name]
            if name not in asked and lease.low(now):
                want = lease.ask(0.0, now)
                if want > 0:
                    ahead.append((name, lease, want))
                    asked.add(name)
        leases = [
            {
                "name": limits[i].name,
                "config": limits[i].config.to_convex(),
                "want": float(want),
                "need": float(limits[i].count),
            }
            for i, _, want in asks
        ]
        leases.extend(
            {"name": name, "config": lease.config.to_convex(), "want": float(want), "need": 0.0}
            for name, lease, want in ahead
        )
        leases.extend(self._returns(now, lambda name: name not in asked))
        args: dict[str, Any] = {"limits": [_limit_request(limits[i]) for i in keyed]}
        if bot is not None:
            args["bot"] = _bot_check(bot)
        if leases:
            args["leases"] = leases
        if refused:
            args["deny"] = True
        mine = [name for name in asked if name not in self._asking]
        for name in mine:
            self._asking[name] = asyncio.Event()
        try:
            raw = await self._call("mutation", "guard:check", args)
        except BaseException:
            for lease, count, window in taken:
                lease.untake(count, window)
            for _, lease, want in asks:
                lease.pending = max(0.0, lease.pending - want)
            for _, lease, want in ahead:
                lease.pending = max(0.0, lease.pending - want)
            raise
        finally:
            for name in mine:
                self._asking.pop(name).set()
        server_now = float(raw["now"])
        self._offset = server_now - self._clock()
        ok = bool(raw["ok"]) and not refused
        answers = list(raw.get("leases") or ())
        for (i, lease, want), answer in zip(asks, answers, strict=False):
            covered = self._granted(lease, want, limits[i].count, answer, server_now)
            if covered:
                taken.append((lease, limits[i].count, lease.window))
            else:
                ok = False
            results[i] = lease.result(covered, server_now)
        for (_, lease, want), answer in zip(ahead, answers[len(asks) :], strict=False):
            self._granted(lease, want, 0.0, answer, server_now)
        verdict = None
        if raw.get("bot") is not None:
            verdict = BotVerdict(raw["bot"]["action"], int(raw["bot"]["previousEvents"]))
        if not ok:
            for lease, count, window in taken:
                lease.untake(count, window)
        if verdict is not None and verdict.action != "allowed":
            # A blocked or challenged bot consumed none of its limits (no results, as before).
            return CheckResult(False, (), verdict, server_now)
        for i, result in zip(keyed, raw["results"], strict=False):
            results[i] = _limit_result(limits[i].config, result, server_now)
        return CheckResult(ok, tuple(r for r in results if r is not None), verdict, server_now)

    @staticmethod
    def _granted(
        lease: Lease, want: float, count: float, answer: Mapping[str, Any], now: float
    ) -> bool:
        retry = answer.get("retryAfter")
        return lease.grant(
            float(answer["granted"]),
            want,
            count,
            float(retry) if retry is not None else None,
            float(answer["value"]),
            float(answer["ts"]),
            now,
        )

    def _returns(self, now: float, which: Callable[[str], bool]) -> list[dict[str, Any]]:
        """The lease arguments that hand back the tokens of every idle lease `which` selects."""
        out = []
        for name, lease in self._leases.items():
            if not which(name) or not lease.idle(now):
                continue
            back = lease.give_back(now)
            if back is not None:
                out.append(self._return_arg(name, lease, *back))
        return out

    @staticmethod
    def _return_arg(name: str, lease: Lease, amount: float, window: float | None) -> dict[str, Any]:
        return _drop_none(
            {
                "name": name,
                "config": lease.config.to_convex(),
                "want": -float(amount),
                "need": 0.0,
                "window": float(window) if window is not None else None,
            }
        )

    async def reset(self, name: str, *, key: str | None = None) -> None:
        """Forget a limit's state. For an unkeyed limit this process's lease is dropped too;
        other instances spend the blocks they hold (a block each at most) before asking again.
        """
        if key is None and name in self._leases:
            self._leases[name].drop()
        await self._call("mutation", "limits:reset", _drop_none({"name": name, "key": key}))

    async def peek(self, name: str, config: LimitConfig, *, key: str | None = None) -> LimitResult:
        raw = await self._call(
            "query",
            "limits:peek",
            _drop_none({"name": name, "key": key, "config": config.to_convex()}),
        )
        return _limit_result(config, {"ok": True, **raw}, float(raw["now"]))

    # -- bots ------------------------------------------------------------------------------
    async def count_bot_events(self, fingerprint: str, since: float) -> int:
        raw = await self._call(
            "query", "bots:countSince", {"fingerprint": fingerprint, "since": float(since)}
        )
        return int(raw)

    async def bot_events(self, *, since: float, limit: int = 100) -> list[BotEvent]:
        if limit <= BOT_EVENTS_PAGE:
            raw = await self._call(
                "query", "ai/analytics:getBotEvents", {"limit": float(limit), "since": float(since)}
            )
            return [_bot_event(row) for row in raw]
        # More than one query may read: page through, newest first, until `limit` or the end.
        events: list[BotEvent] = []
        cursor: str | None = None
        while len(events) < limit:
            page = await self._call(
                "query",
                "ai/analytics:pageBotEvents",
                {
                    "since": float(since),
                    "numItems": float(min(BOT_EVENTS_PAGE, limit - len(events))),
                    "cursor": cursor,
                },
            )
            events.extend(_bot_event(row) for row in page["page"])
            if page["isDone"]:
                break
            cursor = page["continueCursor"]
        return events[:limit]

    # -- API keys -----------------------------------------------------------------------------
    async def create_api_key(
        self, key: NewApiKey, *, actor: str = UNKNOWN_ACTOR, related: str | None = None
    ) -> ApiKeyRecord:
        """Create the key and its `key.created` entry in one mutation (both or neither)."""
        args = _drop_none(
            {
                "kind": key.kind,
                "keyHash": key.key_hash,
                "prefix": key.prefix,
                "name": key.name,
                "owner": key.owner,
                "scopes": list(key.scopes),
                "rateLimit": (
                    {
                        "requests": float(key.rate_limit.requests),
                        "period": float(key.rate_limit.period),
                    }
                    if key.rate_limit is not None
                    else None
                ),
                "createdAt": float(key.created_at),
                "expiresAt": float(key.expires_at) if key.expires_at is not None else None,
                "quotas": [
                    {"unit": q.unit, "amount": float(q.amount), "period": float(q.period)}
                    for q in key.quotas
                ]
                or None,
                "actor": check_actor(actor),
                "related": related,
            }
        )
        return _api_key(await self._call("mutation", "apiKeys:create", args))

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        raw = await self._call("query", "apiKeys:getByHash", {"keyHash": key_hash})
        return _api_key(raw) if raw is not None else None

    async def list_api_keys(
        self, *, kind: ApiKeyKind | None = None, owner: str | None = None
    ) -> ApiKeyList:
        raw = await self._call("query", "apiKeys:list", _drop_none({"kind": kind, "owner": owner}))
        return ApiKeyList((_api_key(row) for row in raw["keys"]), truncated=bool(raw["truncated"]))

    async def update_api_key(
        self,
        key_id: str,
        *,
        active: bool | None = None,
        expires_at: float | None = None,
        actor: str = UNKNOWN_ACTOR,
        action: AuditAction = "key.updated",
        related: str | None = None,
    ) -> ApiKeyRecord | None:
        """Patch the key and record its entry in one mutation (both or neither)."""
        raw = await self._call(
            "mutation",
            "apiKeys:update",
            _drop_none(
                {
                    "id": key_id,
                    "active": active,
                    "expiresAt": float(expires_at) if expires_at is not None else None,
                    "actor": check_actor(actor),
                    "action": check_update_action(action),
                    "related": related,
                }
            ),
        )
        return _api_key(raw) if raw is not None else None

    async def audit_entries(
        self, *, since: float = 0.0, record: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        """Pages of `AUDIT_PAGE` entries, newest first, until `limit` or the end."""
        entries: list[AuditEntry] = []
        cursor: str | None = None
        while len(entries) < limit:
            page = await self._call(
                "query",
                "apiKeys:auditLog",
                _drop_none(
                    {
                        "since": float(since),
                        "record": record,
                        "numItems": float(min(AUDIT_PAGE, limit - len(entries))),
                    }
                )
                | {"cursor": cursor},
            )
            entries.extend(_audit_entry(row) for row in page["page"])
            if page["isDone"]:
                break
            cursor = page["continueCursor"]
        return entries[:limit]

    # -- logs and analytics ---------------------------------------------------------------------
    async def write_logs(self, batch: LogBatch) -> None:
        await self._call(
            "mutation",
            "logs:writeBatch",
            {
                "batchId": batch.id,
                "writer": self.writer,
                "aiRequests": [_ai_log(row) for row in batch.ai_requests],
                "embeddingRequests": [_embedding_log(row) for row in batch.embedding_requests],
                "authFailures": [_auth_failure(row) for row in batch.auth_failures],
                "botEvents": [_bot_event_json(row) for row in batch.bot_events],
                "keyUsage": [_key_usage(row) for row in batch.key_usage],
                **(
                    {"settlements": [_settlement(row) for row in batch.settlements]}
                    if batch.settlements
                    else {}
                ),
                **self._alert_args,
            },
        )

    async def provider_stats(self, provider: str, start: float, end: float) -> ProviderStats:
        raw = await self._call(
            "query",
            "ai/analytics:getProviderStats",
            {"provider": provider, "timeRange": {"start": float(start), "end": float(end)}},
        )
        return _provider_stats(raw)

    async def embedding_usage(self, key_hash: str, start: float, end: float) -> EmbeddingUsage:
        raw = await self._call(
            "query",
            "embeddings/analytics:getUsage",
            {"keyHash": key_hash, "start": float(start), "end": float(end)},
        )
        return EmbeddingUsage(
            total_requests=int(raw["totalRequests"]),
            successful_requests=int(raw["successfulRequests"]),
            total_tokens=int(raw["totalTokens"]),
            total_items=int(raw["totalItems"]),
            truncated=bool(raw["truncated"]),
        )

    async def count_auth_failures(self, key_hash: str, since: float) -> int:
        raw = await self._call(
            "query",
            "embeddings/analytics:countAuthFailures",
            {"keyHash": key_hash, "since": float(since)},
        )
        return int(raw)

    # -- live subscriptions -------------------------------------------------------------------
    async def watch_provider_stats(
        self, provider: str, start: float, end: float
    ) -> AsyncIterator[ProviderStats]:
        """Provider stats for a fixed range, pushed by Convex whenever they change."""
        async for raw in self._subscribe(
            "ai/analytics:getProviderStats",
            {"provider": provider, "timeRange": {"start": float(start), "end": float(end)}},
        ):
            yield _provider_stats(raw)

    async def watch_bot_events(
        self, *, since: float, limit: int = 20
    ) -> AsyncIterator[list[BotEvent]]:
        """The most recent bot events, pushed by Convex whenever a new one is recorded.

        At most `BOT_EVENTS_PAGE` events: a live query reads them all on every change.
        """
        if limit > BOT_EVENTS_PAGE:
            raise ConfigurationError(
                f"watch_bot_events follows at most {BOT_EVENTS_PAGE} events, not {limit}"
            )
        async for raw in self._subscribe(
            "ai/analytics:getBotEvents", {"limit": float(limit), "since": float(since)}
        ):
            yield [_bot_event(row) for row in raw]

    async def _subscribe(self, path: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        # The official client speaks Convex's sync protocol; its blocking `next()` holds the
        # GIL and stalls other threads, so it is consumed with `async for` only.
        from convex import ConvexClient

        try:
            client = ConvexClient(self._url)
            client.set_admin_auth(self._admin_key.get_secret_value())
            subscription = client.subscribe(path, args)
        except Exception as exc:
            # The client's own messages may carry the URL as given, credentials and all.
            raise StoreError(
                self._scrub(f"Convex subscription {path} failed: {type(exc).__name__}: {exc}")
            ) from None
        try:
            async for value in subscription:
                yield value
        except Exception as exc:
            raise StoreError(
                self._scrub(f"Convex subscription {path} failed: {type(exc).__name__}: {exc}")
            ) from None
        finally:
            # Cancelled while waiting for a value, the client's pending read holds the
            # subscription, and `unsubscribe()` would subscribe again first (blocking, with a
            # warning); dropping that read unsubscribes.
            if subscription.inner.exists():
                subscription.unsubscribe()

    # -- alerts ------------------------------------------------------------------------------
    def configure_alerts(self, rules: Sequence[AlertRule]) -> None:
        # Sent with every batch rather than set on the deployment: the instances' settings
        # are the one place rules are configured, and a batch is where the rows are counted.
        converted = [rule.to_convex() for rule in rules]
        self._alert_args = {"alertRules": converted} if converted else {}

    async def alerts(self, *, since: float, limit: int = 100) -> list[Alert]:
        raw = await self._call(
            "query", "alerts:list", {"since": float(since), "limit": float(max(limit, 0))}
        )
        return [_alert(row) for row in raw]

    async def pending_alerts(self, *, limit: int = 100) -> list[Alert]:
        raw = await self._call("query", "alerts:pending", {"limit": float(max(limit, 0))})
        return [_alert(row) for row in raw]

    async def claim_alert(self, alert_id: str, owner: str, lease_ms: float) -> bool:
        raw = await self._call(
            "mutation",
            "alerts:claim",
            {"id": alert_id, "owner": owner, "leaseMs": float(lease_ms)},
        )
        return bool(raw)

    async def mark_alert(self, alert_id: str, owner: str, outcome: AlertOutcome) -> bool:
        raw = await self._call(
            "mutation", "alerts:mark", {"id": alert_id, "owner": owner, "outcome": outcome}
        )
        return bool(raw)

    # -- the dashboard --------------------------------------------------------------------------
    async def dashboard(self, start: float, end: float, bucket_ms: float) -> DashboardSnapshot:
        """One `dashboard:snapshot` query: rollups, bot events, auth failures and keys, each
        read bounded (see convex/convex/dashboard.ts)."""
        check_dashboard_range(start, end, bucket_ms)
        raw = await self._call("query", "dashboard:snapshot", _range_args(start, end, bucket_ms))
        return _checked_snapshot(raw, start, end, bucket_ms)

    async def watch_dashboard(
        self, start: float, end: float, bucket_ms: float
    ) -> AsyncIterator[DashboardSnapshot]:
        """The snapshot of a fixed range, pushed by Convex whenever a figure in it changes."""
        check_dashboard_range(start, end, bucket_ms)
        async for raw in self._subscribe("dashboard:snapshot", _range_args(start, end, bucket_ms)):
            yield _checked_snapshot(raw, start, end, bucket_ms)

    async def close(self) -> None:
        """Hand back every lease's unused tokens (one call), then close the connections.

        A failure to hand them back is logged, not raised: the tokens are then lost for their
        window or until the bucket refills, which errs on the side of admitting less.
        """
        now = self._clock() + self._offset
        returns = []
        for name, lease in self._leases.items():
            back = lease.give_back(now)
            if back is not None:
                returns.append(self._return_arg(name, lease, *back))
        self._leases.clear()
        try:
            if returns:
                await self._call("mutation", "guard:check", {"limits": [], "leases": returns})
        except StoreError as exc:
            logger.warning("Could not hand back leased tokens at close: %s", exc)
        finally:
            await self._client.aclose()


def _provider_stats(raw: Mapping[str, Any]) -> ProviderStats:
    return ProviderStats(
        total_requests=int(raw["totalRequests"]),
        success_rate=float(raw["successRate"]),
        average_latency=float(raw["averageLatency"]),
        total_tokens=int(raw["totalTokens"]),
        total_cost=float(raw["totalCost"]),
        truncated=bool(raw["truncated"]),
        # Absent from a deployment whose functions predate shadow rules.
        shadow_refusals=int(raw.get("shadowRefusals", 0)),
    )


def _alert(raw: Mapping[str, Any]) -> Alert:
    status = raw["status"]
    if status not in ("pending", "delivered", "failed"):
        raise ValueError(f"unknown alert status {status!r}")
    return Alert(
        id=str(raw["id"]),
        kind=str(raw["kind"]),
        subject=str(raw["subject"]),
        value=float(raw["value"]),
        threshold=float(raw["threshold"]),
        window_ms=float(raw["windowMs"]),
        first_seen=float(raw["firstSeen"]),
        last_seen=float(raw["lastSeen"]),
        count=int(raw["count"]),
        status=status,
        attempts=int(raw["attempts"]),
    )


def _checked_snapshot(raw: Any, start: float, end: float, bucket_ms: float) -> DashboardSnapshot:
    """The snapshot in an answer, or `StoreAnswerError` when the answer has another shape (a
    deployment running other functions): a failed call for the dashboard, never a 500."""
    try:
        return _snapshot(raw, start, end, bucket_ms)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise StoreAnswerError(f"dashboard:snapshot: {type(exc).__name__}: {exc}") from exc


def _range_args(start: float, end: float, bucket_ms: float) -> dict[str, Any]:
    return {"start": float(start), "end": float(end), "bucketMs": float(bucket_ms)}


def _snapshot(
    raw: Mapping[str, Any], start: float, end: float, bucket_ms: float
) -> DashboardSnapshot:
    refusals = raw["refusals"]
    shadows = raw.get("shadowRefusals") or {}  # absent from functions older than shadow rules
    return DashboardSnapshot(
        start=start,
        end=end,
        bucket_ms=bucket_ms,
        providers=tuple(
            ProviderSeries(
                provider=str(p["provider"]),
                requests=tuple(int(n) for n in p["requests"]),
                successes=tuple(int(n) for n in p["successes"]),
                tokens=int(p["tokens"]),
                cost=float(p["cost"]),
                latency_histogram=tuple(int(n) for n in p["latencyBuckets"]),
            )
            for p in raw["providers"]
        ),
        refusals={reason: int(refusals[reason]) for reason in REFUSAL_REASONS},
        bot_events={(e["type"], e["action"]): int(e["count"]) for e in raw["botEvents"]},
        bot_series=tuple(int(n) for n in raw["botSeries"]),
        auth_failures=tuple(int(n) for n in raw["authFailures"]),
        top_keys=tuple(
            KeyUsageSummary(
                id=str(k["id"]),
                name=str(k["name"]),
                prefix=str(k["prefix"]),
                kind=k["kind"],
                requests=int(k["requests"]),
                last_used=float(k["lastUsed"]) if k.get("lastUsed") is not None else None,
                active=bool(k["active"]),
            )
            for k in raw["topKeys"]
        ),
        truncated=bool(raw["truncated"]),
        shadow_refusals={reason: int(shadows.get(reason, 0)) for reason in REFUSAL_REASONS},
    )


__all__ = ["ConvexStore"]
