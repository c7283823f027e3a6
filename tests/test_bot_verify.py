"""Verified and spoofed crawlers (published ranges, forward-confirmed reverse DNS) and Web Bot
Auth signatures, through a real server: a guarded app under uvicorn behind a trusted proxy
(the client address is the X-Forwarded-For one), a loopback DNS server, a loopback key
directory, requests signed in the test with keys made in the test."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from convex_guard import GuardMiddleware, GuardSettings
from convex_guard.core.crawlers import CrawlerRanges, default_ranges
from convex_guard.core.webbotauth import (
    MalformedSignature,
    jwk_thumbprint,
    parse_directory,
    signature_claim,
)
from convex_guard.middleware.botverify import CrawlerVerifier
from convex_guard.stores.base import BotEvent
from convex_guard.stores.memory import MemoryStore
from tests.conftest import RunningServer, serve
from tests.dns_server import LoopbackDns, loopback_dns

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
GPTBOT = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko); compatible; GPTBot/1.1; "
    "+https://openai.com/gptbot"
)
CLAUDEBOT = (
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; "
    "+claudebot@anthropic.com)"
)
BROWSER = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0 Safari/537.36"
)
DNS_TIMEOUT = 0.3


def ptr(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


# -- the key directory and signing ----------------------------------------------------------------


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x}


AGENT_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
AGENT_KID = jwk_thumbprint(jwk(AGENT_KEY))
OTHER_KID = jwk_thumbprint(jwk(OTHER_KEY))


def directory_app() -> Starlette:
    async def keys(request: Request) -> JSONResponse:
        body = {"keys": [{**jwk(AGENT_KEY), "kid": AGENT_KID, "use": "sig", "alg": "EdDSA"}]}
        return JSONResponse(body, media_type="application/http-message-signatures-directory+json")

    return Starlette(routes=[Route("/.well-known/http-message-signatures-directory", keys)])


def signed(
    request: httpx.Request,
    agent: str,
    *,
    key: Ed25519PrivateKey = AGENT_KEY,
    kid: str = AGENT_KID,
    created: datetime.datetime | None = None,
    expires: datetime.datetime | None = None,
) -> httpx.Request:
    """`request` signed as a Web Bot Auth agent does: `@authority` and its Signature-Agent
    dictionary member covered, tag `web-bot-auth`, created and expires."""
    request.headers["Signature-Agent"] = f'sig1="{agent}"'
    now = datetime.datetime.now(datetime.UTC)
    signer = HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={kid: key}),
    )
    signer.sign(
        request,
        key_id=kid,
        label="sig1",
        tag="web-bot-auth",
        created=created or now,
        expires=expires or now + datetime.timedelta(minutes=1),
        covered_component_ids=("@authority", '"signature-agent";key="sig1"'),
    )
    return request


# -- the guarded app --------------------------------------------------------------------------


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


class Guarded:
    def __init__(
        self, server: RunningServer, store: MemoryStore, verifier: CrawlerVerifier
    ) -> None:
        self.server = server
        self.store = store
        self.verifier = verifier
        self.client = httpx.Client(base_url=server.url, timeout=5)

    def get(self, ip: str, agent: str, **headers: str) -> httpx.Response:
        return self.client.get(
            "/page", headers={"user-agent": agent, "x-forwarded-for": ip, **headers}
        )

    def send(self, request: httpx.Request, ip: str) -> httpx.Response:
        request.headers["x-forwarded-for"] = ip
        return self.client.send(request)

    def events(self, ip: str) -> list[BotEvent]:
        events = asyncio.run(self.store.bot_events(since=0, limit=1000))
        return [e for e in events if e.ip == ip]

    def until(self, ip: str, agent: str, status: int, **headers: str) -> httpx.Response:
        """Requests until one gets `status` (the background check has landed), at most 3 s."""
        deadline = time.monotonic() + 3
        while True:
            response = self.get(ip, agent, **headers)
            if response.status_code == status or time.monotonic() > deadline:
                return response
            time.sleep(0.02)


@pytest.fixture(scope="module")
def dns() -> Iterator[LoopbackDns]:
    with loopback_dns() as server:
        yield server


@pytest.fixture(scope="module")
def directory() -> Iterator[RunningServer]:
    with serve(directory_app()) as server:
        yield server


@pytest.fixture(scope="module")
def guarded(dns: LoopbackDns, directory: RunningServer) -> Iterator[Guarded]:
    store = MemoryStore()
    verifier = CrawlerVerifier(
        nameservers=[dns.address], dns_timeout=DNS_TIMEOUT, allow_insecure_directories=True
    )
    settings = GuardSettings(
        store=store,
        rules=(),
        key_routes=(),
        trusted_proxies=["127.0.0.1"],
        bot_verifier=verifier,
        bot_allow_verified=["googlebot", "127.0.0.1"],
        writer_interval=0.05,
    )
    app = GuardMiddleware(Starlette(routes=[Route("/page", ok)]), settings=settings)
    with serve(app, proxy_headers=False) as server:
        g = Guarded(server, store, verifier)
        yield g
        g.client.close()


# -- published ranges -----------------------------------------------------------------------


def test_a_crawler_inside_its_published_ranges_is_verified_ipv4_and_ipv6(guarded: Guarded) -> None:
    # Googlebot is allowed when verified: let through, nothing recorded.
    assert guarded.get("66.249.66.1", GOOGLEBOT).status_code == 200
    assert guarded.get("2001:4860:4801:10::5", GOOGLEBOT).status_code == 200
    assert guarded.events("66.249.66.1") == [] and guarded.events("2001:4860:4801:10::5") == []
    # Bingbot is verified but not allowed by name: its category's policy (record) applies,
    # and the event says what was verified and how.
    assert guarded.get("157.55.39.7", BINGBOT).status_code == 200
    (event,) = guarded.events("157.55.39.7")
    assert event.action == "allowed"
    meta = dict(event.metadata or {})
    assert meta["verification"] == "verified" and meta["verifiedName"] == "bingbot"
    assert meta["method"] == "ranges"
    assert str(meta["evidence"]).startswith("ip 157.55.39.7 in bingbot 157.55.39.0/24 (ranges ")


def test_a_crawler_outside_its_ranges_is_spoofed_and_blocked(guarded: Guarded) -> None:
    # Claude publishes ranges and no reverse DNS: outside them is spoofed at once.
    response = guarded.get("8.8.4.4", CLAUDEBOT)
    assert response.status_code == 403
    assert guarded.get("2606:4700::1111", CLAUDEBOT).status_code == 403
    (event,) = guarded.events("8.8.4.4")
    meta = dict(event.metadata or {})
    assert event.action == "blocked"
    assert meta["verification"] == "spoofed" and meta["verifiedName"] == "claudebot"
    assert str(meta["evidence"]).startswith("ip 8.8.4.4 not in claudebot ranges (")
    # GPTBot from its own range is verified, and still blocked: ai_crawler's policy.
    inside = guarded.get("74.7.227.10", GPTBOT)
    assert inside.status_code == 403
    (event,) = guarded.events("74.7.227.10")
    assert dict(event.metadata or {})["verification"] == "verified"
    # A private address is no crawler's.
    assert guarded.get("10.1.2.3", GOOGLEBOT).status_code == 403
    (event,) = guarded.events("10.1.2.3")
    assert dict(event.metadata or {})["evidence"] == "ip 10.1.2.3 is not a public address"


def test_the_ranges_match_exactly_what_is_published() -> None:
    ranges = default_ranges()
    google = ranges.claimed(GOOGLEBOT)
    assert google is not None and google.name == "googlebot"
    assert ranges.claimed("Mozilla/5.0 (compatible; notgooglebot/1.0)") is None
    assert ranges.claimed(BROWSER) is None
    for crawler in ranges.crawlers:
        for prefix in crawler.prefixes:
            import ipaddress

            net = ipaddress.ip_network(prefix)
            assert ranges.network_of(crawler, str(net.network_address)) is not None
            assert ranges.network_of(crawler, str(net.broadcast_address)) is not None
            before = net.network_address - 1
            found = ranges.network_of(crawler, str(before))
            assert found is None or ipaddress.ip_address(before) in ipaddress.ip_network(found)
    # Every crawler with a range file says where its copy came from and when.
    for crawler in ranges.crawlers:
        if crawler.url:
            assert crawler.retrieved["repository"].startswith("https://github.com/")
            assert len(crawler.retrieved["commit"]) == 40 and crawler.retrieved["date"][:2] == "20"


# -- forward-confirmed reverse DNS ------------------------------------------------------------


def test_fcrdns_verifies_a_googlebot_outside_the_ranges_then_serves_it_from_the_cache(
    guarded: Guarded, dns: LoopbackDns
) -> None:
    ip = "66.249.99.1"
    dns.add(ptr(ip), "PTR", "crawl-66-249-99-1.googlebot.com.")
    dns.add("crawl-66-249-99-1.googlebot.com", "A", ip)
    # The first request is decided on the ranges (spoofed) while the lookup runs behind it.
    first = guarded.get(ip, GOOGLEBOT)
    assert first.status_code == 403
    assert guarded.until(ip, GOOGLEBOT, 200).status_code == 200
    for _ in range(5):
        assert guarded.get(ip, GOOGLEBOT).status_code == 200
    assert dns.asked(ptr(ip)) == 1 and dns.asked("crawl-66-249-99-1.googlebot.com") == 1
    # Only the requests decided before the answer landed were recorded, each saying why.
    events = guarded.events(ip)
    assert events
    for event in events:
        meta = dict(event.metadata or {})
        assert meta["verification"] == "spoofed"
        assert str(meta["evidence"]).endswith("fcrdns pending")


def test_fcrdns_mismatch_is_spoofed(guarded: Guarded, dns: LoopbackDns) -> None:
    elsewhere, unconfirmed = "66.249.99.2", "66.249.99.3"
    dns.add(ptr(elsewhere), "PTR", "crawl.evil.example.")
    dns.add("crawl.evil.example", "A", elsewhere)
    dns.add(ptr(unconfirmed), "PTR", "crawl-x.googlebot.com.")
    dns.add("crawl-x.googlebot.com", "A", "66.249.66.1")  # not back to the address
    for ip in (elsewhere, unconfirmed):
        guarded.get(ip, GOOGLEBOT)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (
        len(guarded.events(elsewhere)) < 2 or len(guarded.events(unconfirmed)) < 2
    ):
        for ip in (elsewhere, unconfirmed):
            assert guarded.get(ip, GOOGLEBOT).status_code == 403
            time.sleep(0.02)
    last = {ip: dict(guarded.events(ip)[0].metadata or {}) for ip in (elsewhere, unconfirmed)}
    for ip in (elsewhere, unconfirmed):
        deadline = time.monotonic() + 3
        while last[ip]["method"] != "fcrdns" and time.monotonic() < deadline:
            assert guarded.get(ip, GOOGLEBOT).status_code == 403
            last[ip] = dict(guarded.events(ip)[0].metadata or {})
            time.sleep(0.02)
    assert last[elsewhere]["evidence"] == (
        f"fcrdns {elsewhere}: crawl.evil.example is not under "
        "googlebot.com, google.com, googleusercontent.com"
    )
    assert last[unconfirmed]["evidence"] == (
        f"fcrdns {unconfirmed}: crawl-x.googlebot.com does not resolve back to {unconfirmed}"
    )


async def test_fcrdns_timeout_costs_no_request_its_wait(dns: LoopbackDns) -> None:
    ip = "66.249.99.4"
    dns.silent.add(ptr(ip) + ".")
    verifier = CrawlerVerifier(
        nameservers=[dns.address], dns_timeout=DNS_TIMEOUT, pending="claimed"
    )
    started = time.perf_counter()
    verdict = verifier.crawler(GOOGLEBOT, ip)
    again = verifier.crawler(GOOGLEBOT, ip)
    assert time.perf_counter() - started < 0.05
    assert verdict is not None and verdict.status == "pending" and again == verdict
    assert verifier.lookups == 1  # one lookup in flight per address
    await verifier.wait()
    after = verifier.crawler(GOOGLEBOT, ip)
    assert after is not None and after.status == "spoofed"
    assert after.evidence == f"fcrdns {ip}: no answer within {DNS_TIMEOUT:g} s"
    assert verifier.lookups == 1  # the timeout is cached too
    # An IPv6 Googlebot outside the ranges: PTR under ip6.arpa, then AAAA.
    v6 = "2001:4860:4801:99::1"
    import ipaddress

    name = ipaddress.ip_address(v6).reverse_pointer
    dns.add(name, "PTR", "crawl-v6.googlebot.com.")
    dns.add("crawl-v6.googlebot.com", "AAAA", v6)
    assert verifier.crawler(GOOGLEBOT, v6) is not None
    await verifier.wait()
    confirmed = verifier.crawler(GOOGLEBOT, v6)
    assert confirmed is not None and confirmed.status == "verified"
    assert confirmed.evidence == f"fcrdns {v6} crawl-v6.googlebot.com"


# -- Web Bot Auth -----------------------------------------------------------------------------


def test_a_valid_signature_verifies_the_agent_whatever_its_user_agent(
    guarded: Guarded, directory: RunningServer
) -> None:
    agent = directory.url
    ip = "198.18.0.10"  # benchmarking space: not public, which a signature does not care about
    first = guarded.send(
        signed(
            guarded.client.build_request("GET", "/page", headers={"user-agent": BROWSER}), agent
        ),
        ip,
    )
    assert first.status_code == 200  # the directory is fetched behind this request
    deadline = time.monotonic() + 3
    while (
        guarded.verifier._directories.get(
            agent + "/.well-known/http-message-signatures-directory", time.monotonic()
        )
        is None
    ):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # GPTBot's user-agent, signed by an agent allowed by name: let through.
    request = guarded.client.build_request("GET", "/page", headers={"user-agent": GPTBOT})
    assert guarded.send(signed(request, agent), ip).status_code == 200
    assert guarded.events(ip) == []


def test_bad_expired_unknown_and_malformed_signatures_are_spoofed(
    guarded: Guarded, directory: RunningServer
) -> None:
    agent = directory.url
    # The directory is cached by the test before (module order), or now.
    url = agent + "/.well-known/http-message-signatures-directory"
    deadline = time.monotonic() + 3
    while guarded.verifier._directories.get(url, time.monotonic()) is None:
        guarded.send(
            signed(
                guarded.client.build_request("GET", "/page", headers={"user-agent": BROWSER}), agent
            ),
            "198.18.0.11",
        )
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cases: dict[str, tuple[httpx.Request, str]] = {}
    build = guarded.client.build_request
    # Signed with a key other than the one its keyid names.
    cases["198.18.1.1"] = (
        signed(build("GET", "/page", headers={"user-agent": BROWSER}), agent, key=OTHER_KEY),
        "keyid",
    )
    now = datetime.datetime.now(datetime.UTC)
    cases["198.18.1.2"] = (
        signed(
            build("GET", "/page", headers={"user-agent": BROWSER}),
            agent,
            created=now - datetime.timedelta(minutes=3),
            expires=now - datetime.timedelta(minutes=2),
        ),
        "expires",
    )
    cases["198.18.1.3"] = (
        signed(
            build("GET", "/page", headers={"user-agent": BROWSER}),
            agent,
            key=OTHER_KEY,
            kid=OTHER_KID,
        ),
        "is not in",
    )
    tampered = signed(build("GET", "/page", headers={"user-agent": BROWSER}), agent)
    tampered.headers["host"] = "elsewhere.example"  # @authority no longer what was signed
    cases["198.18.1.4"] = (tampered, "keyid")
    for ip, (request, why) in cases.items():
        response = guarded.send(request, ip)
        assert response.status_code == 403, (ip, response.text)
        (event,) = guarded.events(ip)
        meta = dict(event.metadata or {})
        assert meta["verification"] == "spoofed" and meta["method"] == "web-bot-auth", meta
        assert why in str(meta["evidence"]), meta
    # A malformed header is a clear decision (spoofed), never a 500.
    bad = guarded.get(
        "198.18.1.5",
        BROWSER,
        **{"signature-input": 'sig1=((;tag="web-bot-auth"', "signature": "sig1=:AA==:"},
    )
    assert bad.status_code == 403
    (event,) = guarded.events("198.18.1.5")
    assert str(dict(event.metadata or {})["evidence"]).startswith("malformed: ")
    # A signature for another purpose is not ours to judge.
    other = guarded.get(
        "198.18.1.6",
        BROWSER,
        **{"signature-input": 'sig1=("@method");tag="other"', "signature": "sig1=:AA==:"},
    )
    assert other.status_code == 200


def test_signature_claims_and_directories_sans_io() -> None:
    agent_header = [(b"signature-agent", b'"https://agent.example"')]
    good = [
        *agent_header,
        (
            b"signature-input",
            b'sig2=("@authority" "signature-agent");created=1;expires=2;keyid="k";'
            b'tag="web-bot-auth"',
        ),
    ]
    claim = signature_claim(good)
    assert claim is not None and claim.keyid == "k" and claim.label == "sig2"
    assert claim.directory == "https://agent.example/.well-known/http-message-signatures-directory"
    assert signature_claim([(b"signature-input", b'sig1=("@method");tag="x"')]) is None
    # Without signature-agent covered, without created, without keyid, too long.
    for broken in (
        b'sig1=("@authority");created=1;expires=2;keyid="k";tag="web-bot-auth"',
        b'sig1=("@authority" "signature-agent");keyid="k";tag="web-bot-auth"',
        b'sig1=("@authority" "signature-agent");created=1;expires=2;tag="web-bot-auth"',
        b"web-bot-auth" * 400,
    ):
        with pytest.raises(MalformedSignature):
            signature_claim([*agent_header, (b"signature-input", broken)])
    with pytest.raises(MalformedSignature):
        signature_claim([(b"signature-agent", b'"file:///etc/passwd"'), good[1]])
    keys = parse_directory(
        json.dumps({"keys": [jwk(AGENT_KEY), {"kty": "RSA", "n": "x"}]}).encode()
    )
    assert list(keys) == [AGENT_KID]
    # RFC 8037's example key and its RFC 7638 thumbprint.
    example = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(example) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_directories_are_https_and_public_unless_told(directory: RunningServer) -> None:
    verifier = CrawlerVerifier(reverse_dns=False)
    request = signed(httpx.Request("GET", "http://site.example/page"), directory.url)
    verdict = verifier.signature(
        "GET", "http://site.example/page", [(k.lower(), v) for k, v in request.headers.raw]
    )
    assert verdict is not None and verdict.status == "pending"
    assert verdict.evidence.endswith("is not https") and verifier.lookups == 0


@pytest.mark.parametrize("ip", ["10.0.0.7", "127.0.0.1", "::1", "192.0.2.1", "100.64.0.1"])
def test_a_crawler_from_a_private_address_warns_once_of_an_untrusted_proxy(
    ip: str, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = CrawlerVerifier(reverse_dns=False, web_bot_auth=False)
    ua = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
    with caplog.at_level("WARNING", logger="convex_guard"):
        verdicts = [verifier.crawler(ua, ip) for _ in range(3)]
        assert verifier.crawler(ua, "66.249.66.1") is not None
    assert {v.status for v in verdicts if v is not None} == {"spoofed"}
    warned = [r.getMessage() for r in caplog.records if "trusted_proxies" in r.getMessage()]
    assert len(warned) == 1 and ip in warned[0]


def test_a_crawler_from_a_public_address_warns_of_nothing(caplog: pytest.LogCaptureFixture) -> None:
    verifier = CrawlerVerifier(reverse_dns=False, web_bot_auth=False)
    with caplog.at_level("WARNING", logger="convex_guard"):
        verifier.crawler("Googlebot/2.1", "8.8.8.8")
    assert not [r for r in caplog.records if "trusted_proxies" in r.getMessage()]


def test_ranges_from_a_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        "date": "2026-01-01",
        "crawlers": [
            {
                "name": "examplebot",
                "agents": ["ExampleBot"],
                "url": "https://example.com/r.json",
                "prefixes": ["192.0.2.0/24", "2001:db8::/32"],
            }
        ],
    }
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(data))
    monkeypatch.setenv("CONVEX_GUARD_CRAWLER_RANGES", str(path))
    ranges = CrawlerRanges.load()
    bot = ranges.claimed("ExampleBot/1.0")
    assert bot is not None and ranges.source == str(path)
    assert ranges.network_of(bot, "192.0.2.9") == "192.0.2.0/24"
    assert ranges.network_of(bot, "::ffff:192.0.2.9") == "192.0.2.0/24"
    assert ranges.network_of(bot, "2001:db8::1") == "2001:db8::/32"
    assert ranges.network_of(bot, "198.51.100.1") is None


# -- the CLI ----------------------------------------------------------------------------------


def range_files_app(missing: str) -> Starlette:
    """The operators' range files at their own paths, with made-up prefixes; `missing` 404s."""

    async def file(request: Request) -> JSONResponse:
        path = request.url.path
        if path == missing:
            return JSONResponse({"error": "gone"}, status_code=404)
        octet = sum(path.encode()) % 250
        body = {
            "creationTime": "2026-11-30T10:00:00.000000",
            "prefixes": [{"ipv4Prefix": f"203.0.{octet}.0/24"}, {"ipv6Prefix": "2001:db8:7::/48"}],
        }
        return JSONResponse(body)

    return Starlette(routes=[Route("/{path:path}", file)])


def test_update_ranges_refreshes_the_data_from_the_operators_urls(tmp_path: Any) -> None:
    import io

    from convex_guard.cli import main

    output = tmp_path / "ranges.json"
    with serve(range_files_app(missing="/applebot.json")) as server:
        out, err = io.StringIO(), io.StringIO()
        code = main(
            ["bots", "update-ranges", "--output", str(output), "--base-url", server.url],
            stdout=out,
            stderr=err,
        )
    assert code == 1, err.getvalue()  # one file could not be fetched: said, and kept
    lines = {line.split()[0]: line for line in out.getvalue().splitlines()[1:]}
    assert lines["googlebot"].split()[1:] == ["2", "2026-11-30T10:00:00.000000", "updated"]
    assert "404" in lines["applebot"] and lines["yandexbot"].endswith("reverse DNS only")
    ranges = CrawlerRanges.load(output)
    google = ranges.by_name("googlebot")
    apple = ranges.by_name("applebot")
    assert google is not None and apple is not None
    assert google.prefixes[1] == "2001:db8:7::/48"
    assert google.retrieved["url"] == server.url + "/static/search/apis/ipranges/googlebot.json"
    assert apple.prefixes == default_ranges().by_name("applebot").prefixes  # type: ignore[union-attr]
    # Without a place to write, a clear usage error.
    err = io.StringIO()
    assert main(["bots", "update-ranges"], stdout=io.StringIO(), stderr=err) == 2
    assert "--output" in err.getvalue()


def test_bots_recent_shows_what_was_verified_and_why(guarded: Guarded) -> None:
    import io

    from convex_guard.cli import main

    guarded.get("8.8.4.4", CLAUDEBOT)
    out = io.StringIO()
    assert main(["bots", "recent"], store=guarded.store, stdout=out, stderr=io.StringIO()) == 0
    text = out.getvalue()
    assert "VERIFIED" in text.splitlines()[0] and "EVIDENCE" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if "8.8.4.4" in line)
    assert "spoofed claudebot" in row and "ip 8.8.4.4 not in claudebot ranges" in row
