"""The embedded store: everything in this process's memory, decided on the event loop."""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import operator
import random as _random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Final, Generic, NamedTuple, TypeVar

from convex_guard.core.alerts import AlertRule
from convex_guard.core.errors import ConfigurationError
from convex_guard.core.keys import ApiKeyKind
from convex_guard.core.limits import (
    Decider,
    Decision,
    FirstDecider,
    LimitConfig,
    LimitResult,
    LimitState,
    States,
    check_count,
    refund_applies,
)
from convex_guard.stores.alertbook import AlertBook
from convex_guard.stores.base import (
    BLOCK_AFTER,
    CHALLENGE_AFTER,
    ESCALATION_WINDOW_MS,
    LATENCY_BOUNDS_MS,
    TOP_KEYS,
    UNKNOWN_ACTOR,
    AIRequestLog,
    Alert,
    AlertOutcome,
    ApiKeyList,
    ApiKeyRecord,
    AuditAction,
    AuditEntry,
    AuthFailure,
    BotAction,
    BotCheck,
    BotDetectionType,
    BotEvent,
    BotVerdict,
    CheckResult,
    DashboardSnapshot,
    EmbeddingRequestLog,
    EmbeddingUsage,
    KeyUsageSummary,
    LimitRequest,
    LogBatch,
    NewApiKey,
    ProviderSeries,
    ProviderStats,
    RefusalReason,
    Settlement,
    audit_changes,
    check_actor,
    check_dashboard_range,
    check_update_action,
    refusal_reason,
)

Clock = Callable[[], float]
#: What a decision asks of one limit, apart from its key: (name, config, count, reserve).
LimitSpec = tuple[str, LimitConfig, float, bool]
Random = Callable[[], float]
#: What `MemoryStore.decide_planned` answers: (all admitted, each limit's decision, the
#: numbers of each one's `RateLimit` item in order, now).
PlannedDecision = tuple[bool, list[Decision], list[int], float]
R = TypeVar("R", AIRequestLog, EmbeddingRequestLog, AuthFailure, "_KeyUse")

#: How many applied batch ids a MemoryStore remembers to make retries idempotent.
MAX_BATCH_IDS = 10_000
#: How many audit entries a MemoryStore keeps by default (`max_audit_entries`).
MAX_AUDIT_ENTRIES = 10_000

_SEVERITY: dict[BotAction, int] = {"allowed": 0, "challenged": 1, "blocked": 2}


_time = time.time


def _wall_clock_ms() -> float:
    return _time() * 1000.0


def escalate(policy: BotAction, previous_events: int) -> BotAction:
    """The seed's escalation over a client's last hour, never milder than the policy.

    The request being decided counts as one of the events: the 6th flagged request within an
    hour is challenged, the 11th blocked.
    """
    events = previous_events + 1
    if events > BLOCK_AFTER:
        history: BotAction = "blocked"
    elif events > CHALLENGE_AFTER:
        history = "challenged"
    else:
        history = "allowed"
    return policy if _SEVERITY[policy] >= _SEVERITY[history] else history


#: Past this a stored count or amount is not a real one (and a float64 sum loses it).
_MAX_KNOWN = 2**53


def _known(value: object) -> int | float:
    """A stored number as a sum may take it: 0 for None, NaN, infinite, negative or huge."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return value if 0 <= value <= _MAX_KNOWN else 0  # NaN compares false


class MemoryStore:
    """State for one process. Fast and dependency-free, but limits are per process.

    `clock()` returns epoch milliseconds and `random()` a float in [0, 1) for the fixed-window
    jitter; both are injectable so tests can drive time and phase exactly.

    Rows (logs, events, auth failures) are kept up to `max_rows` per table, oldest dropped
    first: this store is for one process and its demo, not for an audit trail.

    Its audit trail (`AuditStore`) keeps the last `max_audit_entries` entries; older ones are
    dropped, oldest first, and counted in `dropped_audit_entries`. It ends with the process:
    a trail that must outlive it belongs in a shared store.

    Limit state that has fully refilled carries no information, so it is forgotten: each new
    state waits in an expiry queue, in a segment of the states created about when it was, and
    every new key looks at two states whose segment's time (when its last state can be full)
    has come, dropping those that are full. Memory stays bounded by the keys active within one
    refill time, and no state is looked at before it can be full: no scan over all keys,
    periodic or spread over requests.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        random: Random | None = None,
        *,
        max_rows: int = 100_000,
        max_audit_entries: int = MAX_AUDIT_ENTRIES,
    ) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if max_audit_entries < 1:
            raise ValueError("max_audit_entries must be at least 1")
        self._max_rows = max_rows
        self._clock: Clock = clock or _wall_clock_ms
        # The wall clock is read inline on the hot path: a call through `_clock` costs more
        # than the rest of a token-bucket decision.
        self._wall = clock is None
        self._random: Random = random or _random.random
        # name -> its states by key (a nested dict spares building a tuple key per request).
        self._limits: dict[str, _Limit] = {}
        # Replaced whenever a name's entry in `_limits` is made, dropped or given another
        # config: a `LimitPlan` resolved under another version resolves its entries again.
        self._version = object()
        # The expiry queue: segments of new states' keys, one open per limit name at a time
        # (`_Limit.segment`), in a heap by the time they may be looked at: (due, sequence,
        # segment). Keys only, no (name, key) pair per state: a new state costs one append
        # and one comparison. The segment being looked at (None: none) is `_sweep`, from
        # `_sweep_at` on; `_next_due` is when a new state must look at due ones (-inf while a
        # segment is being swept). A state found gone (reset) is skipped.
        self._segments: list[tuple[float, int, _Segment]] = []
        self._segment_ids = itertools.count()
        self._sweep: _Segment | None = None
        self._sweep_at = 0
        self._next_due = math.inf
        self._bot_events: list[BotEvent] = []  # in timestamp order
        self._bot_by_fingerprint: dict[str, list[float]] = {}
        self._bot_by_client: dict[str, list[float]] = {}  # by client key, as by fingerprint
        self._last_event: BotEvent | None = None
        self._keys: dict[str, ApiKeyRecord] = {}
        self._key_ids: dict[str, str] = {}  # hash -> id
        self._ids = itertools.count(1)
        self._ai_logs = _Rows(AIRequestLog, max_rows)
        self._embedding_logs = _Rows(EmbeddingRequestLog, max_rows)
        self._auth_failures = _Rows(AuthFailure, max_rows)
        # Each batch's use of each key, at its latest use: the dashboard's top keys per window.
        self._key_uses = _Rows(_KeyUse, max_rows)
        # Batch ids already applied, so a retried batch lands once; only the most recent are
        # kept (a writer retries a batch within seconds), so memory stays bounded.
        self._batches: set[str] = set()
        self._batch_order: deque[str] = deque()
        self._alert_book = AlertBook(self._clock)
        self._audit: deque[AuditEntry] = deque(maxlen=max_audit_entries)
        self._audit_ids = itertools.count(1)
        #: Audit entries dropped to keep the last `max_audit_entries`.
        self.dropped_audit_entries = 0

    def __repr__(self) -> str:
        return f"MemoryStore(limit_keys={self.limit_keys}, api_keys={len(self._keys)})"

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
        # One limit needs none of `decide_all`'s lists or rollback: the decider and the
        # expiry queue directly (the same ones it uses), as this is the hot path of a caller
        # deciding one limit at a time.
        now = _time() * 1000.0 if self._wall else self._clock()
        entry = self._limits.get(name)
        if entry is None or entry.config is not config:  # only for a new name or config
            entry = self._entry(name, config)
        states = entry.states
        state = states.get(key)
        try:  # the decider itself refuses a count that no waiting could admit
            if state is not None:
                return LimitResult(*entry.decide(states, key, state, now, count, reserve))
            decision = entry.first(states, key, now, count, reserve, self._random)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{exc} (limit {name!r})") from None
        if decision[0]:  # `_track`'s steps, inline: its call costs a new key more than they do
            segment = entry.segment
            if now >= segment.until:
                segment = self._open_segment(entry, now)
            segment.keys.append(key)
            full = now + decision[3]
            if full > segment.latest:
                segment.latest = full
            if now >= self._next_due:
                self._look_at_due(now)
        return LimitResult(*decision)

    async def check(
        self, limits: Sequence[LimitRequest], *, bot: BotCheck | None = None
    ) -> CheckResult:
        verdict: BotVerdict | None = None
        now: float | None = None
        if bot is not None:
            now = _time() * 1000.0 if self._wall else self._clock()
            # A count no waiting could admit is refused before the bot's event is recorded.
            # (Without a bot the deciders refuse it below, before anything is kept.)
            for request in limits:
                check_count(request.name, request.config, request.count, request.reserve)
            if bot.limit is not None:
                limit = bot.limit
                check_count(limit.name, limit.config, limit.count, limit.reserve)
            verdict = self._decide_bot(bot, now)
            if verdict.action != "allowed":
                return CheckResult(False, (), verdict, now)
        ok, decisions, now = self.decide_all(
            [(r.name, r.config, r.count, r.reserve) for r in limits], [r.key for r in limits], now
        )
        return CheckResult(ok, tuple([LimitResult(*d) for d in decisions]), verdict, now)

    def decide_all(
        self,
        specs: Sequence[LimitSpec],
        keys: Sequence[str | None],
        now: float | None = None,
    ) -> tuple[bool, list[Decision], float]:
        """Decide the limits `specs` (each for the key at the same index) together, at `now`
        (default: this store's clock): (all admitted, each one's decision, now).

        The one decision of this store: `limit`, `check`, settlements and bot limits all come
        here, and the rate-limit middleware calls it directly (no await: nothing here waits),
        so no request or result object is made for a request every rule admits.

        Decided in place, then rolled back if any denies: the common case (all admit) pays
        for no copies. A (name, key) named twice sees its own earlier consumption; a new
        state's first decision always admits (a full state does), so the second slot sees it
        stored. New states enter the expiry queue once all admit. A count no waiting could
        admit raises `ConfigurationError`, with nothing kept.
        """
        if now is None:
            now = _time() * 1000.0 if self._wall else self._clock()
        decisions: list[Decision] = []
        # Each limit's state before this call (None: new), to roll back or track.
        before: list[LimitState | None] = []
        ok = True
        made = False  # whether a state is new (cheaper kept than found by `None in before`)
        limits_by_name = self._limits
        for (name, config, count, reserve), key in zip(specs, keys):  # noqa: B905 (same length)
            entry = limits_by_name.get(name)
            if entry is None or entry.config is not config:
                entry = self._entry(name, config)
            states = entry.states
            state = states.get(key)
            before.append(state)
            try:
                if state is None:  # admitted (a full state is): stored for a second slot
                    made = True
                    decision = entry.first(states, key, now, count, reserve, self._random)
                else:
                    decision = entry.decide(states, key, state, now, count, reserve)
            except ConfigurationError as exc:
                self._restore(specs, keys, before)
                raise ConfigurationError(f"{exc} (limit {name!r})") from None
            if not decision[0]:
                ok = False
            decisions.append(decision)
        if not ok:
            self._restore(specs, keys, before)
        elif made:
            entries = [limits_by_name[name] for name, _, _, _ in specs]
            self._track_new(entries, keys, before, decisions, now)
        return ok, decisions, now

    def decide_planned(self, plan: LimitPlan, values: Sequence[str | None]) -> PlannedDecision:
        """`decide_all` of a plan's specs, each for its key in `values` (at the plan's
        `slots`), at this store's clock, with the numbers of each limit's `RateLimit` field
        item (draft-ietf-httpapi-ratelimit-headers): its remaining quota rounded down and the
        seconds until it is full again rounded up, both whole.

        The rate limiter's fast path, called for every request of a route: the plan's states
        are found by name once (again only when this store made, dropped or reconfigured a
        name since), and the field's numbers are worked out in the same pass as the
        decisions: the remaining quota floored to an int (`%d` formats an int in two thirds
        of what a float costs it), the seconds as `(ceil(reset) + 999) // 1000`, the exact
        ceiling in integers, where `ceil(reset / 1000)` would round the quotient first and a
        float floor division costs more than the decision's arithmetic. Each limit reads its
        key off `values` at its slot, so a caller with the keys in one tuple passes that
        tuple as it is: the keys in the plan's order are made only for a rollback or new
        states. Otherwise `decide_all`'s decision, rollback and expiry queue, step for step.
        """
        now = _time() * 1000.0 if self._wall else self._clock()
        if plan.version is not self._version:
            self._resolve(plan)
        decisions: list[Decision] = []
        numbers: list[int] = []
        before: list[LimitState | None] = []
        ok = True
        made = False
        ceil = math.ceil
        floor = math.floor
        for states, decide, first, count, reserve, slot in plan.steps:
            key = values[slot]
            state = states.get(key)
            before.append(state)
            try:
                if state is None:  # admitted (a full state is): stored for a second slot
                    made = True
                    decision = first(states, key, now, count, reserve, self._random)
                else:
                    decision = decide(states, key, state, now, count, reserve)
            except ConfigurationError as exc:
                self._restore(plan.specs, plan.keys(values), before)
                name = plan.specs[len(before) - 1][0]
                raise ConfigurationError(f"{exc} (limit {name!r})") from None
            if not decision[0]:
                ok = False
            decisions.append(decision)
            # No clamp at zero: this store's deciders never answer a negative remaining, and a
            # reset below zero only by a rounding error, which the ceiling takes to 0.
            numbers.append(floor(decision[2]))
            numbers.append((ceil(decision[3]) + 999) // 1000)
        if not ok:
            self._restore(plan.specs, plan.keys(values), before)
        elif made:
            self._track_new(plan.entries, plan.keys(values), before, decisions, now)
        return ok, decisions, numbers, now

    def _resolve(self, plan: LimitPlan) -> None:
        """Find (or make) a plan's entries and keep what its decisions read off them."""
        entries = [self._entry(name, config) for name, config, _, _ in plan.specs]
        plan.entries = tuple(entries)
        plan.steps = tuple(
            [
                (entry.states, entry.decide, entry.first, count, reserve, slot)
                for entry, (_, _, count, reserve), slot in zip(
                    entries, plan.specs, plan.slots, strict=True
                )
            ]
        )
        # After all of them: making an entry gives the store a new version.
        plan.version = self._version

    def _track_new(
        self,
        entries: Sequence[_Limit],
        keys: Sequence[str | None],
        before: list[LimitState | None],
        decisions: list[Decision],
        now: float,
    ) -> None:
        """Enter the states an admitted call made in the expiry queue, then look at due ones.

        A second slot of the same (name, key) only delays the state's fullness: the queue
        then finds it not yet full and looks again later.
        """
        for entry, key, state, decision in zip(entries, keys, before, decisions):  # noqa: B905
            if state is None:
                self._track(entry, key, now, now + decision[3])
        if now >= self._next_due:
            self._look_at_due(now)

    def _restore(
        self,
        specs: Sequence[LimitSpec],
        keys: Sequence[str | None],
        before: list[LimitState | None],
    ) -> None:
        """Undo a call's decisions: each state back to what it was, a new one dropped."""
        limits_by_name = self._limits
        for i in range(len(before) - 1, -1, -1):
            states = limits_by_name[specs[i][0]].states
            key, state = keys[i], before[i]
            if state is None:
                states.pop(key, None)
            else:
                states[key] = state

    def _settle(self, settlement: Settlement, now: float) -> None:
        """Charge or refund one reservation, as the component takes a count with `reserve`."""
        amount = settlement.amount
        if not math.isfinite(amount):
            raise ValueError(f"settlement of {settlement.name!r}: amount must be finite")
        name, key, config = settlement.name, settlement.key, settlement.config
        if amount < 0 and not refund_applies(
            config, self._state(name, key), now, settlement.reserved_at
        ):
            return
        try:
            self.decide_all(((name, config, amount, True),), (key,), now)
        except ConfigurationError as exc:  # a hand-made config with max_reserved
            raise ValueError(f"settlement of {name!r}: {exc}") from None

    def _entry(self, name: str, config: LimitConfig) -> _Limit:
        """The name's states, to be decided by `config` (the last config used for a name is
        the one the expiry queue judges its states by)."""
        limit = self._limits.get(name)
        if limit is None:
            limit = self._limits[name] = _Limit(name, config)
            self._version = object()
        elif limit.config is not config:
            limit.use(config)
            self._version = object()
        return limit

    def _state(self, name: str, key: str | None) -> LimitState | None:
        limit = self._limits.get(name)
        return limit.states.get(key) if limit is not None else None

    def _decide_bot(self, bot: BotCheck, now: float) -> BotVerdict:
        """Escalate by history, then by the bot's own limit; record the final decision."""
        since = now - ESCALATION_WINDOW_MS
        previous = self._count_events(bot.fingerprint, since)
        if bot.client_key is not None:
            # Rotating the headers the fingerprint is made of must not reset the history.
            previous = max(previous, _count_since(self._bot_by_client.get(bot.client_key), since))
        action = escalate(bot.action, previous)
        if action == "allowed" and bot.limit is not None:
            # The bot's own limit is consumed whenever the bot is allowed (see BotCheck).
            request = bot.limit
            ok, _, _ = self.decide_all(
                ((request.name, request.config, request.count, request.reserve),),
                (request.key,),
                now,
            )
            if not ok:
                action = "challenged"
        metadata = dict(bot.metadata or {})
        metadata["previousAttempts"] = previous
        self._add_event(
            BotEvent(
                timestamp=now,
                fingerprint=bot.fingerprint,
                ip=bot.ip,
                user_agent=bot.user_agent,
                detection_type=bot.detection_type,
                action=action,
                metadata=metadata,
                client_key=bot.client_key,
            )
        )
        return BotVerdict(action, previous)

    def _track(self, limit: _Limit, key: str | None, now: float, full: float) -> None:
        """Enter a new state (already stored) in the expiry queue; the caller then looks at
        due ones (`_look_at_due`) if `_next_due` has come.

        `full` is the earliest time the state can be full again (consuming only delays it).
        The key joins its limit's open segment, the states created within one 64th of the
        limit's period, which may be looked at once the latest of their `full` times has come:
        a new state costs an append and a comparison, no time arithmetic or pair per state.
        A state is so forgotten at most a 64th of the period after the slowest of its segment
        can be full (for one request per key: a window, or the time a bucket refills it). One
        consumed since it was queued (or reserved below zero) is not full when looked at and
        joins the open segment again. Looking at two due states per new one bounds the states
        held to about twice those not yet refilled, and the work per new state is the same
        however many states are held: no walk over them. `limit`, deciding one new key at a
        time, takes these steps inline.
        """
        segment = limit.segment
        if now >= segment.until:
            segment = self._open_segment(limit, now)
        segment.keys.append(key)
        if full > segment.latest:
            segment.latest = full

    def _open_segment(self, limit: _Limit, now: float) -> _Segment:
        """Start `limit`'s next segment (its open one is closed at `now`), due no sooner than
        its end."""
        width = limit.bucket_width
        segment = limit.segment = _Segment(limit, (now // width + 1) * width)
        heapq.heappush(self._segments, (segment.until, next(self._segment_ids), segment))
        if segment.until < self._next_due:
            self._next_due = segment.until
        return segment

    def _look_at_due(self, now: float) -> None:
        """Look at (up to) two due states: drop the full ones, queue the others again.

        A segment keeps the entry its states were made in. Only the store's entry of a name
        gains states (a plan resolves its entries again once one is dropped), so a state found
        held is in the store's entry, and dropping the last one drops that entry.
        """
        segment, at = self._sweep, self._sweep_at
        for _ in range(2):
            if segment is None or at == len(segment.keys):
                segment, at = self._due_segment(now), 0
                if segment is None:
                    self._sweep = None
                    return
            key = segment.keys[at]
            at += 1
            limit = segment.limit
            states = limit.states
            held = states.get(key)
            if held is None:
                continue  # reset already dropped it (or its entry was dropped)
            when = limit.full_at(held)
            if when > now:
                self._track(limit, key, now, when)
                continue
            del states[key]
            if not states and self._limits.get(limit.name) is limit:
                del self._limits[limit.name]
                self._version = object()
        self._sweep, self._sweep_at = segment, at
        self._next_due = -math.inf

    def _due_segment(self, now: float) -> _Segment | None:
        """The next segment whose states can all be full by `now`, taken off the queue; None,
        with `_next_due` set, if there is none yet."""
        segments = self._segments
        while segments and segments[0][0] <= now:
            segment = heapq.heappop(segments)[2]
            if segment.latest <= now:
                return segment
            # Closed, but its last state is not full yet: due again when that one can be.
            heapq.heappush(segments, (segment.latest, next(self._segment_ids), segment))
        self._next_due = segments[0][0] if segments else math.inf
        return None

    async def reset(self, name: str, *, key: str | None = None) -> None:
        # The expiry queue skips states that are gone, so it needs no update here.
        limit = self._limits.get(name)
        if limit is not None:
            limit.states.pop(key, None)

    async def peek(self, name: str, config: LimitConfig, *, key: str | None = None) -> LimitResult:
        now = self._clock()
        state = self._state(name, key)
        if state is None:
            state = config.fresh(now, self._random)
        # Count 0 always admits: the new state goes to a throwaway mapping.
        return LimitResult(*config.decider({}, key, state, now, 0, False))

    @property
    def limit_keys(self) -> int:
        """How many (name, key) states are held: what the expiry queue keeps bounded."""
        return sum(len(limit.states) for limit in self._limits.values())

    # -- bots ------------------------------------------------------------------------------
    def _add_event(self, event: BotEvent) -> None:
        self._last_event = event
        events = self._bot_events
        if events and events[-1].timestamp > event.timestamp:
            bisect.insort(events, event, key=lambda e: e.timestamp)
        else:
            events.append(event)
        bisect.insort(self._bot_by_fingerprint.setdefault(event.fingerprint, []), event.timestamp)
        if event.client_key is not None:
            bisect.insort(self._bot_by_client.setdefault(event.client_key, []), event.timestamp)
        if len(events) > self._max_rows:
            oldest = events.pop(0)
            _forget(self._bot_by_fingerprint, oldest.fingerprint, oldest.timestamp)
            if oldest.client_key is not None:
                _forget(self._bot_by_client, oldest.client_key, oldest.timestamp)

    def _count_events(self, fingerprint: str, since: float) -> int:
        return _count_since(self._bot_by_fingerprint.get(fingerprint), since)

    async def count_bot_events(self, fingerprint: str, since: float) -> int:
        return self._count_events(fingerprint, since)

    @property
    def last_bot_event(self) -> BotEvent | None:
        """The event recorded last (by `check` or `write_logs`), in O(1): a caller that wants
        the event its own call just recorded must not copy the whole list to find it."""
        return self._last_event

    async def bot_events(self, *, since: float, limit: int = 100) -> list[BotEvent]:
        events = self._bot_events
        start = bisect.bisect_left(events, since, key=lambda e: e.timestamp)
        # Only the `limit` newest are copied, however many match.
        start = max(start, len(events) - max(limit, 0))
        return events[start:][::-1]

    # -- API keys -----------------------------------------------------------------------------
    async def create_api_key(
        self, key: NewApiKey, *, actor: str = UNKNOWN_ACTOR, related: str | None = None
    ) -> ApiKeyRecord:
        who = check_actor(actor)  # before anything is written: a refusal leaves no trace
        record = ApiKeyRecord(
            id=f"mem_{next(self._ids)}",
            kind=key.kind,
            key_hash=key.key_hash,
            prefix=key.prefix,
            name=key.name,
            owner=key.owner,
            scopes=tuple(key.scopes),
            rate_limit=key.rate_limit,
            created_at=key.created_at,
            expires_at=key.expires_at,
            last_used=None,
            request_count=0,
            active=True,
            quotas=tuple(key.quotas),
        )
        self._keys[record.id] = record
        self._key_ids[record.key_hash] = record.id
        self._record_audit("key.created", None, record, who, related)
        return record

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        key_id = self._key_ids.get(key_hash)
        return self._keys.get(key_id) if key_id is not None else None

    async def list_api_keys(
        self, *, kind: ApiKeyKind | None = None, owner: str | None = None
    ) -> ApiKeyList:
        return ApiKeyList(
            record
            for record in self._keys.values()
            if (kind is None or record.kind == kind) and (owner is None or record.owner == owner)
        )

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
        who, action = check_actor(actor), check_update_action(action)
        before = record = self._keys.get(key_id)
        if record is None:
            return None
        if active is not None:
            record = replace(record, active=active)
        if expires_at is not None:
            record = replace(record, expires_at=expires_at)
        self._keys[key_id] = record
        self._record_audit(action, before, record, who, related)
        return record

    # -- the audit trail ------------------------------------------------------------------------
    def _record_audit(
        self,
        action: AuditAction,
        before: ApiKeyRecord | None,
        after: ApiKeyRecord,
        actor: str,
        related: str | None,
    ) -> None:
        """Append the entry of a change just made (no await between them: both or neither)."""
        if len(self._audit) == self._audit.maxlen:
            self.dropped_audit_entries += 1
        self._audit.append(
            AuditEntry(
                id=f"audit_{next(self._audit_ids)}",
                timestamp=self._clock(),
                action=action,
                record=after.id,
                actor=actor,
                changes=audit_changes(before, after),
                related=related,
            )
        )

    async def audit_entries(
        self, *, since: float = 0.0, record: str | None = None, limit: int = 100
    ) -> list[AuditEntry]:
        found: list[AuditEntry] = []
        for entry in reversed(self._audit):
            if len(found) >= limit:
                break
            if entry.timestamp >= since and (record is None or entry.record == record):
                found.append(entry)
        return found

    # -- logs and analytics ---------------------------------------------------------------------
    async def write_logs(self, batch: LogBatch) -> None:
        if batch.id in self._batches:
            return
        if batch.settlements:
            for settlement in batch.settlements:  # refused whole before anything is kept
                if not math.isfinite(settlement.amount):
                    raise ValueError(f"settlement of {settlement.name!r}: amount must be finite")
            now = self._clock()
            for settlement in batch.settlements:
                self._settle(settlement, now)
        self._batches.add(batch.id)
        self._batch_order.append(batch.id)
        if len(self._batch_order) > MAX_BATCH_IDS:
            self._batches.discard(self._batch_order.popleft())
        self._ai_logs.extend(batch.ai_requests)
        self._embedding_logs.extend(batch.embedding_requests)
        self._auth_failures.extend(batch.auth_failures)
        for event in batch.bot_events:
            self._add_event(event)
        for usage in batch.key_usage:
            record = self._keys.get(usage.key_id)
            if record is not None:
                self._keys[usage.key_id] = replace(
                    record,
                    last_used=max(usage.last_used, record.last_used or 0.0),
                    request_count=record.request_count + usage.requests,
                )
        self._key_uses.extend(
            _KeyUse(u.last_used, u.key_id, u.requests)
            for u in batch.key_usage
            if u.key_id in self._keys
        )
        watched = self._alert_book.watched
        remaining = [(w, (await self.peek(w.name, w.config, key=w.key)).remaining) for w in watched]
        self._alert_book.observe(batch, self._bot_events, remaining)

    async def provider_stats(self, provider: str, start: float, end: float) -> ProviderStats:
        rows = self._ai_logs.where(
            lambda row: row.provider == provider and start <= row.timestamp <= end
        )
        total = len(rows)
        truncated = self._ai_logs.dropped_since(start)
        if total == 0:
            return ProviderStats(0, 0.0, 0.0, 0, 0.0, truncated)
        # Rows written straight to the store skip `report_usage`'s checks: a number that is
        # not finite and non-negative counts as unknown (0), never as a raise or a NaN total.
        return ProviderStats(
            total_requests=total,
            success_rate=sum(1 for row in rows if row.success) / total,
            average_latency=sum(_known(row.latency_ms) for row in rows) / total,
            total_tokens=int(sum(_known(row.tokens_used) for row in rows)),
            total_cost=float(sum(_known(row.cost) for row in rows)),
            truncated=truncated,
            shadow_refusals=sum(1 for row in rows if refusal_reason(row.shadow) is not None),
        )

    async def embedding_usage(self, key_hash: str, start: float, end: float) -> EmbeddingUsage:
        rows = self._embedding_logs.where(
            lambda row: row.api_key_hash == key_hash and start <= row.timestamp <= end
        )
        return EmbeddingUsage(
            total_requests=len(rows),
            successful_requests=sum(1 for row in rows if row.success),
            total_tokens=sum(row.tokens_used for row in rows),
            total_items=sum(row.batch_size for row in rows),
            truncated=self._embedding_logs.dropped_since(start),
        )

    async def count_auth_failures(self, key_hash: str, since: float) -> int:
        return len(
            self._auth_failures.where(
                lambda row: row.key_hash == key_hash and row.timestamp >= since
            )
        )

    # -- alerts ------------------------------------------------------------------------------
    def configure_alerts(self, rules: Sequence[AlertRule]) -> None:
        self._alert_book.configure(rules)

    async def alerts(self, *, since: float, limit: int = 100) -> list[Alert]:
        return self._alert_book.recent(since, limit)

    async def pending_alerts(self, *, limit: int = 100) -> list[Alert]:
        return self._alert_book.pending(limit)

    async def claim_alert(self, alert_id: str, owner: str, lease_ms: float) -> bool:
        return self._alert_book.claim(alert_id, owner, lease_ms)

    async def mark_alert(self, alert_id: str, owner: str, outcome: AlertOutcome) -> bool:
        return self._alert_book.mark(alert_id, owner, outcome)

    # -- the dashboard --------------------------------------------------------------------------
    async def dashboard(self, start: float, end: float, bucket_ms: float) -> DashboardSnapshot:
        buckets = check_dashboard_range(start, end, bucket_ms)
        providers: dict[str, _Series] = {}
        refusals: dict[RefusalReason, int] = {}
        shadows: dict[RefusalReason, int] = {}
        # Read off the stored tuples: a named tuple per row would cost most of the time, and
        # this runs on the app's event loop once per refresh of every open page.
        at, provider, success, latency, error, tokens, cost, shadow = _AI_FIELDS
        bounds = LATENCY_BOUNDS_MS
        for row in self._ai_logs.between(start, end):
            series = providers.get(row[provider])
            if series is None:
                series = providers[row[provider]] = _Series(buckets)
            i = int((row[at] - start) // bucket_ms)
            series.requests[i] += 1
            if row[success]:
                series.successes[i] += 1
            series.tokens += _known(row[tokens])
            series.cost += _known(row[cost])
            series.latency[bisect.bisect_left(bounds, _known(row[latency]))] += 1
            if row[error] is not None:
                reason = refusal_reason(row[error])
                if reason is not None:
                    refusals[reason] = refusals.get(reason, 0) + 1
            if row[shadow] is not None:
                reason = refusal_reason(row[shadow])
                if reason is not None:
                    shadows[reason] = shadows.get(reason, 0) + 1
        events = self._bot_events
        first = bisect.bisect_left(events, start, key=lambda e: e.timestamp)
        last = bisect.bisect_left(events, end, key=lambda e: e.timestamp)
        by_kind: dict[tuple[BotDetectionType, BotAction], int] = {}
        bot_series = [0] * buckets
        for event in events[first:last]:
            kind = (event.detection_type, event.action)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            bot_series[int((event.timestamp - start) // bucket_ms)] += 1
        failures = [0] * buckets
        failed_at = _AUTH_FAILURE_TIMESTAMP
        for failure in self._auth_failures.between(start, end):
            failures[int((failure[failed_at] - start) // bucket_ms)] += 1
        # A batch's use of a key counts at its latest use, as the Convex key rollups count it.
        per_key: dict[str, int] = {}
        for _, key_id, n in self._key_uses.between(start, end):
            per_key[key_id] = per_key.get(key_id, 0) + n
        ranked = sorted(per_key.items(), key=lambda kv: (-kv[1], kv[0]))
        top = [(self._keys[k], n) for k, n in ranked if k in self._keys][:TOP_KEYS]
        return DashboardSnapshot(
            start=start,
            end=end,
            bucket_ms=bucket_ms,
            providers=tuple(s.freeze(p) for p, s in sorted(providers.items())),
            refusals=refusals,
            bot_events=by_kind,
            bot_series=tuple(bot_series),
            auth_failures=tuple(failures),
            top_keys=tuple(_key_summary(r, n) for r, n in top),
            truncated=self._ai_logs.dropped_since(start)
            or self._auth_failures.dropped_since(start)
            or self._key_uses.dropped_since(start),
            shadow_refusals=shadows,
        )

    # -- inspection, for tests and the CLI ---------------------------------------------------
    @property
    def ai_logs(self) -> list[AIRequestLog]:
        return self._ai_logs.where(None)

    @property
    def embedding_logs(self) -> list[EmbeddingRequestLog]:
        return self._embedding_logs.where(None)

    @property
    def auth_failures(self) -> list[AuthFailure]:
        return self._auth_failures.where(None)

    async def close(self) -> None:
        return None


class LimitPlan:
    """Limits decided together again and again (a route's rules): what
    `MemoryStore.decide_planned` asks of each, where in the caller's values its key is
    (`slots`; by default each limit's key at its own index), with the store's entries they
    resolve to, kept between calls so that a decision looks no name up."""

    __slots__ = ("entries", "keys", "slots", "specs", "steps", "version")

    def __init__(self, specs: Sequence[LimitSpec], slots: Sequence[int] | None = None) -> None:
        self.specs = tuple(specs)
        self.slots = tuple(range(len(self.specs)) if slots is None else slots)
        if len(self.slots) != len(self.specs):
            raise ValueError(f"{len(self.specs)} limits need as many slots, not {len(self.slots)}")
        #: `keys(values)`: each limit's key, in order, read by one C call (an `itemgetter`).
        self.keys = _key_reader(self.slots)
        self.entries: tuple[_Limit, ...] = ()
        #: Per spec: its states, decider, first decider, count, reserve and slot.
        self.steps: tuple[tuple[States, Decider, FirstDecider, float, bool, int], ...] = ()
        #: The store version `entries` were resolved under (none yet).
        self.version: object = None


def _key_reader(slots: tuple[int, ...]) -> Callable[[Sequence[str | None]], tuple[str | None, ...]]:
    """The keys at `slots` of a plan's values, always as a tuple (an `itemgetter` of one index
    answers the item itself, of none cannot be made)."""
    if len(slots) > 1:
        return operator.itemgetter(*slots)
    if slots:
        (slot,) = slots
        return lambda values: (values[slot],)
    return lambda values: ()


class _Limit:
    """One limit name's states, with the config they were last decided by.

    Its decider and state maker are kept here: read off the pydantic config, each costs more
    than the arithmetic of a decision.
    """

    __slots__ = (
        "bucket_width",
        "config",
        "decide",
        "first",
        "full_at",
        "name",
        "segment",
        "states",
    )

    def __init__(self, name: str, config: LimitConfig) -> None:
        self.name = name
        self.states: dict[str | None, LimitState] = {}
        #: The expiry queue's open segment of these states (this one is closed).
        self.segment = _Segment(self, -math.inf)
        self.use(config)

    def __repr__(self) -> str:
        return f"_Limit({self.name!r}, {self.config!r}, states={self.states!r})"

    def use(self, config: LimitConfig) -> None:
        self.config = config
        self.decide = config.decider
        self.first = config.first
        self.full_at = config.full_at
        #: The width of the expiry queue's segments of these states: a 64th of the period.
        self.bucket_width = config.period / 64


class _Segment:
    """Keys of one limit's states created within one segment's width, until `until`, and the
    latest time one of them can be full (`latest`): the expiry queue's unit."""

    __slots__ = ("keys", "latest", "limit", "until")

    def __init__(self, limit: _Limit, until: float) -> None:
        self.limit = limit
        self.until = until
        self.keys: list[str | None] = []
        self.latest = -math.inf


def _count_since(times: list[float] | None, since: float) -> int:
    """How many of a sorted index's times are at or after `since`: O(log n)."""
    if not times:
        return 0
    return len(times) - bisect.bisect_left(times, since)


def _forget(index: dict[str, list[float]], key: str, timestamp: float) -> None:
    """Drop one evicted event's time from a per-key index (the oldest: at the front)."""
    times = index[key]
    times.remove(timestamp)
    if not times:
        del index[key]


_ITEMS: Final = operator.itemgetter(slice(None))  # `row[:]`: a plain tuple of the row's items


class _Rows(Generic[R]):
    """A bounded table of rows, held as plain tuples: up to `max_rows`, oldest dropped first.

    The garbage collector stops tracking a plain tuple of strings and numbers, but not a
    named tuple (a subclass) nor a dataclass: 100,000 kept log rows made each full collection
    walk them all, which under load cost a guarded app about a tenth of its throughput. Rows
    are named tuples already (built once per request), so keeping one is a copy of its
    items, no field read by name; they become named tuples again only when read.
    """

    __slots__ = ("_dropped_until", "_kind", "_rows", "_timestamp")

    def __init__(self, kind: type[R], max_rows: int) -> None:
        self._kind: type[R] = kind
        self._timestamp = kind._fields.index("timestamp")
        self._rows: deque[tuple[Any, ...]] = deque(maxlen=max_rows)
        # The latest timestamp among dropped rows: a range starting after it is still whole.
        self._dropped_until = -math.inf

    def extend(self, rows: Iterable[R]) -> None:
        # One C loop over the batch (`map`), no bytecode per row; `row[:]` copies the items
        # in one step where `tuple(row)` iterates a named tuple item by item.
        new = list(map(_ITEMS, rows))
        kept = self._rows
        assert kept.maxlen is not None
        overflow = len(kept) + len(new) - kept.maxlen
        if overflow > 0:
            ts = self._timestamp
            dropped = max(r[ts] for r in itertools.islice(itertools.chain(kept, new), overflow))
            self._dropped_until = max(self._dropped_until, dropped)
        kept.extend(new)

    def dropped_since(self, start: float) -> bool:
        """Whether a row at or after `start` may have been dropped to keep `max_rows`."""
        return start <= self._dropped_until

    def where(self, keep: Callable[[R], bool] | None) -> list[R]:
        rows = list(map(self._kind._make, self._rows))
        return rows if keep is None else [row for row in rows if keep(row)]

    def __len__(self) -> int:
        return len(self._rows)

    def between(self, start: float, end: float) -> Iterator[tuple[Any, ...]]:
        """The stored tuples (fields in declaration order) of the rows in `[start, end)`."""
        ts = self._timestamp
        return (row for row in self._rows if start <= row[ts] < end)


_AI_NAMES = AIRequestLog._fields
#: Where a stored AI row's tuple holds what a snapshot reads.
_AI_FIELDS = tuple(
    _AI_NAMES.index(name)
    for name in (
        "timestamp",
        "provider",
        "success",
        "latency_ms",
        "error",
        "tokens_used",
        "cost",
        "shadow",
    )
)
_AUTH_FAILURE_TIMESTAMP = AuthFailure._fields.index("timestamp")


class _KeyUse(NamedTuple):
    """Requests of one key in one batch, at the batch's latest use of it."""

    timestamp: float
    key_id: str
    requests: int


class _Series:
    """A provider's figures while a snapshot adds them up."""

    __slots__ = ("cost", "latency", "requests", "successes", "tokens")

    def __init__(self, buckets: int) -> None:
        self.requests = [0] * buckets
        self.successes = [0] * buckets
        self.tokens: float = 0
        self.cost: float = 0.0
        self.latency = [0] * (len(LATENCY_BOUNDS_MS) + 1)

    def freeze(self, provider: str) -> ProviderSeries:
        return ProviderSeries(
            provider,
            tuple(self.requests),
            tuple(self.successes),
            int(self.tokens),
            float(self.cost),
            tuple(self.latency),
        )


def _key_summary(record: ApiKeyRecord, requests: int) -> KeyUsageSummary:
    return KeyUsageSummary(
        id=record.id,
        name=record.name,
        prefix=record.prefix,
        kind=record.kind,
        requests=requests,
        last_used=record.last_used,
        active=record.active,
    )
