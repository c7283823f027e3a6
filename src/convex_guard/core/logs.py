"""A log line per kind of trouble, not per request: a store outage must not flood the logs.

Text a client chose (paths, user-agents, addresses, header values) goes into log lines
through `printable`, so a `%0a` in a path cannot forge a second line and an ANSI escape
cannot repaint an operator's terminal.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("convex_guard")

#: Longest request-derived value a log line quotes; the rest is cut and marked.
MAX_LOGGED = 200
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object, limit: int = MAX_LOGGED) -> str:
    """`value` as text safe in a log line: control and other non-printable characters
    escaped (`\\n`, `\\x1b`, `\\u2028`), at most `limit` characters (then `…`).

    Printable text, the common case, comes back as it is, at the cost of one scan.
    """
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]  # first: a client's 60 kB path costs no more than its head
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
        if len(text) > limit:
            text, cut = text[:limit], True
    return text + "…" if cut else text


def _escape(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


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
