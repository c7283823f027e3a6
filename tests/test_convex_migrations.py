"""The Convex data migrations, run as an operator runs them, on the loopback deployment.

`migrations:run` starts every pending migration and `migrations:status` says where each is;
`make convex-migrate` (convex/scripts/migrate.mjs) calls both. The batches run on the
deployment's scheduler.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from convex.http_client import ConvexHttpClient
from convex.values import CoercibleToConvexValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convex_guard import BotCheck, ConvexStore
from convex_guard.core.clientip import UNKNOWN_CLIENT, peer_keys

from .conftest import ConvexTestServer

MIGRATION = "migrations:backfillBotClientKey"
# The client takes arguments of this type; the dicts below are declared so, not inferred.
Args = dict[str, CoercibleToConvexValue]
MIGRATE_SCRIPT = Path(__file__).parents[1] / "convex" / "scripts" / "migrate.mjs"

# Any address, and IPv6 ones thick with zero hextets: how they are written ("::" for the
# first longest run of two or more) is where two implementations can differ.
HEXTET = st.one_of(st.just(0), st.just(0), st.integers(0, 0xFFFF))
ZEROS_IPV6 = st.lists(HEXTET, min_size=8, max_size=8).map(
    lambda hextets: IPv6Address(b"".join(h.to_bytes(2, "big") for h in hextets))
)


def admin_client(server: ConvexTestServer) -> ConvexHttpClient:
    client = ConvexHttpClient(server.url)
    client.set_admin_auth(server.admin_key)
    return client


def migrate(client: ConvexHttpClient, timeout: float = 30) -> dict[str, object]:
    """Start the pending migrations and wait until they are done (or one failed)."""
    client.mutation("migrations:run", {})
    deadline = time.monotonic() + timeout
    while True:
        [status] = client.query("migrations:status", {})
        if status["isDone"] or status["state"] == "failed" or time.monotonic() > deadline:
            return dict(status)
        time.sleep(0.05)


def old_event(ip: str, i: int, now: float) -> Args:
    """A bot event as the release before client keys wrote it: no `clientKey`."""
    return {
        "timestamp": now - i,
        "fingerprint": f"fp-{i}",
        "ip": ip,
        "userAgent": "curl/8.0",
        "detectionType": "bot_useragent",
        "action": "allowed",
    }


def write_bot_events(client: ConvexHttpClient, events: list[Args]) -> None:
    """One log batch of `events`, as the app's log writer sends it."""
    empty: list[Args] = []
    batch: Args = {
        "batchId": "old",
        "aiRequests": empty,
        "embeddingRequests": empty,
        "authFailures": empty,
        "botEvents": list(events),
        "keyUsage": empty,
    }
    client.mutation("logs:writeBatch", batch)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.ip_addresses() | ZEROS_IPV6, min_size=1, max_size=150, unique=True))
def test_backfilled_keys_are_the_ones_the_python_side_gives(
    convex_server: ConvexTestServer, addresses: list[IPv4Address | IPv6Address]
) -> None:
    convex_server.reset()
    client = admin_client(convex_server)
    # The address each event recorded (as the fingerprint middleware writes it), and one
    # event of a client without one.
    ips = list(dict.fromkeys(peer_keys(str(address), 128)[0] for address in addresses))
    ips.append(UNKNOWN_CLIENT)
    now = time.time() * 1000
    events = [old_event(ip, i, now) for i, ip in enumerate(ips)]
    write_bot_events(client, events)

    status = migrate(client)

    assert status == {**status, "name": MIGRATION, "state": "success", "processed": len(ips)}
    rows = convex_server.rows("botDetectionEvents")
    expected: dict[str, str | None] = {ip: peer_keys(ip)[1] for ip in ips}
    expected[UNKNOWN_CLIENT] = None  # no key, as events of clients without an address get
    assert {row["ip"]: row.get("clientKey") for row in rows} == expected


async def test_after_the_migration_escalation_counts_the_old_releases_events(
    convex_server: ConvexTestServer,
) -> None:
    convex_server.reset()
    ip, client_key = peer_keys("2001:db8:1:2:3:4:5:6")
    store = ConvexStore(convex_server.url, convex_server.admin_key)

    async def flag(fingerprint: str, key: str | None) -> tuple[str, int]:
        check = BotCheck(fingerprint, ip, "curl/8.0", "bot_useragent", "allowed", client_key=key)
        verdict = (await store.check([], bot=check)).bot
        assert verdict is not None
        return verdict.action, verdict.previous_events

    try:
        # The old release: one client rotating its fingerprint, counted per fingerprint only.
        assert [await flag(f"fp-old-{i}", None) for i in range(10)] == [("allowed", 0)] * 10
        # The new release before the migration: that history is not in the client's count.
        assert await flag("fp-new-1", client_key) == ("allowed", 0)

        assert migrate(admin_client(convex_server))["state"] == "success"

        # After it: all eleven are, and the twelfth flagged request is blocked.
        assert await flag("fp-new-2", client_key) == ("blocked", 11)
    finally:
        await store.close()


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`make convex-migrate`'s command, with the deployment given in `env`."""
    return subprocess.run(
        ["node", str(MIGRATE_SCRIPT), *args],
        env={**os.environ, "CONVEX_MIGRATE_POLL_MS": "50", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_convex_migrate_runs_the_pending_migrations_and_waits(
    convex_server: ConvexTestServer,
) -> None:
    convex_server.reset()
    client = admin_client(convex_server)
    now = time.time() * 1000
    # Three batches of the component's 100: the script must wait for the scheduled two.
    events = [old_event(f"198.51.{i // 256}.{i % 256}", i, now) for i in range(250)]
    write_bot_events(client, events)
    deployment = {
        "CONVEX_SELF_HOSTED_URL": convex_server.url,
        "CONVEX_SELF_HOSTED_ADMIN_KEY": convex_server.admin_key,
    }

    dry = run_script(deployment, '{"dryRun": true}')
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["DryRun"] == "No changes were committed."
    assert not any("clientKey" in row for row in convex_server.rows("botDetectionEvents"))

    done = run_script(deployment)
    assert done.returncode == 0, done.stderr
    assert f"{MIGRATION}: success, 250 rows processed" in done.stdout.splitlines()
    rows = convex_server.rows("botDetectionEvents")
    assert [row.get("clientKey") for row in rows] == [row["ip"] for row in rows]

    again = run_script(deployment)
    assert again.returncode == 0, again.stderr
    assert '"Status": "Migration already done."' in again.stdout
    for result in (dry, done, again):
        assert convex_server.admin_key not in result.stdout + result.stderr


def test_convex_migrate_refuses_a_bad_configuration(convex_server: ConvexTestServer) -> None:
    key = "wrong-key-do-not-echo"
    wrong = run_script(
        {"CONVEX_SELF_HOSTED_URL": convex_server.url, "CONVEX_SELF_HOSTED_ADMIN_KEY": key}
    )
    assert wrong.returncode == 2
    assert "refused the admin key" in wrong.stderr
    with_password = convex_server.url.replace("//", "//user:secret-pw@")
    credentials = run_script(
        {"CONVEX_SELF_HOSTED_URL": with_password, "CONVEX_SELF_HOSTED_ADMIN_KEY": key}
    )
    assert credentials.returncode == 2
    assert "carries credentials" in credentials.stderr
    for result in (wrong, credentials):
        for secret in (key, "secret-pw"):
            assert secret not in result.stdout + result.stderr
    unset = run_script({"CONVEX_SELF_HOSTED_URL": "", "CONVEX_SELF_HOSTED_ADMIN_KEY": "k"})
    assert (unset.returncode, unset.stderr.strip()) == (
        2,
        "convex-migrate: set CONVEX_SELF_HOSTED_URL (the deployment's URL)",
    )
    bad_args = run_script(
        {"CONVEX_SELF_HOSTED_URL": convex_server.url, "CONVEX_SELF_HOSTED_ADMIN_KEY": "k"}, "[1]"
    )
    assert bad_args.returncode == 2
    assert "must be a JSON object" in bad_args.stderr
