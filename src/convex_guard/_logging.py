"""A log line per kind of trouble, not per request: a store outage must not flood the logs."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("convex_guard")


class ThrottledLog:
    """Logs the first occurrence, then at most once per `interval` seconds with a count."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            message += " (%d similar suppressed)"
            args = (*args, self._suppressed)
        self._last = now
        self._suppressed = 0
        logger.warning(message, *args)
