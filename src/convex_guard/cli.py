"""The `convex-guard` command: manage API keys and read analytics from the deployment's store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import getpass
import importlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import IO, Any, NoReturn, cast

import httpx

from convex_guard import __version__
from convex_guard.alerts.deliver import alert_body
from convex_guard.core.crawlers import RANGES_ENV, CrawlerRanges, parse_range_file
from convex_guard.core.errors import (
    ConfigurationError,
    ConvexAuthError,
    ConvexFunctionNotFoundError,
    GuardError,
    StoreError,
)
from convex_guard.core.limits import DAY, HOUR, MINUTE, SECOND
from convex_guard.core.logs import printable
from convex_guard.core.presets import AI_PROVIDERS
from convex_guard.core.settings import load_environment, redact_url
from convex_guard.stores.base import (
    UNKNOWN_ACTOR,
    Alert,
    AlertStore,
    ApiKeyRecord,
    AuditEntry,
    AuditStore,
    AuditValue,
    BotEvent,
    KeyQuota,
    KeyRateLimit,
    ProviderStats,
    Store,
    dashboard_feed,
    require,
)
from convex_guard.stores.keys import ApiKeys, CreatedKey, KeyNotFoundError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
#: Ctrl-C (SIGINT): 128 + the signal's number, as shells report it.
EXIT_INTERRUPTED = 130

#: `watch --timeout`: seconds for the deployment to answer, and then for its first update.
DEFAULT_WATCH_TIMEOUT = 5.0
#: `bots update-ranges`: another origin for every operator URL (a mirror, a test server).
RANGES_BASE_ENV = "CONVEX_GUARD_RANGES_BASE_URL"
#: The largest range file `update-ranges` reads (Google's is about 30 kB).
MAX_RANGE_FILE = 4 * 1024 * 1024

NO_DEPLOYMENT = (
    "convex-guard: no Convex deployment configured; set CONVEX_SELF_HOSTED_URL (or CONVEX_URL) "
    "and CONVEX_SELF_HOSTED_ADMIN_KEY (the in-memory store does not outlive one process, so "
    "the CLI has nothing to talk to)"
)

_UNITS = {"ms": 1, "s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")

Clock = Callable[[], float]


class CliError(GuardError):
    """A problem the user can fix; printed as one line, with exit status `status`."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `1h`, `30d`, `1h30m` → milliseconds."""
    text = text.strip().lower()
    pos = 0
    total = 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text or total <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30s, 15m, 1h or 7d")
    return total


def parse_seconds(text: str) -> float:
    """`5`, `0.5` → seconds (positive, finite)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86_400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds such as 5 or 0.5")
    return seconds


def parse_rate_limit(text: str) -> KeyRateLimit:
    """`100/1m` → 100 requests per minute."""
    requests, sep, period = text.partition("/")
    if not sep or not requests.strip().isdigit() or int(requests) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate limit such as 100/1m")
    return KeyRateLimit(requests=int(requests), period=parse_duration(period))


def store_from_environment() -> Store:
    """The deployment's store, from `CONVEX_SELF_HOSTED_URL`/`CONVEX_URL` and the admin key.

    `ConvexStore` is imported only here, so the rest of the CLI (and its tests) need no Convex.
    """
    try:
        env = load_environment()
    except ConfigurationError as exc:
        raise CliError(f"convex-guard: {exc}", EXIT_USAGE) from None
    if env.deployment_url is None:
        raise CliError(NO_DEPLOYMENT, EXIT_USAGE)
    if env.convex_self_hosted_admin_key is None:
        raise CliError(
            "convex-guard: CONVEX_SELF_HOSTED_ADMIN_KEY is not set; the store's functions are "
            "internal and need the admin key",
            EXIT_USAGE,
        )
    try:
        module = importlib.import_module("convex_guard.stores.convex")
        factory = module.ConvexStore
    except (ImportError, AttributeError):
        raise CliError(
            "convex-guard: this installation has no ConvexStore (convex_guard.stores.convex); "
            "upgrade convex-guard to talk to a deployment",
            EXIT_USAGE,
        ) from None
    return cast(Store, factory.from_env())


# -- formatting --------------------------------------------------------------------------------
def _when(ms: float | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _span(ms: float) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms >= _UNITS[unit] and ms % _UNITS[unit] == 0:
            return f"{int(ms // _UNITS[unit])}{unit}"
    return f"{ms / 1000:g}s"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) for row in rows)
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def _key_json(record: ApiKeyRecord) -> dict[str, object]:
    return {
        "id": record.id,
        "kind": record.kind,
        "prefix": record.prefix,
        "name": record.name,
        "owner": record.owner,
        "scopes": list(record.scopes),
        "rateLimit": (
            None
            if record.rate_limit is None
            else {"requests": record.rate_limit.requests, "period": record.rate_limit.period}
        ),
        "createdAt": record.created_at,
        "expiresAt": record.expires_at,
        "lastUsed": record.last_used,
        "requestCount": record.request_count,
        "active": record.active,
    }


def _status(record: ApiKeyRecord, now: float) -> str:
    if not record.active:
        return "revoked"
    if record.expires_at is not None and now >= record.expires_at:
        return "expired"
    return "active"


def _keys_table(records: Sequence[ApiKeyRecord], now: float) -> str:
    rows = [
        [
            r.id,
            r.kind,
            r.prefix + "…",
            r.name,
            r.owner or "-",
            ",".join(r.scopes) or "-",
            "-"
            if r.rate_limit is None
            else f"{r.rate_limit.requests}/{_span(r.rate_limit.period)}",
            _status(r, now),
            _when(r.expires_at),
            _when(r.last_used),
            r.request_count,
        ]
        for r in records
    ]
    headers = ["ID", "KIND", "PREFIX", "NAME", "OWNER", "SCOPES", "LIMIT", "STATUS"]
    return table([*headers, "EXPIRES", "LAST USED", "REQUESTS"], rows)


def _bot(event: BotEvent) -> str:
    """`ai_crawler GPTBot`: what the user-agent was taken for (`-` for an event without it,
    such as a rate-limit escalation)."""
    meta = event.metadata or {}
    text = f"{meta.get('category') or ''} {meta.get('agent') or ''}".strip()
    return printable(text, 40) or "-"


def _verification(event: BotEvent) -> str:
    """`verified googlebot`, `spoofed claudebot`, or `-` for an event with no claim checked."""
    meta = event.metadata or {}
    status = meta.get("verification")
    if not status:
        return "-"
    return printable(f"{status} {meta.get('verifiedName') or ''}".strip(), 40)


def update_ranges(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Fetch every crawler's range file again and write the data file bot detection reads.

    One line per crawler; a file that cannot be fetched or read keeps the prefixes it had
    (the command then exits 1). The file is replaced whole (written beside it, renamed).
    """
    output = args.output or os.environ.get(RANGES_ENV)
    if not output:
        raise CliError(
            f"convex-guard: give --output, or set {RANGES_ENV} (the file bot detection reads)",
            EXIT_USAGE,
        )
    base = (args.base_url or os.environ.get(RANGES_BASE_ENV) or "").rstrip("/")
    current = CrawlerRanges.load(output) if os.path.exists(output) else CrawlerRanges.load()
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    entries: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    failed = 0
    with httpx.Client(timeout=args.timeout, follow_redirects=True) as client:
        for crawler in current.crawlers:
            entry: dict[str, Any] = {
                "name": crawler.name,
                "operator": crawler.operator,
                "agents": list(crawler.agents),
                "url": crawler.url,
                "reverse_dns": list(crawler.reverse_dns),
                "created": crawler.created,
                "prefixes": list(crawler.prefixes),
                "retrieved": dict(crawler.retrieved),
            }
            entries.append({k: v for k, v in entry.items() if v not in (None, [], {})})
            if crawler.url is None:
                rows.append([crawler.name, 0, "-", "reverse DNS only"])
                continue
            url = crawler.url
            if base:
                parts = httpx.URL(url)
                url = base + parts.raw_path.decode("ascii")
            try:
                response = client.get(url)
                response.raise_for_status()
                if len(response.content) > MAX_RANGE_FILE:
                    raise ValueError(f"larger than {MAX_RANGE_FILE} bytes")
                created, prefixes = parse_range_file(response.json())
                if not prefixes:
                    raise ValueError("no prefixes")
            except Exception as exc:
                failed += 1
                why = printable(redact_url(str(exc)) or type(exc).__name__, 80)
                rows.append([crawler.name, len(crawler.prefixes), crawler.created or "-", why])
                continue
            entries[-1].update(
                created=created,
                prefixes=prefixes,
                retrieved={"url": url, "date": today},
            )
            entries[-1] = {k: v for k, v in entries[-1].items() if v is not None}
            rows.append([crawler.name, len(prefixes), created or "-", "updated"])
    if failed == len([c for c in current.crawlers if c.url]):
        print(table(["CRAWLER", "PREFIXES", "CREATED", "STATUS"], rows), file=out)
        raise CliError("convex-guard: no range file could be fetched; nothing written")
    data = {
        "description": "Crawler ranges written by `convex-guard bots update-ranges`.",
        "date": today,
        "crawlers": entries,
    }
    CrawlerRanges.from_json(data)  # what bot detection will read must parse
    temporary = f"{output}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(temporary, output)
    print(table(["CRAWLER", "PREFIXES", "CREATED", "STATUS"], rows), file=out)
    print(f"convex-guard: wrote {output}", file=err)
    return EXIT_ERROR if failed else EXIT_OK


def _event_json(event: BotEvent) -> dict[str, object]:
    return {
        "timestamp": event.timestamp,
        "fingerprint": event.fingerprint,
        "ip": event.ip,
        "userAgent": event.user_agent,
        "detectionType": event.detection_type,
        "action": event.action,
        "metadata": dict(event.metadata or {}),
    }


# -- the audit trail ---------------------------------------------------------------------------
def default_actor() -> str:
    """Who the key commands record as the actor without `--actor`: `user@host`, as the OS
    names them (`unknown` for a part it cannot tell, e.g. a container without a user)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name, no $USER: getuser raises OSError or KeyError
        user = UNKNOWN_ACTOR
    return f"{user or UNKNOWN_ACTOR}@{socket.gethostname() or UNKNOWN_ACTOR}"


_AUDIT_JSON_FIELDS = {"rate_limit": "rateLimit", "expires_at": "expiresAt"}


def _audit_json_value(value: AuditValue) -> object:
    if isinstance(value, KeyRateLimit):
        return {"requests": value.requests, "period": value.period}
    if isinstance(value, tuple):
        return [
            {"unit": v.unit, "amount": v.amount, "period": v.period}
            if isinstance(v, KeyQuota)
            else v
            for v in value
        ]
    return value


def _audit_json(entry: AuditEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "timestamp": entry.timestamp,
        "action": entry.action,
        "keyId": entry.record,
        "actor": entry.actor,
        "related": entry.related,
        "changes": [
            {
                "field": _AUDIT_JSON_FIELDS.get(c.field, c.field),
                "before": _audit_json_value(c.before),
                "after": _audit_json_value(c.after),
            }
            for c in entry.changes
        ],
    }


def _audit_text(field: str, value: AuditValue) -> str:
    if value is None:
        return "-"
    if isinstance(value, KeyRateLimit):
        return f"{value.requests}/{_span(value.period)}"
    if isinstance(value, tuple):
        return (
            ",".join(
                f"{v.amount:g} {v.unit}/{_span(v.period)}" if isinstance(v, KeyQuota) else v
                for v in value
            )
            or "-"
        )
    if isinstance(value, bool):
        return str(value).lower()
    if field == "expires_at" and isinstance(value, int | float):
        return _when(value)
    return str(value)


def _audit_changes(entry: AuditEntry) -> str:
    parts = []
    for c in entry.changes:
        if c.before is None and entry.action == "key.created":
            parts.append(f"{c.field}={_audit_text(c.field, c.after)}")
        else:
            before, after = _audit_text(c.field, c.before), _audit_text(c.field, c.after)
            parts.append(f"{c.field}: {before} -> {after}")
    if entry.related is not None:
        parts.append(("replaces " if entry.action == "key.created" else "by ") + entry.related)
    return "; ".join(parts) or "-"


# -- commands ----------------------------------------------------------------------------------
class _Cli:
    def __init__(self, store: Store, clock: Clock, out: IO[str], err: IO[str]) -> None:
        self.store = store
        self.clock = clock
        self.out = out
        self.err = err

    @functools.cached_property
    def keys(self) -> ApiKeys:
        # Built when a key command runs: the other commands need no audit trail of the store.
        return ApiKeys(self.store, clock=self.clock)

    def emit(self, text: str) -> None:
        print(text, file=self.out)

    def emit_json(self, value: object) -> None:
        print(json.dumps(value, indent=2, sort_keys=True), file=self.out)

    def _created(self, created: CreatedKey, args: argparse.Namespace, verb: str) -> None:
        if args.json:
            self.emit_json({**_key_json(created.record), "key": created.key})
            return
        self.emit(_keys_table([created.record], self.clock()))
        self.emit("")
        self.emit(f"API key ({verb}): {created.key}")
        print("Store it now: it is not kept and cannot be shown again.", file=self.err)

    async def keys_create(self, args: argparse.Namespace) -> int:
        lifetime: float | None = None if args.no_expiry else args.expires_in
        created = await self.keys.create(
            args.name,
            kind=args.kind,
            owner=args.owner,
            scopes=args.scope or (),
            rate_limit=args.rate_limit,
            lifetime=lifetime,
            actor=args.actor or default_actor(),
        )
        self._created(created, args, "created")
        return EXIT_OK

    async def keys_list(self, args: argparse.Namespace) -> int:
        records = await self.keys.list(kind=args.kind, owner=args.owner)
        records.sort(key=lambda r: r.created_at)
        if args.json:
            self.emit_json([_key_json(r) for r in records])
        else:
            self.emit(_keys_table(records, self.clock()))
        return EXIT_OK

    async def keys_revoke(self, args: argparse.Namespace) -> int:
        record = await self.keys.revoke(args.key_id, actor=args.actor or default_actor())
        if args.json:
            self.emit_json(_key_json(record))
        else:
            self.emit(f"Revoked {record.id} ({record.name}).")
        return EXIT_OK

    async def keys_rotate(self, args: argparse.Namespace) -> int:
        created = await self.keys.rotate(
            args.key_id, grace=args.grace, actor=args.actor or default_actor()
        )
        old = await self.keys.get(args.key_id)
        if args.json:
            self.emit_json(
                {
                    **_key_json(created.record),
                    "key": created.key,
                    "replaces": old.id,
                    "oldKeyExpiresAt": old.expires_at,
                }
            )
            return EXIT_OK
        self._created(created, args, f"replaces {old.id}")
        self.emit(f"The old key keeps working until {_when(old.expires_at)}.")
        return EXIT_OK

    async def audit_list(self, args: argparse.Namespace) -> int:
        try:
            require(self.store, (AuditStore,), "audit")
        except ConfigurationError:
            raise CliError(
                f"convex-guard: the store {type(self.store).__name__} keeps no audit trail"
            ) from None
        store = cast(AuditStore, self.store)
        since = 0.0 if args.since is None else self.clock() - args.since
        entries = await store.audit_entries(since=since, record=args.key, limit=args.limit)
        if args.json:
            self.emit_json([_audit_json(e) for e in entries])
            return EXIT_OK
        rows = [
            [_when(e.timestamp), e.action, e.record, e.actor, _audit_changes(e)] for e in entries
        ]
        self.emit(table(["TIME", "ACTION", "KEY", "ACTOR", "CHANGES"], rows))
        return EXIT_OK

    async def stats_providers(self, args: argparse.Namespace) -> int:
        end = self.clock()
        start = end - args.since
        providers = args.provider or list(AI_PROVIDERS)
        stats = [await self.store.provider_stats(p, start, end) for p in providers]
        if args.json:
            self.emit_json(
                {
                    "start": start,
                    "end": end,
                    "providers": {
                        p: {
                            "totalRequests": s.total_requests,
                            "successRate": s.success_rate,
                            "averageLatency": s.average_latency,
                            "totalTokens": s.total_tokens,
                            "totalCost": s.total_cost,
                        }
                        for p, s in zip(providers, stats, strict=True)
                    },
                }
            )
            return EXIT_OK
        rows = [
            [
                p,
                s.total_requests,
                f"{s.success_rate * 100:.1f}%",
                f"{s.average_latency:.1f}",
                s.total_tokens,
                f"{s.total_cost:.4f}",
            ]
            for p, s in zip(providers, stats, strict=True)
        ]
        self.emit(f"Since {_when(start)} ({_span(args.since)}):")
        self.emit(
            table(["PROVIDER", "REQUESTS", "SUCCESS", "AVG MS", "TOKENS", "COST"], rows),
        )
        return EXIT_OK

    async def bots_recent(self, args: argparse.Namespace) -> int:
        events = await self.store.bot_events(since=self.clock() - args.since, limit=args.limit)
        if args.json:
            self.emit_json([_event_json(e) for e in events])
            return EXIT_OK
        rows = [
            [
                _when(e.timestamp),
                e.detection_type,
                e.action,
                _bot(e),
                e.ip,
                e.fingerprint[:16],
                printable(e.user_agent, 60) or "-",
                _verification(e),
                printable((e.metadata or {}).get("evidence") or "-", 80),
            ]
            for e in events
        ]
        headers = ["TIME", "TYPE", "ACTION", "BOT", "IP", "FINGERPRINT", "USER AGENT", "VERIFIED"]
        self.emit(table([*headers, "EVIDENCE"], rows))
        return EXIT_OK

    async def alerts_recent(self, args: argparse.Namespace) -> int:
        if not isinstance(self.store, AlertStore):
            raise CliError(f"convex-guard: the store {type(self.store).__name__} keeps no alerts")
        alerts = await self.store.alerts(since=self.clock() - args.since, limit=args.limit)
        if args.json:
            self.emit_json([_alert_json(a) for a in alerts])
            return EXIT_OK
        rows = [
            [
                _when(a.last_seen),
                a.kind,
                a.subject[:48],
                f"{a.value:g} > {a.threshold:g}",
                _span(a.window_ms),
                a.count,
                a.status,
            ]
            for a in alerts
        ]
        self.emit(
            table(["LAST SEEN", "KIND", "SUBJECT", "VALUE", "WINDOW", "COUNT", "STATUS"], rows)
        )
        return EXIT_OK

    async def watch_live(self, args: argparse.Namespace) -> int:
        """Provider stats and recent bot events, reprinted whenever Convex pushes a change.

        The deployment must answer within `--timeout` seconds, and then send its first
        update within as many again: else one line and exit 1, never a silent wait (the
        Convex client would retry an unreachable URL forever).
        """
        watch_stats = getattr(self.store, "watch_provider_stats", None)
        watch_bots = getattr(self.store, "watch_bot_events", None)
        if watch_stats is None or watch_bots is None:
            raise CliError("convex-guard: watch needs a Convex deployment (live subscriptions)")
        where = redact_url(str(getattr(self.store, "url", "the deployment")))
        await self._check_deployment(where, args.timeout)
        start = self.clock() - args.since
        end = self.clock() + 365 * DAY  # open-ended: rows written from now on count too
        providers = args.provider or list(AI_PROVIDERS)
        stats: dict[str, ProviderStats] = {}
        events: list[BotEvent] = []
        updates: asyncio.Queue[None] = asyncio.Queue()

        async def follow_stats(provider: str) -> None:
            async for value in watch_stats(provider, start, end):
                stats[provider] = value
                updates.put_nowait(None)

        async def follow_bots() -> None:
            nonlocal events
            async for value in watch_bots(since=start, limit=args.limit):
                events = value
                updates.put_nowait(None)

        async def next_update() -> None:
            """The next push; a subscription that ends or fails ends the watch, in one line."""
            pushed = asyncio.ensure_future(updates.get())
            done, _ = await asyncio.wait({pushed, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            if pushed in done:
                return
            pushed.cancel()
            failure = next(iter(done)).exception()
            reason = f": {type(failure).__name__}: {failure}" if failure is not None else ""
            raise CliError(f"convex-guard: the subscription to {where} ended{reason}")

        no_update = (
            f"convex-guard: no update from {where} within {args.timeout:g} s "
            "(its WebSocket sync endpoint does not answer)"
        )
        shown = 0
        tasks = [asyncio.create_task(follow_stats(p)) for p in providers]
        tasks.append(asyncio.create_task(follow_bots()))
        try:
            while args.count is None or shown < args.count:
                if shown == 0:
                    with _deadline(args.timeout, no_update):
                        try:
                            await asyncio.wait_for(next_update(), args.timeout)
                        except TimeoutError:
                            raise CliError(no_update) from None
                else:
                    await next_update()
                await asyncio.sleep(0.05)  # coalesce the pushes of one change
                while not updates.empty():
                    updates.get_nowait()
                self._show_live(args, providers, stats, events)
                shown += 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return EXIT_OK

    async def _check_deployment(self, where: str, seconds: float) -> None:
        """Fail in one line unless a Convex deployment with our functions answers in time.

        `GET /version` (every Convex backend answers it) tells a deployment from anything
        else; one query then shows the functions are deployed and the admin key accepted.
        """
        url = getattr(self.store, "url", None)
        if isinstance(url, str):
            try:
                # A whole-step bound: httpx's timeout is per read, a trickle would outlive it.
                async with asyncio.timeout(seconds), httpx.AsyncClient(timeout=seconds) as client:
                    response = await client.get(url.rstrip("/") + "/version")
            except (TimeoutError, httpx.TimeoutException):
                raise CliError(
                    f"convex-guard: {where} did not answer within {seconds:g} s"
                ) from None
            except httpx.HTTPError as exc:
                raise CliError(
                    f"convex-guard: cannot reach {where} ({type(exc).__name__})"
                ) from None
            if response.status_code != 200:
                raise CliError(
                    f"convex-guard: {where} is not a Convex deployment "
                    f"(GET /version answered HTTP {response.status_code})"
                )
        try:
            await asyncio.wait_for(self.store.bot_events(since=self.clock(), limit=1), seconds)
        except TimeoutError:
            raise CliError(f"convex-guard: {where} did not answer within {seconds:g} s") from None
        except ConvexFunctionNotFoundError:
            raise CliError(
                f"convex-guard: {where} lacks convex-guard's functions: deploy convex/ to it"
            ) from None
        except ConvexAuthError:
            raise CliError(
                f"convex-guard: {where} refused the admin key (CONVEX_SELF_HOSTED_ADMIN_KEY)"
            ) from None
        except StoreError as exc:
            raise CliError(
                f"convex-guard: {where} is not a Convex deployment with convex-guard's "
                f"functions ({exc})"
            ) from None

    def _show_live(
        self,
        args: argparse.Namespace,
        providers: Sequence[str],
        stats: dict[str, ProviderStats],
        events: Sequence[BotEvent],
    ) -> None:
        if args.json:
            print(
                json.dumps(
                    {
                        "at": self.clock(),
                        "providers": {
                            p: {"totalRequests": s.total_requests, "successRate": s.success_rate}
                            for p, s in stats.items()
                        },
                        "botEvents": [_event_json(e) for e in events],
                    },
                    sort_keys=True,
                ),
                file=self.out,
                flush=True,
            )
            return
        rows = [
            [p, s.total_requests, f"{s.success_rate * 100:.1f}%", f"{s.average_latency:.1f}"]
            for p in providers
            if (s := stats.get(p)) is not None
        ]
        self.emit(f"-- {_when(self.clock())}")
        self.emit(table(["PROVIDER", "REQUESTS", "SUCCESS", "AVG MS"], rows))
        bot_rows = [[_when(e.timestamp), e.detection_type, e.action, e.ip] for e in events]
        self.emit(table(["TIME", "TYPE", "ACTION", "IP"], bot_rows))
        self.out.flush()

    # -- the dashboard ------------------------------------------------------------------------
    async def dashboard_serve(self, args: argparse.Namespace) -> int:
        """Serve the dashboard (convex_guard.dashboard) until Ctrl-C.

        The address goes to stderr once the server listens, with the token in it when the
        token was generated (a token you pass is yours to hand on); never the admin key.
        """
        try:
            import uvicorn

            from convex_guard.dashboard import app as dashboard_app
        except ImportError:
            raise CliError(
                "convex-guard: the dashboard needs uvicorn: pip install 'convex-guard[dashboard]'",
                EXIT_USAGE,
            ) from None
        where = redact_url(str(getattr(self.store, "url", "the store")))
        if dashboard_feed(self.store) is not None:
            # The Convex client blocks the event loop while it connects: be sure it can.
            await self._check_deployment(where, DEFAULT_WATCH_TIMEOUT)
        given = args.token or os.environ.get("CONVEX_GUARD_DASHBOARD_TOKEN") or None
        try:
            board = dashboard_app(cast(Any, self.store), token=given, window=args.window)
        except ValueError as exc:
            raise CliError(f"convex-guard: {exc}", EXIT_USAGE) from None
        server = uvicorn.Server(
            # An open page holds an event stream: Ctrl-C waits for it 2 s at most.
            uvicorn.Config(
                board,
                host=args.host,
                port=args.port,
                log_level="warning",
                timeout_graceful_shutdown=2,
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                await serving
                raise CliError(f"convex-guard: could not listen on {args.host}:{args.port}")
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        url = f"http://{host}:{port}/"
        if given is None:
            url += f"?token={board.token}"
        print(f"convex-guard: dashboard of {where} at {url}", file=self.err, flush=True)
        await serving
        return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convex-guard",
        description="Manage API keys and read request and bot analytics from the Convex "
        "deployment named by CONVEX_SELF_HOSTED_URL / CONVEX_SELF_HOSTED_ADMIN_KEY.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def command(parent: Any, name: str, help: str) -> argparse.ArgumentParser:
        sub = cast(argparse.ArgumentParser, parent.add_parser(name, help=help, description=help))
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sub

    keys = groups.add_parser("keys", help="create, list, revoke and rotate API keys")
    key_commands = keys.add_subparsers(dest="command", required=True, metavar="ACTION")
    create = command(key_commands, "create", "create a key (printed once, never stored)")
    create.add_argument("--name", required=True)
    create.add_argument("--owner", help="the user id requests with this key are attributed to")
    create.add_argument("--kind", choices=["ai", "embedding"], default="ai")
    create.add_argument("--scope", action="append", help="a granted scope (repeatable)")
    create.add_argument(
        "--rate-limit", type=parse_rate_limit, metavar="N/PERIOD", help="e.g. 100/1m"
    )
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", type=parse_duration, default=30 * DAY, metavar="DURATION", help="30d"
    )
    expiry.add_argument("--no-expiry", action="store_true")
    listing = command(key_commands, "list", "list keys (never the keys themselves)")
    listing.add_argument("--kind", choices=["ai", "embedding"])
    listing.add_argument("--owner")
    revoke = command(key_commands, "revoke", "deactivate a key now")
    revoke.add_argument("key_id")
    rotate = command(key_commands, "rotate", "replace a key; the old one works for --grace")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", type=parse_duration, default=DAY, metavar="DURATION")
    for changing in (create, revoke, rotate):
        changing.add_argument(
            "--actor",
            help="who the audit trail records as making the change (default: user@host)",
        )

    audit = command(groups, "audit", "the audit trail of key changes, the most recent first")
    audit.set_defaults(command="list")
    audit.add_argument(
        "--since", type=parse_duration, metavar="DURATION", help="only this recent (default: all)"
    )
    audit.add_argument("--key", metavar="ID", help="only the changes of this key (its id)")
    audit.add_argument("--limit", type=int, default=50)

    stats = groups.add_parser("stats", help="request analytics")
    stats_commands = stats.add_subparsers(dest="command", required=True, metavar="REPORT")
    providers = command(stats_commands, "providers", "requests, success, latency, tokens, cost")
    providers.add_argument("--since", type=parse_duration, default=HOUR, metavar="DURATION")
    providers.add_argument("--provider", action="append", help="only these (repeatable)")

    bots = groups.add_parser("bots", help="bot detection events")
    bot_commands = bots.add_subparsers(dest="command", required=True, metavar="REPORT")
    recent = command(bot_commands, "recent", "the most recent bot events first")
    recent.add_argument("--since", type=parse_duration, default=HOUR, metavar="DURATION")
    recent.add_argument("--limit", type=int, default=50)
    ranges = bot_commands.add_parser(
        "update-ranges",
        help="fetch the crawlers' published address ranges again",
        description="Fetch every crawler's published range file (Google, Bing, Apple, OpenAI, "
        "Perplexity, Anthropic, DuckDuckGo) and write the file bot detection reads "
        f"(${RANGES_ENV}).",
    )
    ranges.add_argument("--output", help=f"the file to write (default: ${RANGES_ENV})")
    ranges.add_argument(
        "--base-url",
        help=f"fetch every file from this origin instead (a mirror; default: ${RANGES_BASE_ENV})",
    )
    ranges.add_argument("--timeout", type=parse_seconds, default=10.0, metavar="SECONDS")

    alerts = command(groups, "alerts", "recent anomaly alerts, the most recently seen first")
    alerts.set_defaults(command="recent")
    alerts.add_argument("--since", type=parse_duration, default=HOUR, metavar="DURATION")
    alerts.add_argument("--limit", type=int, default=50)

    watch = command(groups, "watch", "provider stats and bot events, pushed live by Convex")
    watch.set_defaults(command="live")
    watch.add_argument("--since", type=parse_duration, default=HOUR, metavar="DURATION")
    watch.add_argument("--provider", action="append", help="only these (repeatable)")
    watch.add_argument("--limit", type=int, default=10, help="bot events shown")
    watch.add_argument("--count", type=int, help="stop after this many updates")
    watch.add_argument(
        "--timeout",
        type=parse_seconds,
        default=DEFAULT_WATCH_TIMEOUT,
        metavar="SECONDS",
        help="give up (exit 1) when the deployment does not answer, or then send its first "
        f"update, within this (default {DEFAULT_WATCH_TIMEOUT:g}); Ctrl-C exits with 130",
    )
    board = groups.add_parser(
        "dashboard",
        help="serve a live dashboard of the deployment's analytics",
        description="Serve a live dashboard (charts, pushed by Convex) of the deployment's "
        "requests, refusals, bot events, auth failures and keys.",
    )
    board.set_defaults(command="serve")
    board.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    board.add_argument("--port", type=int, default=8050, help="port to listen on (8050)")
    board.add_argument(
        "--token",
        help="the token the page asks for (default: $CONVEX_GUARD_DASHBOARD_TOKEN, else one "
        "is generated and printed with the address)",
    )
    board.add_argument("--window", type=parse_duration, default=HOUR, metavar="DURATION", help="1h")
    return parser


class _DeadlinePassed(KeyboardInterrupt):
    """Raised by SIGALRM in the main thread when a deadline passes; carries the line to print.

    A `KeyboardInterrupt`, so that asyncio lets it out of whatever task it lands in at once,
    as it does Ctrl-C.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@contextlib.contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """Interrupt the main thread after `seconds`, even inside a native call holding the GIL.

    The official Convex client's `subscribe` blocks the thread (GIL held) until it has
    connected, retrying an unreachable deployment forever; it runs Python's signal handlers
    once a second meanwhile, so a SIGALRM handler that raises gets it out. Elsewhere than the
    main thread signals cannot be used, and the asyncio timeout alone bounds the wait.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        yield
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise _DeadlinePassed(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _interrupt_at_once() -> Iterator[None]:
    """The first Ctrl-C raises `KeyboardInterrupt` wherever the main thread is.

    `asyncio.run` replaces Python's default handler with one that only cancels the main task
    on the first Ctrl-C, which cannot happen while the Convex client blocks the thread: that
    Ctrl-C went unheard. A handler of our own keeps asyncio from installing its one.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _alert_json(alert: Alert) -> dict[str, Any]:
    """An alert as `alerts --json` prints it: what the webhook gets, and its delivery state."""
    body = alert_body(alert)
    del body["source"]
    return {**body, "status": alert.status, "attempts": alert.attempts}


def scrub(text: str) -> str:
    """`text` fit to print: URLs without their userinfo, the admin key masked."""
    text = redact_url(text)
    admin_key = os.environ.get("CONVEX_SELF_HOSTED_ADMIN_KEY", "").strip()
    if admin_key:
        text = text.replace(admin_key, "**********")
    return text


async def _run(args: argparse.Namespace, cli: _Cli) -> int:
    handler = getattr(cli, f"{args.group}_{args.command}")
    try:
        return cast(int, await handler(args))
    finally:
        await cli.store.close()


def main(
    argv: Sequence[str] | None = None,
    *,
    store: Store | None = None,
    clock: Clock | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the CLI; `store` and `clock` are injectable, for tests and embedding.

    Every problem is one line on stderr (URLs without credentials, never the admin key) and
    exit status 1, or 2 for usage and configuration; Ctrl-C exits at once with 130, without
    a traceback.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    if getattr(args, "limit", 1) < 1:
        print("convex-guard: --limit must be at least 1", file=err)
        return EXIT_USAGE

    def fail(message: str, status: int) -> int:
        print(scrub(" ".join(message.split())), file=err)
        return status

    try:
        if args.group == "bots" and args.command == "update-ranges":
            return update_ranges(args, out, err)  # needs no store
        if store is None:
            store = store_from_environment()
        cli = _Cli(store, clock or (lambda: time.time() * 1000.0), out, err)
        with _interrupt_at_once():
            return asyncio.run(_run(args, cli))
    except _DeadlinePassed as exc:
        return fail(exc.message, EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except CliError as exc:
        return fail(str(exc), exc.status)
    except KeyNotFoundError as exc:
        return fail(f"convex-guard: {exc}", EXIT_ERROR)
    except ConfigurationError as exc:
        return fail(f"convex-guard: {exc}", EXIT_USAGE)
    except GuardError as exc:
        return fail(f"convex-guard: {exc}", EXIT_ERROR)
    except Exception as exc:  # a transport error from the store: one line, not a traceback
        return fail(f"convex-guard: the store failed: {type(exc).__name__}: {exc}", EXIT_ERROR)


def entry() -> NoReturn:
    """The console script (and `python -m convex_guard.cli`): `main()`'s status, at once.

    The process ends without the interpreter's shutdown: after `watch` the official Convex
    client's native threads and its abandoned subscription are still alive, and a normal
    shutdown interleaved with them sometimes aborts ("Fatal Python error") or warns on stderr
    instead of exiting quietly with the status. Everything printed is flushed first.
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
