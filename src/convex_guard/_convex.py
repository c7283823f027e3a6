"""The shared store: a self-hosted Convex deployment, called over Convex's HTTP API."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Literal

import httpx
from pydantic import SecretStr

from ._errors import (
    ConfigurationError,
    ConvexAuthError,
    ConvexFunctionNotFoundError,
    ConvexValidationError,
    StoreError,
    StoreTimeoutError,
    StoreUnavailableError,
)
from ._limits import LimitConfig, LimitResult, _until_full, check_count
from ._settings import GuardEnvironment, load_environment
from ._store import (
    AIRequestLog,
    ApiKeyKind,
    ApiKeyRecord,
    AuthFailure,
    BotCheck,
    BotEvent,
    BotVerdict,
    CheckResult,
    EmbeddingRequestLog,
    EmbeddingUsage,
    KeyRateLimit,
    KeyUsage,
    LimitRequest,
    LogBatch,
    NewApiKey,
    ProviderStats,
)

DEFAULT_TIMEOUT = 2.0
Json = Any


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
    )


def _ai_log(row: AIRequestLog) -> dict[str, Any]:
    return _drop_none(
        {
            "timestamp": float(row.timestamp),
            "provider": row.provider,
            "model": row.model,
            "userId": row.user_id,
            "fingerprint": row.fingerprint,
            "ip": row.ip,
            "success": row.success,
            "error": row.error,
            "tokensUsed": float(row.tokens_used) if row.tokens_used is not None else None,
            "latencyMs": float(row.latency_ms),
            "cost": float(row.cost) if row.cost is not None else None,
        }
    )


def _embedding_log(row: EmbeddingRequestLog) -> dict[str, Any]:
    return _drop_none(
        {
            "requestId": row.request_id,
            "apiKeyHash": row.api_key_hash,
            "timestamp": float(row.timestamp),
            "batchSize": float(row.batch_size),
            "latencyMs": float(row.latency_ms),
            "tokensUsed": float(row.tokens_used),
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
        }
    )


def _key_usage(row: KeyUsage) -> dict[str, Any]:
    return {"keyId": row.key_id, "lastUsed": float(row.last_used), "requests": float(row.requests)}


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
    )


class ConvexStore:
    """State shared by every app instance, in a self-hosted Convex deployment.

    Calls the internal functions of `convex/` with the admin key, over one keep-alive HTTP
    connection pool; every call is bounded by `timeout` seconds. The hot path (`check`) is one
    mutation per request. Errors derive from `StoreError` and never include the admin key.
    """

    def __init__(
        self,
        url: str,
        admin_key: str | SecretStr,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"Convex URL must start with http:// or https://, got {url!r}")
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        key = admin_key if isinstance(admin_key, SecretStr) else SecretStr(admin_key)
        if not key.get_secret_value():
            raise ConfigurationError("The Convex admin key is empty")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._admin_key = key
        self._client = httpx.AsyncClient(
            base_url=self.url,
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
        # Imported here: the `convex` package loads a native extension we only need for Convex.
        from convex.values import convex_to_json, json_to_convex

        body = {"path": path, "format": "convex_encoded_json", "args": convex_to_json(dict(args))}
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
        if response.status_code in (401, 403):
            raise ConvexAuthError(
                f"Convex deployment {self.url} refused the admin key (HTTP {response.status_code})"
            )
        try:
            payload = response.json()
        except ValueError:
            raise StoreError(
                f"Convex {kind} {path}: HTTP {response.status_code}, not JSON"
            ) from None
        if response.status_code >= 400 or not isinstance(payload, dict):
            message = payload.get("message") if isinstance(payload, dict) else None
            raise self._error(kind, path, str(message or f"HTTP {response.status_code}"))
        if payload.get("status") == "success":
            return json_to_convex(payload["value"])
        raise self._error(kind, path, str(payload.get("errorMessage", "unknown error")))

    def _error(self, kind: str, path: str, message: str) -> StoreError:
        secret = self._admin_key.get_secret_value()
        message = message.replace(secret, "**********")[:500]
        lowered = message.lower()
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
    async def limit(
        self,
        name: str,
        config: LimitConfig,
        *,
        key: str | None = None,
        count: float = 1.0,
        reserve: bool = False,
    ) -> LimitResult:
        outcome = await self.check([LimitRequest(name, config, key, count, reserve)])
        return outcome.results[0]

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        for request in limits:
            check_count(request.name, request.config, request.count, request.reserve)
        args: dict[str, Any] = {"limits": [_limit_request(r) for r in limits]}
        if bot is not None:
            args["bot"] = _bot_check(bot)
        raw = await self._call("mutation", "guard:check", args)
        now = float(raw["now"])
        results = tuple(
            _limit_result(request.config, result, now)
            for request, result in zip(limits, raw["results"], strict=False)
        )
        verdict = None
        if raw.get("bot") is not None:
            verdict = BotVerdict(raw["bot"]["action"], int(raw["bot"]["previousEvents"]))
        return CheckResult(bool(raw["ok"]), results, verdict)

    async def reset(self, name: str, *, key: str | None = None) -> None:
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
        raw = await self._call(
            "query", "ai/analytics:getBotEvents", {"limit": float(limit), "since": float(since)}
        )
        return [_bot_event(row) for row in raw]

    # -- API keys -----------------------------------------------------------------------------
    async def create_api_key(self, key: NewApiKey) -> ApiKeyRecord:
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
            }
        )
        return _api_key(await self._call("mutation", "apiKeys:create", args))

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        raw = await self._call("query", "apiKeys:getByHash", {"keyHash": key_hash})
        return _api_key(raw) if raw is not None else None

    async def list_api_keys(
        self, *, kind: ApiKeyKind | None = None, owner: str | None = None
    ) -> list[ApiKeyRecord]:
        raw = await self._call("query", "apiKeys:list", _drop_none({"kind": kind, "owner": owner}))
        return [_api_key(row) for row in raw]

    async def update_api_key(
        self,
        key_id: str,
        *,
        active: bool | None = None,
        expires_at: float | None = None,
    ) -> ApiKeyRecord | None:
        raw = await self._call(
            "mutation",
            "apiKeys:update",
            _drop_none(
                {
                    "id": key_id,
                    "active": active,
                    "expiresAt": float(expires_at) if expires_at is not None else None,
                }
            ),
        )
        return _api_key(raw) if raw is not None else None

    # -- logs and analytics ---------------------------------------------------------------------
    async def write_logs(self, batch: LogBatch) -> None:
        await self._call(
            "mutation",
            "logs:writeBatch",
            {
                "batchId": batch.id,
                "aiRequests": [_ai_log(row) for row in batch.ai_requests],
                "embeddingRequests": [_embedding_log(row) for row in batch.embedding_requests],
                "authFailures": [_auth_failure(row) for row in batch.auth_failures],
                "botEvents": [_bot_event_json(row) for row in batch.bot_events],
                "keyUsage": [_key_usage(row) for row in batch.key_usage],
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
        """The most recent bot events, pushed by Convex whenever a new one is recorded."""
        async for raw in self._subscribe(
            "ai/analytics:getBotEvents", {"limit": float(limit), "since": float(since)}
        ):
            yield [_bot_event(row) for row in raw]

    async def _subscribe(self, path: str, args: dict[str, Any]) -> AsyncIterator[Any]:
        # The official client speaks Convex's sync protocol; its blocking `next()` holds the
        # GIL and stalls other threads, so it is consumed with `async for` only.
        from convex import ConvexClient

        client = ConvexClient(self.url)
        client.set_admin_auth(self._admin_key.get_secret_value())
        subscription = client.subscribe(path, args)
        try:
            async for value in subscription:
                yield value
        finally:
            # Cancelled while waiting for a value, the client's pending read holds the
            # subscription, and `unsubscribe()` would subscribe again first (blocking, with a
            # warning); dropping that read unsubscribes.
            if subscription.inner.exists():
                subscription.unsubscribe()

    async def close(self) -> None:
        await self._client.aclose()


def _provider_stats(raw: Mapping[str, Any]) -> ProviderStats:
    return ProviderStats(
        total_requests=int(raw["totalRequests"]),
        success_rate=float(raw["successRate"]),
        average_latency=float(raw["averageLatency"]),
        total_tokens=int(raw["totalTokens"]),
        total_cost=float(raw["totalCost"]),
    )


__all__ = ["ConvexStore"]
