"""The convex-guard CLI, driven with an injected MemoryStore and clock, and `watch` as a real
process against a closed port, servers that are not Convex, and the loopback Convex server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from convex_guard import HOUR, MINUTE, MemoryStore
from convex_guard.cli import (
    NO_DEPLOYMENT,
    main,
    parse_duration,
    parse_seconds,
    scrub,
    store_from_environment,
)
from convex_guard.core.keys import hash_key
from convex_guard.core.settings import redact_url
from convex_guard.stores.base import AIRequestLog, BotEvent, LogBatch

from .conftest import ConvexTestServer
from .fault_tools import ROOT, free_port

NOW = 1_800_000_000_000.0  # 2027-01-15 08:00:00Z


class Run:
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), store=self.store, clock=lambda: NOW, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def run() -> Run:
    return Run(MemoryStore(clock=lambda: NOW))


def test_keys_create_shows_the_key_once_and_stores_its_hash(run: Run) -> None:
    code, out, err = run(
        "keys", "create", "--name", "ci", "--owner", "ann", "--scope", "chat", "--scope",
        "embed", "--rate-limit", "100/1m",
    )  # fmt: skip
    assert code == 0
    key = out.strip().splitlines()[-1].split(": ", 1)[1]
    assert key.startswith("cg_ai_")
    assert "cannot be shown again" in err
    header, rule, line = out.splitlines()[:3]
    assert header.split() == [
        "ID", "KIND", "PREFIX", "NAME", "OWNER", "SCOPES", "LIMIT", "STATUS", "EXPIRES", "LAST",
        "USED", "REQUESTS",
    ]  # fmt: skip
    assert set(rule.replace(" ", "")) == {"-"}
    assert line.split()[:8] == [
        "mem_1",
        "ai",
        key[:10] + "…",
        "ci",
        "ann",
        "chat,embed",
        "100/1m",
        "active",
    ]
    assert "2027-02-14 08:00:00Z" in line  # 30 days on
    records = asyncio.run(run.store.list_api_keys())
    assert records[0].key_hash == hash_key(key)
    assert key not in repr(records)

    code, out, _ = run(
        "keys", "create", "--name", "emb", "--kind", "embedding", "--no-expiry", "--json"
    )
    data = json.loads(out)
    assert data["kind"] == "embedding" and data["expiresAt"] is None
    assert (
        data["key"].startswith("cg_emb_")
        and hash_key(data["key"])
        == asyncio.run(run.store.list_api_keys(kind="embedding"))[0].key_hash
    )


def test_keys_list_table_aligns_and_never_shows_keys(run: Run) -> None:
    keys = [
        json.loads(run("keys", "create", "--name", n, "--json")[1])["key"]
        for n in ("a", "longer-name")
    ]
    code, out, _ = run("keys", "list")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4
    # Aligned: every column starts at the same offset on every line.
    assert lines[0].index("NAME") == lines[2].index(" a ") + 1 == lines[3].index("longer-name")
    assert lines[0].index("REQUESTS") + len("REQUESTS") == len(lines[2]) == len(lines[3])
    assert not any(k in out for k in keys)
    listed = json.loads(run("keys", "list", "--json")[1])
    assert [k["name"] for k in listed] == ["a", "longer-name"]
    assert all("key" not in k for k in listed)
    assert not any(k in json.dumps(listed) for k in keys)


def test_keys_revoke_and_rotate(run: Run) -> None:
    run("keys", "create", "--name", "svc", "--scope", "chat")
    code, out, _ = run("keys", "revoke", "mem_1")
    assert (code, out) == (0, "Revoked mem_1 (svc).\n")
    assert json.loads(run("keys", "list", "--json")[1])[0]["active"] is False
    assert "revoked" in run("keys", "list")[1]
    code, _, err = run("keys", "revoke", "mem_99")
    assert code == 1 and "No API key with id 'mem_99'" in err

    run("keys", "create", "--name", "svc2", "--scope", "chat")
    code, out, _ = run("keys", "rotate", "mem_2", "--grace", "2h", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "svc2" and data["scopes"] == ["chat"] and data["replaces"] == "mem_2"
    assert data["oldKeyExpiresAt"] == NOW + 2 * HOUR
    code, out, _ = run("keys", "rotate", "mem_3")
    assert code == 0 and "The old key keeps working until 2027-01-16 08:00:00Z." in out
    code, _, err = run("keys", "rotate", "mem_1")
    assert code == 1 and "revoked" in err
    code, out, _ = run("keys", "revoke", "mem_3", "--json")
    data = json.loads(out)
    assert code == 0 and data["id"] == "mem_3" and data["active"] is False and "key" not in data


def test_stats_providers(run: Run) -> None:
    def row(
        ts: float, provider: str, ok: bool, latency: float, tokens: int, cost: float
    ) -> AIRequestLog:
        return AIRequestLog(
            ts, provider, "m", "f", "ip", ok, latency, tokens_used=tokens, cost=cost
        )

    asyncio.run(
        run.store.write_logs(
            LogBatch(
                id="x",
                ai_requests=[
                    row(NOW - 10 * MINUTE, "openai", True, 100, 10, 0.5),
                    row(NOW - 20 * MINUTE, "openai", False, 300, 0, 0.0),
                    row(NOW - 2 * HOUR, "openai", True, 999, 999, 9.0),  # outside the hour
                    row(NOW - 5 * MINUTE, "groq", True, 40, 4, 0.01),
                ],
            )
        )
    )
    code, out, _ = run("stats", "providers")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "Since 2027-01-15 07:00:00Z (1h):"
    assert lines[1].split() == ["PROVIDER", "REQUESTS", "SUCCESS", "AVG", "MS", "TOKENS", "COST"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows["openai"] == ["2", "50.0%", "200.0", "10", "0.5000"]
    assert rows["groq"] == ["1", "100.0%", "40.0", "4", "0.0100"]
    assert rows["perplexity"] == ["0", "0.0%", "0.0", "0", "0.0000"]
    data = json.loads(
        run("stats", "providers", "--since", "3h", "--provider", "openai", "--json")[1]
    )
    assert data["providers"] == {
        "openai": {
            "totalRequests": 3,
            "successRate": pytest.approx(2 / 3),
            "averageLatency": pytest.approx(1399 / 3),
            "totalTokens": 1009,
            "totalCost": pytest.approx(9.5),
        }
    }
    assert data["end"] - data["start"] == 3 * HOUR


def test_bots_recent(run: Run) -> None:
    events = [
        BotEvent(NOW - 30 * MINUTE, "fp-old", "1.1.1.1", "curl/8", "bot_useragent", "blocked"),
        BotEvent(
            NOW - 5 * MINUTE,
            "fp-new",
            "2.2.2.2",
            "GPTBot/1.0",
            "ai_scraper",
            "challenged",
            metadata={"category": "ai_crawler", "agent": "GPTBot", "path": "/"},
        ),
        BotEvent(NOW - 3 * HOUR, "fp-ancient", "3.3.3.3", "x", "rate_limit", "blocked"),
    ]
    asyncio.run(run.store.write_logs(LogBatch(id="e", bot_events=events)))
    code, out, _ = run("bots", "recent")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "TIME",
        "TYPE",
        "ACTION",
        "BOT",
        "IP",
        "FINGERPRINT",
        "USER",
        "AGENT",
        "VERIFIED",
        "EVIDENCE",
    ]
    assert lines[2].split() == [
        "2027-01-15",
        "07:55:00Z",
        "ai_scraper",
        "challenged",
        "ai_crawler",
        "GPTBot",
        "2.2.2.2",
        "fp-new",
        "GPTBot/1.0",
        "-",  # no claim was checked: neither verified nor spoofed, no evidence
        "-",
    ]
    assert "fp-old" in lines[3] and len(lines) == 4
    assert lines[3].split()[4] == "-"  # an event that names no agent
    data = json.loads(run("bots", "recent", "--since", "1d", "--limit", "2", "--json")[1])
    assert [e["fingerprint"] for e in data] == ["fp-new", "fp-old"]
    assert data[0]["detectionType"] == "ai_scraper" and data[0]["userAgent"] == "GPTBot/1.0"
    code, _, err = run("bots", "recent", "--limit", "0")
    assert code == 2 and "--limit must be at least 1" in err


def test_no_deployment_configured_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("CONVEX_SELF_HOSTED_URL", "CONVEX_URL", "CONVEX_SELF_HOSTED_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["keys", "list"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == NO_DEPLOYMENT
    assert "\n" not in captured.err.strip() and captured.out == ""


def test_deployment_without_admin_key_or_store_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONVEX_SELF_HOSTED_URL", "http://127.0.0.1:3210")
    monkeypatch.delenv("CONVEX_SELF_HOSTED_ADMIN_KEY", raising=False)
    assert main(["stats", "providers"]) == 2
    assert "CONVEX_SELF_HOSTED_ADMIN_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", "secret-admin-key")
    monkeypatch.setitem(sys.modules, "convex_guard.stores.convex", None)  # import fails
    assert main(["stats", "providers"]) == 2
    err = capsys.readouterr().err
    assert "no ConvexStore" in err and "secret-admin-key" not in err


def test_store_from_environment_uses_convex_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEX_URL", "http://127.0.0.1:3210")
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", "k")
    store = MemoryStore()
    fake = types.ModuleType("convex_guard.stores.convex")
    fake.ConvexStore = types.SimpleNamespace(from_env=lambda: store)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "convex_guard.stores.convex", fake)
    assert store_from_environment() is store


def test_bad_arguments() -> None:
    assert parse_duration("1h30m") == 90 * MINUTE
    assert parse_duration("250ms") == 250
    for bad in ("", "1", "h", "-1h", "1x", "0s"):
        with pytest.raises(Exception, match="not a duration"):
            parse_duration(bad)
    with pytest.raises(SystemExit) as exc:
        main(["stats", "providers", "--since", "soon"], store=MemoryStore())
    assert exc.value.code == 2


# -- `convex-guard watch` as a real process ---------------------------------------------------


def cli_process(url: str, *argv: str, admin_key: str = "admin-s3cr3t-key") -> subprocess.Popen[str]:
    """`python -m convex_guard.cli ARGV` against `url`, with this worktree's source."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVEX_", "RATE_LIMIT_"))}
    env.update(
        PYTHONPATH=str(ROOT / "src"),
        CONVEX_SELF_HOSTED_URL=url,
        CONVEX_SELF_HOSTED_ADMIN_KEY=admin_key,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "convex_guard.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As a terminal starts a command: a suite run in the background (`make test &`, a
        # non-interactive shell's `&`) has SIGINT ignored, and the child would inherit that.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(process: subprocess.Popen[str], within: float) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running after {within} s; printed {out!r} {err!r}")
    return process.returncode, out, err


class _Fake(BaseHTTPRequestHandler):
    """An HTTP server that is not Convex, in one of three ways (`server.kind`)."""

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        assert isinstance(self.server, _FakeServer)
        kind = self.server.kind
        self.server.paths.append(self.path)
        if kind == "404":
            self._answer(404, b"not found")
        else:  # a WebSocket upgrade gets a page too: no sync protocol here
            self._answer(200, b"1.0" if kind == "http-only" else b"<html>a site</html>")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        assert isinstance(self.server, _FakeServer)
        if self.server.kind == "http-only":
            self._answer(200, b'{"status":"success","value":[],"logLines":[]}')
        else:
            self._answer(200, b"<html>a site</html>")

    def log_message(self, *args: object) -> None:
        pass


class _FakeServer(ThreadingHTTPServer):
    """An HTTP server that is not Convex, of a `kind`, recording the paths asked."""

    def __init__(self, kind: str) -> None:
        super().__init__(("127.0.0.1", 0), _Fake)
        self.kind = kind
        self.paths: list[str] = []


@contextlib.contextmanager
def fake_server(kind: str) -> Iterator[_FakeServer]:
    server = _FakeServer(kind)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


#: What a loaded 2-core machine needs to start the interpreter, on top of `--timeout`.
STARTUP_SLACK = 15.0


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("closed", "cannot reach http://***@127.0.0.1:"),
        ("silent", "did not answer within 2 s"),
        ("404", "is not a Convex deployment (GET /version answered HTTP 404)"),
        ("site", "is not a Convex deployment with convex-guard's functions"),
        ("http-only", "no update from http://***@127.0.0.1:"),
    ],
)
def test_watch_on_something_else_than_convex_exits_1_in_one_line(kind: str, expected: str) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "closed":
            url = f"http://127.0.0.1:{free_port()}"
        elif kind == "silent":  # the kernel accepts connections, nobody answers them
            listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        else:
            url = f"http://127.0.0.1:{stack.enter_context(fake_server(kind)).server_port}"
        credentialed = url.replace("http://", "http://ops:s3cr3t@")
        started = time.monotonic()
        code, out, err = finish(cli_process(credentialed, "watch", "--timeout", "2"), 60)
        elapsed = time.monotonic() - started
    assert code == 1 and out == ""
    assert err.endswith("\n") and "\n" not in err.rstrip("\n"), err
    assert expected in err and "s3cr3t" not in err and "Traceback" not in err
    # The "http-only" server answers HTTP, then the client's sync never connects: two steps.
    assert elapsed < (4 if kind == "http-only" else 2) + STARTUP_SLACK


def test_sigint_while_the_client_blocks_exits_at_once() -> None:
    """Ctrl-C while the Convex client waits, GIL held, for a sync endpoint that never comes."""
    with fake_server("http-only") as server:
        process = cli_process(f"http://127.0.0.1:{server.server_port}", "watch", "--timeout", "120")
        deadline = time.monotonic() + 60
        while not any("sync" in path for path in server.paths):  # the client tries its WebSocket
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        code, out, err = finish(process, 30)
    assert (code, out, err) == (130, "", "")
    assert time.monotonic() - interrupted < 3  # the client runs signal handlers once a second


def test_sigint_after_the_first_update_exits_at_once(convex_server: ConvexTestServer) -> None:
    process = cli_process(convex_server.url, "watch", "--json", admin_key=convex_server.admin_key)
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        # The first update arrived (what it holds depends on the tests before this one).
        assert "providers" in first and isinstance(first["botEvents"], list)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        code, _, err = finish(process, 30)
    finally:
        if process.poll() is None:
            process.kill()
    assert (code, err) == (130, "")  # no traceback, no warning from the client
    assert time.monotonic() - interrupted < 5


def test_other_commands_print_no_credentials_of_the_url() -> None:
    url = f"http://ops:s3cr3t@127.0.0.1:{free_port()}"
    code, out, err = finish(cli_process(url, "keys", "list"), 60)
    assert code == 1 and out == ""
    assert "http://***@127.0.0.1:" in err and "s3cr3t" not in err and err.count("\n") == 1


def test_scrub_hides_userinfo_and_the_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", "convex-self-hosted|01abcdef")
    text = "https://u:p@h:3210/x said 'Convex convex-self-hosted|01abcdef' to http://h"
    assert scrub(text) == "https://***@h:3210/x said 'Convex **********' to http://h"
    assert parse_seconds("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seconds(bad)


@given(
    user=st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), max_size=20),
    password=st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1),
    scheme=st.sampled_from(["http", "https", "HTTPS", "postgresql"]),
)
def test_redact_url_never_shows_the_password(user: str, password: str, scheme: str) -> None:
    assume(not set(user + password) & set("'\"<>"))  # never unescaped in a URL
    secret = "S3CR3T" + password
    text = f"deployment {scheme}://{user}:{secret}@host:3210/api unreachable"
    redacted = redact_url(text)
    assert "S3CR3T" not in redacted
    assert redacted.endswith("@host:3210/api unreachable")
    assert redacted.startswith(f"deployment {scheme}://***@")
