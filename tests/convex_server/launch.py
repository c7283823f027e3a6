"""Start and stop the loopback Convex test server (tests and benchmarks only)."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TSX = ROOT / "convex" / "node_modules" / ".bin" / "tsx"
SERVER = ROOT / "tests" / "convex_server" / "server.ts"


class ConvexTestServer:
    """The Node loopback server running `convex/` under convex-test (tests only)."""

    def __init__(self, process: subprocess.Popen[str], port: int, admin_key: str) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_key = admin_key

    def _admin(self, path: str, body: dict[str, object] | None = None) -> dict[str, object]:
        response = httpx.post(
            self.url + path,
            json=body or {},
            headers={"Authorization": f"Convex {self.admin_key}"},
            timeout=10,
        )
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        """A fresh, empty deployment (and the real clock again)."""
        self._admin("/_test/reset")
        self._admin("/_test/time", {"offsetMs": 0})

    def shift_clock(self, offset_ms: float) -> float:
        """Move the functions' `Date.now()` by `offset_ms` from the wall clock; returns now."""
        return float(self._admin("/_test/time", {"offsetMs": offset_ms})["now"])  # type: ignore[arg-type]


@contextlib.contextmanager
def running_server() -> Iterator[ConvexTestServer]:
    """Start the server on a free loopback port, wait until it answers, stop it after."""
    if not TSX.exists():
        raise RuntimeError("convex/node_modules is missing: run `make test` (it runs npm ci)")
    admin_key = "test-admin-" + secrets.token_hex(16)
    env = {**os.environ, "CONVEX_SELF_HOSTED_ADMIN_KEY": admin_key}
    process = subprocess.Popen(
        [str(TSX), str(SERVER), "--port", "0"],
        cwd=ROOT / "convex",
        stdout=subprocess.PIPE,
        stderr=None,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"Convex test server did not start: {line!r}")
        server = ConvexTestServer(process, int(line.split()[-1]), admin_key)
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(server.url + "/version", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("Convex test server never answered /version")
            time.sleep(0.05)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
