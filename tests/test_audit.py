"""The audit trail: `convex-guard audit` and `--actor`, the ApiKeys service's actors, a
ResilientStore whose primary is down, and no raw key in any entry (hypothesis, over key
material, on MemoryStore and on ConvexStore through the loopback Convex server)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convex_guard import DAY, HOUR, MINUTE, MemoryStore
from convex_guard.cli import default_actor, main
from convex_guard.core.errors import ConfigurationError, StoreError, StoreUnavailableError
from convex_guard.core.keys import KEY_PREFIXES, ApiKeyKind, display_prefix, hash_key
from convex_guard.stores import convex as convex_module
from convex_guard.stores.base import (
    AUDITED_KEY_FIELDS,
    MAX_ACTOR_LENGTH,
    UNKNOWN_ACTOR,
    ApiKeyRecord,
    AuditStore,
    KeyQuota,
    KeyRateLimit,
    NewApiKey,
    check_actor,
)
from convex_guard.stores.convex import ConvexStore
from convex_guard.stores.keys import ApiKeys
from convex_guard.stores.resilient import CircuitBreaker, ResilientStore

from .conftest import ConvexTestServer
from .fault_tools import ROOT

NOW = 1_800_000_000_000.0  # 2027-01-15 08:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Run:
    def __init__(self, store: MemoryStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), store=self.store, clock=self.clock, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def run() -> Run:
    clock = Clock()
    return Run(MemoryStore(clock=clock), clock)


# -- the CLI -------------------------------------------------------------------------------------
def test_key_commands_record_the_actor_and_audit_lists_them(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "ann")
    monkeypatch.setattr("socket.gethostname", lambda: "build-01")
    assert default_actor() == "ann@build-01"
    assert run("keys", "create", "--name", "ci", "--scope", "chat", "--rate-limit", "10/1m")[0] == 0
    run.clock.now += HOUR
    assert run("keys", "rotate", "mem_1", "--grace", "2h", "--actor", "deploy-bot")[0] == 0
    run.clock.now += HOUR
    assert run("keys", "revoke", "mem_2", "--actor", "bob@laptop")[0] == 0

    code, out, err = run("audit", "--json")
    assert (code, err) == (0, "")
    entries = json.loads(out)
    assert [(e["action"], e["keyId"], e["actor"], e["related"]) for e in entries] == [
        ("key.revoked", "mem_2", "bob@laptop", None),
        ("key.rotated", "mem_1", "deploy-bot", "mem_2"),
        ("key.created", "mem_2", "deploy-bot", "mem_1"),
        ("key.created", "mem_1", "ann@build-01", None),
    ]
    assert entries[0]["timestamp"] == NOW + 2 * HOUR
    assert entries[0]["changes"] == [{"field": "active", "before": True, "after": False}]
    assert entries[1]["changes"] == [
        {"field": "expiresAt", "before": NOW + 30 * 24 * HOUR, "after": NOW + 3 * HOUR}
    ]
    assert {"field": "rateLimit", "before": None, "after": {"requests": 10, "period": MINUTE}} in (
        entries[3]["changes"]
    )

    code, out, _ = run("audit")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["TIME", "ACTION", "KEY", "ACTOR", "CHANGES"]
    assert lines[2].split()[:5] == ["2027-01-15", "10:00:00Z", "key.revoked", "mem_2", "bob@laptop"]
    assert lines[2].endswith("active: true -> false")
    assert "expires_at: 2027-02-14 08:00:00Z -> 2027-01-15 11:00:00Z; by mem_2" in lines[3]
    assert "rate_limit=10/1m" in lines[5] and "scopes=chat" in lines[5]

    code, out, _ = run("audit", "--key", "mem_1", "--json")
    assert [e["action"] for e in json.loads(out)] == ["key.rotated", "key.created"]
    code, out, _ = run("audit", "--since", "30m", "--json")
    assert [e["action"] for e in json.loads(out)] == ["key.revoked"]
    code, out, _ = run("audit", "--limit", "2", "--json")
    assert len(json.loads(out)) == 2
    assert run("audit", "--key", "mem_99", "--json")[1] == "[]\n"


def test_a_refused_actor_changes_nothing(run: Run) -> None:
    run("keys", "create", "--name", "ci")
    for argv in (
        ("keys", "create", "--name", "x", "--actor", " "),
        ("keys", "revoke", "mem_1", "--actor", "x" * 201),
        ("keys", "rotate", "mem_1", "--actor", "a\tb"),
    ):
        code, out, err = run(*argv)
        assert (code, out) == (2, "") and "actor" in err and err.count("\n") == 1
    assert [k.id for k in asyncio.run(run.store.list_api_keys())] == ["mem_1"]
    assert len(json.loads(run("audit", "--json")[1])) == 1
    assert json.loads(run("keys", "list", "--json")[1])[0]["active"] is True


def test_without_a_user_name_the_actor_is_unknown_at_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_user() -> str:
        raise OSError("no login name")

    monkeypatch.setattr("getpass.getuser", no_user)
    monkeypatch.setattr("socket.gethostname", lambda: "box")
    assert default_actor() == f"{UNKNOWN_ACTOR}@box"


class KeysOnly:
    """A key store that keeps no audit trail."""

    def __init__(self) -> None:
        self.inner = MemoryStore()

    async def create_api_key(self, key: NewApiKey) -> ApiKeyRecord:
        return await self.inner.create_api_key(key)

    async def find_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        return await self.inner.find_api_key(key_hash)

    async def list_api_keys(self, **filters: object) -> list[ApiKeyRecord]:
        return await self.inner.list_api_keys(**filters)  # type: ignore[arg-type]

    async def update_api_key(self, key_id: str, **fields: object) -> ApiKeyRecord | None:
        return await self.inner.update_api_key(key_id, **fields)  # type: ignore[arg-type]

    async def close(self) -> None:
        return None


def test_audit_of_a_store_without_a_trail_is_one_line(run: Run) -> None:
    err = io.StringIO()
    code = main(["audit"], store=KeysOnly(), stdout=io.StringIO(), stderr=err)  # type: ignore[arg-type]
    assert (code, err.getvalue()) == (1, "convex-guard: the store KeysOnly keeps no audit trail\n")


def test_the_cli_against_convex_records_in_the_same_mutation(
    convex_server: ConvexTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    convex_server.reset()
    monkeypatch.setenv("CONVEX_SELF_HOSTED_URL", convex_server.url)
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", convex_server.admin_key)

    def cli(*argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        assert main(list(argv), stdout=out, stderr=err) == 0, err.getvalue()
        return out.getvalue()

    created = json.loads(cli("keys", "create", "--name", "ci", "--json", "--actor", "ann@ci"))
    cli("keys", "revoke", created["id"], "--actor", "bob")
    entries = json.loads(cli("audit", "--key", created["id"], "--json"))
    assert [(e["action"], e["actor"]) for e in entries] == [
        ("key.revoked", "bob"),
        ("key.created", "ann@ci"),
    ]
    assert created["key"] not in json.dumps(entries)
    # The table holds exactly the entries of the changes made: one per change, none other.
    rows = convex_server.rows("auditLog")
    assert [(r["action"], r["record"]) for r in rows] == [
        ("key.created", created["id"]),
        ("key.revoked", created["id"]),
    ]
    # A missing key: an error, and no entry.
    out, err = io.StringIO(), io.StringIO()
    assert main(["keys", "revoke", "k" * 32, "--actor", "bob"], stdout=out, stderr=err) == 1
    assert len(convex_server.rows("auditLog")) == 2


async def test_convex_store_pages_through_the_trail(
    convex_server: ConvexTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    convex_server.reset()
    monkeypatch.setattr(convex_module, "AUDIT_PAGE", 2)
    store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
    try:
        keys = ApiKeys(store, actor="ops")
        created = await keys.create("a")
        for _ in range(4):
            await keys.revoke(created.record.id)
        other = await keys.create("b")
        entries = await store.audit_entries(limit=5)
        assert [e.record for e in entries] == [other.record.id] + [created.record.id] * 4
        assert len({e.id for e in entries}) == 5
        mine = await store.audit_entries(record=created.record.id, limit=100)
        assert [e.action for e in mine] == ["key.revoked"] * 4 + ["key.created"]
    finally:
        await store.close()
    # The two sides agree on the page size.
    source = (ROOT / "convex" / "convex" / "apiKeys.ts").read_text()
    page = int(source.split("export const AUDIT_PAGE_CAP = ", 1)[1].split(";", 1)[0])
    monkeypatch.undo()
    assert page == convex_module.AUDIT_PAGE


def test_both_sides_audit_the_same_fields_and_actors() -> None:
    source = (ROOT / "convex" / "convex" / "lib" / "audit.ts").read_text()
    length = int(source.split("export const MAX_ACTOR_LENGTH = ", 1)[1].split(";", 1)[0])
    assert length == MAX_ACTOR_LENGTH
    fields = source.split("const FIELDS = [", 1)[1].split("]", 1)[0]
    camel = [f.strip().strip('"') for f in fields.split(",") if f.strip()]
    assert camel == list(convex_module._AUDIT_FIELDS)
    assert tuple(convex_module._AUDIT_FIELDS.values()) == AUDITED_KEY_FIELDS
    assert f'UNKNOWN_ACTOR = "{UNKNOWN_ACTOR}"' in source


# -- the service and ResilientStore ------------------------------------------------------------
async def test_apikeys_actor_defaults_and_refusals() -> None:
    store = MemoryStore()
    keys = ApiKeys(store, actor="svc@app")
    created = await keys.create("a")
    await keys.revoke(created.record.id, actor="ops")
    assert [e.actor for e in await store.audit_entries()] == ["ops", "svc@app"]
    assert [e.actor for e in await store.audit_entries(record="nope")] == []
    anonymous = ApiKeys(store)
    await anonymous.create("b")
    assert (await store.audit_entries(limit=1))[0].actor == UNKNOWN_ACTOR
    with pytest.raises(ConfigurationError, match="actor"):
        ApiKeys(store, actor="")
    # A bad actor on a rotation is refused before the new key exists.
    with pytest.raises(ConfigurationError, match="actor"):
        await keys.rotate(created.record.id, actor="\x00")
    assert len(await store.list_api_keys()) == 2
    with pytest.raises(ConfigurationError, match="AuditStore"):
        ApiKeys(KeysOnly())  # type: ignore[arg-type]
    plain = ApiKeys(KeysOnly(), audit=False)  # type: ignore[arg-type]
    made = await plain.create("c")
    assert (await plain.rotate(made.record.id)).record.id != made.record.id


async def test_memory_store_keeps_the_last_entries_and_counts_the_dropped() -> None:
    store = MemoryStore(max_audit_entries=3)
    keys = ApiKeys(store)
    created = await keys.create("a")
    for _ in range(4):
        await keys.revoke(created.record.id)
    entries = await store.audit_entries()
    assert [e.action for e in entries] == ["key.revoked"] * 3
    assert store.dropped_audit_entries == 2
    with pytest.raises(ValueError, match="max_audit_entries"):
        MemoryStore(max_audit_entries=0)


class Flaky(MemoryStore):
    """A primary whose key writes fail while `down`, before anything is written."""

    down = False

    async def create_api_key(self, key: NewApiKey, **audit: str | None) -> ApiKeyRecord:
        if self.down:
            raise StoreUnavailableError("primary down")
        return await super().create_api_key(key, **audit)  # type: ignore[arg-type]

    async def update_api_key(self, key_id: str, **fields: object) -> ApiKeyRecord | None:
        if self.down:
            raise StoreUnavailableError("primary down")
        return await super().update_api_key(key_id, **fields)  # type: ignore[arg-type]


async def test_resilient_store_audited_writes_fail_when_the_primary_is_down() -> None:
    primary = Flaky()
    store = ResilientStore(primary, breaker=CircuitBreaker(threshold=1, cooldown=60))
    assert isinstance(store, AuditStore)
    keys = ApiKeys(store, actor="ops")
    created = await keys.create("a")
    primary.down = True
    with pytest.raises(StoreError):
        await keys.revoke(created.record.id)
    with pytest.raises(StoreError):  # the circuit is open now: failing fast
        await keys.create("b")
    primary.down = False
    # Nothing went to the fallback, and the primary has one entry per change it made.
    assert store.fallback is not None
    assert await store.fallback.list_api_keys() == []
    assert await store.fallback.audit_entries() == []
    assert [e.action for e in await primary.audit_entries()] == ["key.created"]
    assert (await primary.find_api_key(created.record.key_hash)) == created.record
    with pytest.raises(StoreError):  # reads go through the breaker too
        await store.audit_entries()


async def test_resilient_store_around_a_store_without_a_trail_has_none() -> None:
    class Plain(KeysOnly):
        # The rest of `Store`, unused here; but not the trail.
        def __getattr__(self, name: str) -> object:
            if name == "audit_entries":
                raise AttributeError(name)
            return getattr(self.inner, name)

    store = ResilientStore(Plain())  # type: ignore[arg-type]
    assert not hasattr(store, "audit_entries")
    with pytest.raises(ConfigurationError, match="AuditStore"):
        ApiKeys(store)
    with pytest.raises(ConfigurationError, match="keeps no audit trail"):
        await store.update_api_key("k", active=False, actor="ops")
    await ApiKeys(store, audit=False).create("fine")


# -- no raw key in any entry -------------------------------------------------------------------
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
raw_keys = st.builds(
    lambda kind, body: KEY_PREFIXES[kind] + body,
    st.sampled_from(sorted(KEY_PREFIXES)),
    st.text(alphabet=_BASE62, min_size=43, max_size=43),
)
texts = st.text(max_size=40)


@st.composite
def key_changes(draw: st.DrawFn) -> tuple[str, NewApiKey, str, str]:
    raw = draw(raw_keys)
    kind: ApiKeyKind = "ai" if raw.startswith(KEY_PREFIXES["ai"]) else "embedding"
    new = NewApiKey(
        kind=kind,
        key_hash=hash_key(raw),
        prefix=display_prefix(raw),
        name=draw(texts.filter(str.strip)),
        owner=draw(st.none() | texts),
        scopes=tuple(draw(st.lists(texts, max_size=3))),
        rate_limit=draw(st.none() | st.builds(KeyRateLimit, st.integers(1, 1000), st.just(MINUTE))),
        created_at=NOW,
        expires_at=draw(st.none() | st.just(NOW + HOUR)),
    )
    # An actor of any text, or one that pastes the key itself: refused, never recorded.
    actor = draw(texts | st.just(raw) | st.builds(lambda t: f"{t} {raw}", texts))
    return raw, new, actor, draw(texts)


async def _change_and_check(store: AuditStore, case: tuple[str, NewApiKey, str, str]) -> None:
    raw, new, actor, other_actor = case
    given = (new.name, new.owner or "", *new.scopes, other_actor)
    assume(not any(secret in text for secret in (new.prefix, new.key_hash) for text in given))
    try:
        expected = check_actor(actor)
    except ConfigurationError:
        keys, entries = len(await store.list_api_keys()), len(await store.audit_entries(limit=999))
        with pytest.raises(ConfigurationError):
            await store.create_api_key(new, actor=actor)
        assert len(await store.list_api_keys()) == keys  # refused: neither key nor entry
        assert len(await store.audit_entries(limit=999)) == entries
        expected = None
    if expected is None:
        record = await store.create_api_key(new)
    else:
        record = await store.create_api_key(new, actor=actor)
    try:
        await store.update_api_key(record.id, active=False, actor=other_actor, action="key.revoked")
        revoked = True
    except ConfigurationError:
        revoked = False
    trail = await store.audit_entries(record=record.id)
    assert [e.action for e in trail] == ["key.revoked"] * revoked + ["key.created"]
    assert trail[-1].actor == (expected or UNKNOWN_ACTOR)
    for text in (repr(trail), repr([e.changes for e in trail])):
        assert raw not in text and new.key_hash not in text and new.prefix not in text


@settings(max_examples=40, deadline=None)
@given(case=key_changes())
def test_no_entry_holds_a_raw_key_in_memory(case: tuple[str, NewApiKey, str, str]) -> None:
    asyncio.run(_change_and_check(MemoryStore(), case))


@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=key_changes())
def test_no_entry_holds_a_raw_key_on_convex(
    convex_server: ConvexTestServer, case: tuple[str, NewApiKey, str, str]
) -> None:
    async def go() -> None:
        store = ConvexStore(convex_server.url, convex_server.admin_key, timeout=10)
        try:
            await _change_and_check(store, case)
        finally:
            await store.close()

    asyncio.run(go())


@pytest.mark.parametrize("where", ["memory", "convex"])
async def test_a_keys_tier_is_in_its_entries(where: str, request: pytest.FixtureRequest) -> None:
    """A key's quotas (its tier) are one of its limits: its creation and a rotation record them."""
    if where == "convex":
        server: ConvexTestServer = request.getfixturevalue("convex_server")
        server.reset()
        store: ConvexStore | MemoryStore = ConvexStore(server.url, server.admin_key, timeout=10)
    else:
        store = MemoryStore()
    tier = (KeyQuota("tokens", 50_000.0, float(DAY)), KeyQuota("cost", 5.0, float(DAY)))
    try:
        keys = ApiKeys(store, actor="billing")
        created = await keys.create("paid", quotas=tier)
        plain = await keys.create("free")
        rotated = await keys.rotate(created.record.id)
        first = await store.audit_entries(record=created.record.id)
        assert first[-1].action == "key.created"
        assert ("quotas", None, tier) in [(c.field, c.before, c.after) for c in first[-1].changes]
        (fresh,) = await store.audit_entries(record=rotated.record.id)
        assert dict((c.field, c.after) for c in fresh.changes)["quotas"] == tier
        # No tier is no value: nothing about quotas in a plain key's entry.
        (free,) = await store.audit_entries(record=plain.record.id)
        assert "quotas" not in [c.field for c in free.changes]
    finally:
        await store.close()
