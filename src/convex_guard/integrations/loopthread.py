"""One background event loop per process, for callers that are not async (WSGI, sync Django).

The guard's store clients (httpx for Convex), its log writer and its locks belong to one event
loop. A new loop per request would rebuild connection pools and lose the writer's flusher; a
loop per thread would split them. So every sync caller hands its coroutines to this one loop,
started lazily on a daemon thread and kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def loop() -> asyncio.AbstractEventLoop:
    """The process-wide guard loop, started on first use."""
    global _loop, _thread
    current = _loop
    if current is not None and _thread is not None and _thread.is_alive():
        return current
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            new = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=_serve, args=(new, ready), name="convex-guard loop", daemon=True
            )
            thread.start()
            ready.wait()
            _loop, _thread = new, thread
        return _loop


def thread_id() -> int | None:
    """The loop thread's ident (for tests and diagnostics), `None` before first use."""
    return _thread.ident if _thread is not None else None


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule `coro` on the guard loop; the caller may wait on, or wrap, the future."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the guard loop and wait for its result (never from the loop itself)."""
    if threading.get_ident() == thread_id():
        coro.close()
        raise RuntimeError("loopthread.run() called from the guard loop itself: it would deadlock")
    return submit(coro).result(timeout)
