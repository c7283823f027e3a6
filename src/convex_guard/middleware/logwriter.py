"""The buffered log writer every middleware shares: rows go to the store in batches, never one
write per request, and survive a store outage in order."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol, cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convex_guard.core.errors import ConfigurationError, ConvexValidationError
from convex_guard.core.limits import MINUTE
from convex_guard.core.logs import ThrottledLog, logger
from convex_guard.stores.base import (
    AIRequestLog,
    AuthFailure,
    BotEvent,
    EmbeddingRequestLog,
    KeyUsage,
    LogBatch,
    LogStore,
    Settlement,
    require,
)

Row = AIRequestLog | EmbeddingRequestLog | AuthFailure | BotEvent | Settlement

DEFAULT_BATCH_SIZE = 100
DEFAULT_INTERVAL = 1.0
DEFAULT_MAX_BUFFER = 10_000
DEFAULT_MAX_BACKOFF = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
_FIRST_BACKOFF = 0.05
#: What a store raises for a batch it can never accept (a bad value in some row), as opposed
#: to a store it cannot reach: the batch is split to find that row, not retried as it is.
#: ValueError, OverflowError and TypeError come from serialising a row (`float(10**400)`).
INVALID_BATCH_ERRORS: tuple[type[Exception], ...] = (
    ConvexValidationError,
    ValueError,
    OverflowError,
    TypeError,
)


class Companion(Protocol):
    """A service that runs beside the writer (the alert deliverer): started with it at lifespan
    start-up, closed after its last flush at shutdown."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class CompanionFactory(Protocol):
    """What `GuardSettings(alerts=…)` takes (`convex_guard.alerts.AlertSettings`): it builds
    its companion over the guard's store. Typed here so the middleware imports nothing of it."""

    def attach(self, store: object) -> Companion: ...


class LogWriter:
    """Buffers log rows and writes them as one `LogBatch` per flush.

    Rows include the rate limiter's `Settlement`s (token and cost reservations corrected by
    what each request used): they ride in the batches with the request rows, so settling a
    request costs no store call of its own.

    Sharing: one writer per store. `LogWriter.for_store(store)` returns that writer (creating
    it on first use), and every middleware given only a store uses it, so the request logger,
    the API key middleware and the bot middleware fill the same batches. Pass an explicit
    writer instead to choose its sizes.

    Lifecycle: a background task flushes every `interval` seconds, or sooner when
    `batch_size` rows wait. The middlewares start it at ASGI lifespan startup and `close()` it
    at shutdown (flushing everything first); without lifespan it starts on the first row, and
    the app must `await writer.close()` itself at exit, or up to `interval` seconds of rows
    are lost with the process.

    Failure: a batch the store cannot take now (unreachable, timed out, circuit open, or any
    error not listed below) is retried, with the same `id` (the store dedupes, so a retry
    after a lost answer lands once), with exponential backoff capped at `max_backoff`
    seconds; later rows wait behind it, so order is kept. A batch refused as invalid (one of
    `INVALID_BATCH_ERRORS`: a row the store will never accept) is split in halves, each with
    a new `id` (the refused batch wrote nothing), until the bad row is alone; that row is
    dropped, counted in `rejected` and reported by a throttled warning, and every other row
    is written. The buffer holds at most `max_buffer` rows; rows that arrive when it is full
    are dropped, counted in `dropped`, and reported by a throttled warning.

    Not thread-safe: use it from one event loop at a time (the ASGI server's).
    """

    _shared: ClassVar[weakref.WeakKeyDictionary[Any, LogWriter]] = weakref.WeakKeyDictionary()

    def __init__(
        self,
        store: LogStore,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        interval: float = DEFAULT_INTERVAL,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ) -> None:
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        if max_buffer < batch_size:
            raise ConfigurationError("max_buffer must be at least batch_size")
        for name, value in (
            ("interval", interval),
            ("max_backoff", max_backoff),
            ("shutdown_timeout", shutdown_timeout),
        ):
            if not 0 < value < float("inf"):
                raise ConfigurationError(f"{name} must be a positive number of seconds")
        require(store, (LogStore,), "LogWriter")
        self.store = store
        self.batch_size = batch_size
        self.interval = interval
        self.max_buffer = max_buffer
        self.max_backoff = max_backoff
        self.shutdown_timeout = shutdown_timeout
        #: Rows dropped because the buffer was full (or still unwritten at a timed-out close).
        self.dropped = 0
        #: Rows the store refused as invalid (each dropped alone, the rest of its batch written).
        self.rejected = 0
        #: Batches the store accepted; for tests and health checks.
        self.batches_written = 0
        self._rows: list[Row] = []
        # How many buffered rows are not AI request rows: with none (the common case), a
        # batch is a slice of the buffer, no row looked at one by one.
        self._others = 0
        # Per key and minute of use: a flush spanning a minute's end counts each use in its own
        # minute, as the dashboard's per-key rollups bucket them.
        self._usage: dict[tuple[str, int], KeyUsage] = {}
        # Taken from the buffer, not yet accepted, in order: one batch, or the parts of one
        # being split (kept here so a flush cut short resumes them, never the whole again).
        self._pending: deque[LogBatch] = deque()
        self._pending_rows = 0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False  # after close(), only an explicit start() restarts the flusher
        self._overflow = ThrottledLog()
        self._store_trouble = ThrottledLog()
        self._invalid = ThrottledLog()
        #: Started by `start()` and closed by `close()` (after the flush), in this order.
        self.companions: list[Companion] = []

    @classmethod
    def for_store(cls, store: LogStore) -> LogWriter:
        """The one writer for `store`, so every middleware's rows share its batches."""
        writer = cls._shared.get(store)
        if writer is None:
            writer = cls._shared[store] = cls(store)
        return writer

    def __repr__(self) -> str:
        return (
            f"LogWriter(buffered={self.buffered}, dropped={self.dropped}, rejected={self.rejected})"
        )

    @property
    def buffered(self) -> int:
        """Rows waiting, including a batch being retried."""
        return len(self._rows) + len(self._usage) + self._pending_rows

    # -- adding rows (sync: called on the request path) --------------------------------------
    def add(self, row: Row) -> None:
        rows = self._rows
        if len(rows) + len(self._usage) + self._pending_rows >= self.max_buffer:
            self.dropped += 1
            self._overflow.warning(
                "Log buffer full (%d rows): dropped a %s row (%d dropped so far)",
                self.max_buffer,
                type(row).__name__,
                self.dropped,
            )
            return
        rows.append(row)
        if not isinstance(row, AIRequestLog):
            self._others += 1
        task = self._task
        # The flusher runs in the loop rows arrive on; a new loop (a new test, a restarted
        # server) needs a new one. `_get_running_loop` answers None outside a loop, no raise.
        if task is None or task.done() or self._loop is not asyncio._get_running_loop():
            self._started()
        if len(rows) >= self.batch_size and self._wake is not None:
            self._wake.set()

    def record_key_usage(self, key_id: str, when: float) -> None:
        """Count one use of a key; uses are summed per key and minute until the next flush."""
        slot = (key_id, int(when // MINUTE))
        usage = self._usage.get(slot)
        if usage is None:
            if self.buffered >= self.max_buffer:
                self.dropped += 1
                self._overflow.warning("Log buffer full: dropped a key usage update")
                return
            self._usage[slot] = KeyUsage(key_id, when, 1)
        else:
            self._usage[slot] = KeyUsage(key_id, max(when, usage.last_used), usage.requests + 1)
        self._started()

    # -- lifecycle -----------------------------------------------------------------------------
    def _started(self) -> None:
        """Start the flusher lazily, in the running loop (for apps without lifespan)."""
        task = self._task
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: `start()` or the next row will do it
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self.start_nowait()  # first row, or a new loop (the old one's task died with it)

    def start_nowait(self) -> None:
        loop = asyncio.get_running_loop()
        task = self._task
        if task is not None and not task.done() and self._loop is loop:
            return
        self._loop = loop
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = loop.create_task(self._run(), name="convex-guard log writer")

    async def start(self) -> None:
        self._closed = False
        self.start_nowait()
        for companion in self.companions:
            await companion.start()

    async def close(self) -> None:
        """Stop the flusher and write everything buffered, within `shutdown_timeout` seconds.

        Rows still unwritten when the time is up (the store is down) are counted as dropped
        and reported, rather than holding the server's shutdown forever. Safe to call twice.
        """
        self._closed = True
        task, self._task = self._task, None
        # A task from another (finished) loop cannot be awaited here; it is gone with its loop.
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._lock is None or self._loop is not asyncio.get_running_loop():
            self._lock = asyncio.Lock()
            self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.shutdown_timeout):
                await self.flush()
        except TimeoutError:
            lost = self.buffered
            self.dropped += lost
            self._rows.clear()
            self._others = 0
            self._usage.clear()
            self._pending.clear()
            self._pending_rows = 0
            logger.warning("Log writer: store unavailable at shutdown; %d rows lost", lost)
        for companion in self.companions:
            await companion.close()

    # -- flushing ------------------------------------------------------------------------------
    async def _run(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            timed_out = False
            try:
                async with asyncio.timeout(self.interval):
                    await wake.wait()
            except TimeoutError:
                timed_out = True
            wake.clear()
            # Woken by a full batch: write full batches only. On the timer: everything. Rows
            # arriving during the write wait for the next turn, so batches stay large under
            # load instead of chasing the tail one small batch per store round trip.
            await self.flush(full_only=not timed_out)

    async def flush(self, *, full_only: bool = False) -> None:
        """Write what is buffered now, retrying (in order) until the store accepts it.

        Rows added while this runs are left for the next flush. `full_only` leaves a last
        partial batch in the buffer too.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            budget = len(self._rows)
            if full_only:
                budget -= budget % self.batch_size
            usage = bool(self._usage)
            pending = self._pending
            while True:
                if not pending:
                    if budget <= 0 and not usage:
                        return
                    batch = self._take(min(self.batch_size, max(budget, 0)))
                    if batch is None:
                        return
                    budget -= _batch_rows(batch) - len(batch.key_usage)
                    usage = False
                    pending.append(batch)
                    self._pending_rows = _batch_rows(batch)
                await self._write_pending()

    def _take(self, count: int) -> LogBatch | None:
        if not (count and self._rows) and not self._usage:
            return None
        ai: list[AIRequestLog] = []
        embeddings: list[EmbeddingRequestLog] = []
        failures: list[AuthFailure] = []
        events: list[BotEvent] = []
        settlements: list[Settlement] = []
        rows = self._rows
        taken = rows[:count]
        del rows[:count]
        if not self._others:  # request rows only: the batch is the slice as it is
            ai = cast("list[AIRequestLog]", taken)
        else:
            for row in taken:
                if isinstance(row, AIRequestLog):
                    ai.append(row)
                elif isinstance(row, EmbeddingRequestLog):
                    embeddings.append(row)
                elif isinstance(row, AuthFailure):
                    failures.append(row)
                elif isinstance(row, Settlement):
                    settlements.append(row)
                else:
                    events.append(row)
            self._others -= len(taken) - len(ai)
        usage = tuple(self._usage.values())
        self._usage = {}
        return LogBatch(
            id=uuid.uuid4().hex,
            ai_requests=tuple(ai),
            embedding_requests=tuple(embeddings),
            auth_failures=tuple(failures),
            bot_events=tuple(events),
            key_usage=usage,
            settlements=tuple(settlements),
        )

    async def _write_pending(self) -> None:
        """Write the pending batches in order: retry what the store cannot take now, split
        what it refuses as invalid down to the row it refuses."""
        pending = self._pending
        delay = _FIRST_BACKOFF
        while pending:
            batch = pending[0]
            try:
                await self.store.write_logs(batch)
            except asyncio.CancelledError:
                raise
            except INVALID_BATCH_ERRORS as exc:
                pending.popleft()
                rows = _batch_rows(batch)
                if rows > 1:
                    first, second = _halves(batch)
                    pending.appendleft(second)
                    pending.appendleft(first)
                    continue
                self._pending_rows -= rows
                self.rejected += rows
                self._invalid.warning(
                    "Log writer: the store refused a %s as invalid (%r); dropped it "
                    "(%d rejected so far)",
                    _row_kind(batch),
                    exc,
                    self.rejected,
                )
                continue
            except Exception as exc:
                self._store_trouble.warning(
                    "Log writer: store refused a batch of %d rows (%r); retrying in %.2f s",
                    _batch_rows(batch),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            pending.popleft()
            self._pending_rows -= _batch_rows(batch)
            self.batches_written += 1
            delay = _FIRST_BACKOFF


_BATCH_FIELDS = (
    "ai_requests",
    "embedding_requests",
    "auth_failures",
    "bot_events",
    "key_usage",
    "settlements",
)


def _halves(batch: LogBatch) -> tuple[LogBatch, LogBatch]:
    """`batch`'s rows in two batches, each with its own id (the store never saw these)."""
    rows = [(name, row) for name in _BATCH_FIELDS for row in getattr(batch, name)]
    middle = len(rows) // 2
    parts = []
    for part in (rows[:middle], rows[middle:]):
        fields: dict[str, list[Any]] = {name: [] for name in _BATCH_FIELDS}
        for name, row in part:
            fields[name].append(row)
        parts.append(
            LogBatch(id=uuid.uuid4().hex, **{name: tuple(kept) for name, kept in fields.items()})
        )
    return parts[0], parts[1]


def _row_kind(batch: LogBatch) -> str:
    for name, kind in zip(
        _BATCH_FIELDS,
        (
            "AI request row",
            "embedding request row",
            "auth failure row",
            "bot event",
            "key usage",
            "settlement",
        ),
        strict=True,
    ):
        if getattr(batch, name):
            return kind
    return "row"


def _batch_rows(batch: LogBatch) -> int:
    return (
        len(batch.ai_requests)
        + len(batch.embedding_requests)
        + len(batch.auth_failures)
        + len(batch.bot_events)
        + len(batch.key_usage)
        + len(batch.settlements)
    )


async def run_lifespan(
    app: ASGIApp, writers: tuple[LogWriter, ...], scope: Scope, receive: Receive, send: Send
) -> None:
    """Pass the lifespan to `app`, starting `writers` at startup and flushing them at shutdown.

    An app without lifespan support (it raises before reading the first lifespan message, as
    Django's ASGI handler does) is spoken for: startup and shutdown are answered here, so the
    writers still flush when the server stops. An app that fails after reading the startup
    message has a real startup failure, and its exception goes to the server.
    """
    answered = False
    startup_seen = False

    async def start_all() -> None:
        for writer in writers:
            await writer.start()

    async def close_all() -> None:
        for writer in writers:
            await writer.close()

    async def wrapped_receive() -> Message:
        nonlocal startup_seen
        message = await receive()
        if message["type"] == "lifespan.startup":
            startup_seen = True
            await start_all()
        return message

    async def wrapped_send(message: Message) -> None:
        nonlocal answered
        answered = True
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await close_all()
        await send(message)

    try:
        await app(scope, wrapped_receive, wrapped_send)
    except Exception:
        if answered or startup_seen:
            raise
        logger.debug("The app does not support lifespan; the guard answers it to flush its logs")
        await _answer_lifespan(receive, send, start_all, close_all)


async def _answer_lifespan(
    receive: Receive,
    send: Send,
    start_all: Callable[[], Awaitable[None]],
    close_all: Callable[[], Awaitable[None]],
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await start_all()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await close_all()
            await send({"type": "lifespan.shutdown.complete"})
            return
