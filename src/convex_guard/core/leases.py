"""Local leases on unkeyed limits: the sans-IO bookkeeping of tokens a process holds.

An unkeyed limit (global, per provider) is one state that every app instance would otherwise
write on every request. Instead a process takes a block of its tokens from the store in one
call and admits from the block locally. This module decides when a block is needed, how large
it is, and what the tokens held are worth; the store does the calls. No I/O and no clock of its
own: every method is given `now` (epoch ms, on the store's clock).
"""

from __future__ import annotations

import math

from convex_guard.core.limits import LimitConfig, LimitResult, _until_full, shard_factor

#: Defaults of `ConvexStore`'s lease options.
DEFAULT_HORIZON = 1.0  # seconds of this process's own recent demand per block
DEFAULT_FRACTION = 0.1  # the most of a limit's capacity one process holds at once
DEFAULT_IDLE = 5.0  # seconds without an admission after which a lease's tokens go back


def largest_block(config: LimitConfig, fraction: float = DEFAULT_FRACTION) -> float:
    """The most tokens one lease takes at once (beyond a single request's own count).

    `fraction` of the capacity, and for a sharded limit no more than one shard's tokens (a
    fresh shard is decided alone) nor what the component accepts per call. With `instances`
    processes, a limit admits at most its limit plus `instances` times this.
    """
    shards = config.shards or 1
    per_call = config.max / shard_factor(config)
    return min(fraction * config.max, per_call, config.max / shards)


class Lease:
    """The tokens of one unkeyed limit that this process holds.

    Accounting, in tokens, always holds: `granted = used + returned + dropped + tokens`.
    `used` counts admissions; a request taken locally and then denied by another of its limits
    is put back (`untake`). A fixed window's tokens belong to the window (`window`, the `ts`
    they were granted in): once it has ended they are `dropped`, never used or returned.
    """

    __slots__ = (
        "_block_cap",
        "_cur",
        "_horizon",
        "_idle",
        "_prev",
        "_second",
        "config",
        "dropped",
        "granted",
        "largest",
        "last_used",
        "pending",
        "queued",
        "refused_until",
        "returned",
        "tokens",
        "ts",
        "used",
        "value",
        "window",
    )

    def __init__(
        self,
        config: LimitConfig,
        *,
        horizon: float = DEFAULT_HORIZON,
        fraction: float = DEFAULT_FRACTION,
        idle: float = DEFAULT_IDLE,
    ) -> None:
        self.config = config
        self._horizon = horizon
        self._idle = idle * 1000.0
        self._block_cap = largest_block(config, fraction)
        self.tokens = 0.0
        self.window: float | None = None
        self.pending = 0.0
        self.queued = 0.0  # the counts of requests waiting for a block in flight
        self.refused_until = -math.inf
        self.last_used = -math.inf
        # The limit's state in the store as last seen (for the estimates of `result`).
        self.value = config.max
        self.ts = -math.inf
        self.granted = self.used = self.returned = self.dropped = 0.0
        self.largest = 0.0  # the largest block granted at once
        self._second = 0.0
        self._cur = self._prev = 0.0

    # -- demand --------------------------------------------------------------------------
    def _note(self, count: float, now: float) -> None:
        second = now // 1000.0
        if second != self._second:
            self._prev = self._cur if second == self._second + 1 else 0.0
            self._cur = 0.0
            self._second = second
        self._cur += count
        self.last_used = now

    def demand(self, now: float) -> float:
        """Tokens admitted over the last second (two one-second counts, interpolated)."""
        second = now // 1000.0
        if second == self._second:
            cur, prev = self._cur, self._prev
        elif second == self._second + 1:
            cur, prev = 0.0, self._cur
        else:
            return 0.0
        return cur + prev * (1.0 - (now % 1000.0) / 1000.0)

    # -- local decisions -----------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Drop a fixed window's tokens once their window has ended."""
        if self.window is not None and now >= self.window + self.config.period:
            self.dropped += self.tokens
            self.tokens = 0.0
            self.window = None

    def take(self, count: float, now: float) -> bool:
        """Admit `count` from the tokens held, if they cover it."""
        self.expire(now)
        if self.tokens < count:
            return False
        self.tokens -= count
        self.used += count
        self._note(count, now)
        return True

    def untake(self, count: float, window: float | None) -> None:
        """Put back a local admission of a request that another limit denied.

        `window` is the one the tokens were taken in: if it is no longer the window held, they
        are dropped instead, never spent in a later one.
        """
        self.used -= count
        if window == self.window:
            self.tokens += count
        else:
            self.dropped += count

    def retry_after(self, now: float) -> float | None:
        """While a refused lease holds, the ms until the limit may admit again; else None."""
        return self.refused_until - now if now < self.refused_until else None

    def ask(self, count: float, now: float) -> float:
        """The block to ask for: recent demand over the horizon, at least `count`.

        What is held and already asked for counts against the cap, so concurrent requests of
        one process never hold more than one block between them (beyond their own counts).
        """
        room = self._block_cap - self.tokens - self.pending
        want = max(count, min(max(self._block(now), count + self.queued), room))
        self.pending += want
        return want

    def _block(self, now: float) -> float:
        return float(math.ceil(self.demand(now) * self._horizon))

    def low(self, now: float) -> bool:
        """Held and asked-for tokens are below half a block: worth asking ahead.

        Asked with a call the process makes anyway, a block arrives before the tokens run
        out, so concurrent requests do not each find the pool empty and each ask.
        """
        return self.pending == 0 and self.tokens < min(self._block(now), self._block_cap) / 2

    def grant(
        self,
        granted: float,
        want: float,
        count: float,
        retry_after: float | None,
        value: float,
        ts: float,
        now: float,
    ) -> bool:
        """Apply the store's answer to `ask`; true when it covers the request's `count`.

        A refusal (nothing granted) means the limit is spent everywhere: `retry_after` refuses
        locally until then.
        """
        self.pending = max(0.0, self.pending - want)
        self.value, self.ts = value, ts
        if granted <= 0:
            if count > 0:
                self.refused_until = now + (retry_after if retry_after is not None else 0.0)
            # An ask ahead (no count of its own) refused only says the block was too large:
            # the limit may still hold a request's need.
            return False
        self.granted += granted
        self.largest = max(self.largest, granted)
        self.refused_until = -math.inf
        if self.config.kind == "fixed window":
            self.expire(now)
            if self.window is not None and ts > self.window:
                self.dropped += self.tokens  # a newer window: the old one's tokens are spent
                self.tokens = 0.0
            if self.window is not None and ts < self.window:
                # Granted in a window that has since ended here: only this request uses it.
                self.used += min(count, granted)
                self.dropped += granted - min(count, granted)
                if granted >= count:
                    self._note(count, now)
                    return True
                return False
            self.window = ts
        self.tokens += granted
        return count == 0 or self.take(count, now)

    # -- handing back ----------------------------------------------------------------------
    def idle(self, now: float) -> bool:
        """Tokens held but unused for the idle time: the lease ends and they go back."""
        return self.tokens > 0 and now - self.last_used >= self._idle

    def give_back(self, now: float) -> tuple[float, float | None] | None:
        """The tokens to hand back (and their window), now no longer held; None if none.

        A fixed window's tokens of an ended window are dropped instead: the store would ignore
        them.
        """
        self.expire(now)
        if self.tokens <= 0:
            return None
        amount = self.tokens
        self.tokens = 0.0
        self.returned += amount
        return amount, self.window

    def drop(self) -> None:
        """Forget the tokens held (the limit was reset in the store)."""
        self.dropped += self.tokens
        self.tokens = 0.0
        self.window = None
        self.refused_until = -math.inf

    # -- answers ---------------------------------------------------------------------------
    def result(self, ok: bool, now: float) -> LimitResult:
        """An estimate of the limit as a whole: the store's last seen state plus what is held.

        Other processes' blocks taken since are not seen, so `remaining` may be high by up to
        what they hold; `reset_after` follows from it.
        """
        config = self.config
        value, ts = self.value, self.ts
        if ts == -math.inf:
            value, ts = config.max, now
        elif config.kind == "token bucket":
            value = min(config.max, value + (now - ts) * config.rate / config.period)
            ts = now
        else:
            windows = max(0.0, (now - ts) // config.period)
            value = min(config.max, value + windows * config.rate)
            ts += windows * config.period
        remaining = min(config.max, max(0.0, value) + self.tokens)
        retry = None if ok else self.retry_after(now)
        return LimitResult(ok, retry, remaining, _until_full(config, remaining, ts, now))
