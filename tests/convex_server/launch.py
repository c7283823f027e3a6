"""Start and stop the loopback Convex test server (tests and benchmarks only).

Fault tests control the process for real: `kill()` (SIGKILL: connections reset, all data
gone), `restart()` (a fresh, empty server on the same port), `pause()` / `resume()`
(SIGSTOP / SIGCONT: connections accepted by the kernel, never answered).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
TSX = ROOT / "convex" / "node_modules" / ".bin" / "tsx"
SERVER = ROOT / "tests" / "convex_server" / "server.ts"


def server_flags(
    *,
    occ: bool | None = None,
    occ_retries: int | None = None,
    occ_backoff_ms: tuple[float, float] | None = None,
    max_concurrent_mutations: int | None = None,
    queue_timeout_ms: int | None = None,
) -> list[str]:
    """`server.ts` flags for the mutation options given (None: the backend's default)."""
    flags: list[str] = []
    if occ is not None:
        flags += ["--occ", "on" if occ else "off"]
    if occ_retries is not None:
        flags += ["--occ-retries", str(occ_retries)]
    if occ_backoff_ms is not None:
        flags += ["--occ-backoff-ms", f"{occ_backoff_ms[0]:g},{occ_backoff_ms[1]:g}"]
    if max_concurrent_mutations is not None:
        flags += ["--max-concurrent-mutations", str(max_concurrent_mutations)]
    if queue_timeout_ms is not None:
        flags += ["--queue-timeout-ms", str(queue_timeout_ms)]
    return flags


def _spawn(
    port: int, admin_key: str, flags: list[str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start the server on `port` (0 = a free one) with `flags` (see `server_flags`);
    returns the process and its port."""
    if not TSX.exists():
        raise RuntimeError("convex/node_modules is missing: run `make test` (it runs npm ci)")
    env = {**os.environ, "CONVEX_SELF_HOSTED_ADMIN_KEY": admin_key}
    process = subprocess.Popen(
        [str(TSX), str(SERVER), "--port", str(port), *(flags or [])],
        cwd=ROOT / "convex",
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env=env,
        # tsx runs node as a child: signals go to the whole group, so SIGKILL/SIGSTOP reach
        # the process that holds the port.
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"Convex test server did not start: {line!r}")
        bound = int(line.split()[-1])
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{bound}/version", timeout=1).status_code == 200:
                    return process, bound
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Convex test server never answered /version")
            time.sleep(0.05)
    except BaseException:
        _terminate(process)
        raise


def _signal(process: subprocess.Popen[str], sig: signal.Signals) -> None:
    """Send `sig` to the server's process group (tsx and the node process it started)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


def _terminate(process: subprocess.Popen[str]) -> None:
    _signal(process, signal.SIGCONT)  # a paused server cannot handle SIGTERM
    _signal(process, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait(timeout=10)


class ConvexTestServer:
    """The Node loopback server running `convex/` under convex-test (tests only)."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        port: int,
        admin_key: str,
        flags: list[str] | None = None,
    ) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_key = admin_key
        self.flags = list(flags or [])

    def _admin(self, path: str, body: dict[str, object] | None = None) -> dict[str, Any]:
        response = httpx.post(
            self.url + path,
            json=body or {},
            headers={"Authorization": f"Convex {self.admin_key}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]  # httpx: JSON is Any

    def reset(self) -> None:
        """A fresh, empty deployment (and the real clock again)."""
        self._admin("/_test/reset")
        self._admin("/_test/time", {"offsetMs": 0})

    def shift_clock(self, offset_ms: float) -> float:
        """Move the functions' `Date.now()` by `offset_ms` from the wall clock; returns now."""
        return float(self._admin("/_test/time", {"offsetMs": offset_ms})["now"])

    def counters(self, *, reset: bool = False) -> dict[str, Any]:
        """The OCC emulation's counters: `totals` (mutations, attempts, commits, conflicts,
        retries, occFailures, overloaded) and `documents` (component, table, id, writes,
        conflicts, retries, occFailures; most written first). `reset` zeroes them after."""
        return self._admin("/_test/counters", {"reset": True} if reset else {})

    def hold(self, ms: float) -> None:
        """Keep the server's serial point busy for `ms`: mutations sent meanwhile arrive
        together and overlap, as concurrent requests do on the backend."""
        self._admin("/_test/hold", {"ms": ms})

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every document of `table`, oldest first (Convex-encoded JSON values)."""
        return list(self._admin("/_test/dump", {"table": table})["rows"])

    # -- faults ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the server: open connections reset, everything it held is gone."""
        _signal(self.process, signal.SIGKILL)
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def restart(self) -> None:
        """Start a fresh (empty) server on the same port, after `kill()` or a crash."""
        if self.alive:
            raise RuntimeError("the server is still running: kill() it first")
        deadline = time.monotonic() + 10
        while True:
            try:
                self.process, _ = _spawn(self.port, self.admin_key, self.flags)
                return
            except RuntimeError:
                if time.monotonic() > deadline:  # the port may linger briefly after a kill
                    raise
                time.sleep(0.2)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nobody answers them."""
        _signal(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        _signal(self.process, signal.SIGCONT)

    def stop(self) -> None:
        _terminate(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def running_server(
    port: int = 0,
    *,
    occ: bool | None = None,
    occ_retries: int | None = None,
    occ_backoff_ms: tuple[float, float] | None = None,
    max_concurrent_mutations: int | None = None,
    queue_timeout_ms: int | None = None,
) -> Iterator[ConvexTestServer]:
    """Start the server on `port` (0 = a free loopback port), wait until it answers, stop it.

    The mutation options default to the backend's (OCC on, 4 retries, 100-2000 ms backoff,
    16 concurrent mutations, 5000 ms queue timeout); `restart()` keeps them.
    """
    admin_key = "test-admin-" + secrets.token_hex(16)
    flags = server_flags(
        occ=occ,
        occ_retries=occ_retries,
        occ_backoff_ms=occ_backoff_ms,
        max_concurrent_mutations=max_concurrent_mutations,
        queue_timeout_ms=queue_timeout_ms,
    )
    process, bound = _spawn(port, admin_key, flags)
    server = ConvexTestServer(process, bound, admin_key, flags)
    try:
        yield server
    finally:
        server.stop()
