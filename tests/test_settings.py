"""Environment settings and the seed preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convex_guard import (
    HOUR,
    ConfigurationError,
    FixedWindow,
    GuardEnvironment,
    load_environment,
    preset_rules,
    seed_limits,
)


def test_preset_follows_rate_limit_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATE_LIMIT_GLOBAL_REQUESTS", "250")
    monkeypatch.setenv("RATE_LIMIT_WINDOW_HOURS", "2")
    monkeypatch.setenv("RATE_LIMIT_SHARDS", "4")
    limits = seed_limits()
    assert limits["globalAIRequests"] == FixedWindow(rate=250, period=2 * HOUR, shards=4)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RATE_LIMIT_GLOBAL_REQUESTS", "lots"),
        ("RATE_LIMIT_GLOBAL_REQUESTS", "0"),
        ("RATE_LIMIT_WINDOW_HOURS", "-1"),
        ("RATE_LIMIT_WINDOW_HOURS", "inf"),
        ("RATE_LIMIT_SHARDS", "0"),
    ],
)
def test_bad_environment_fails_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=variable):
        load_environment()


def test_secrets_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEX_SELF_HOSTED_ADMIN_KEY", "admin-key-secret-123")
    monkeypatch.setenv("DATABASE_URL", "postgres://u:hunter2@db")
    env = GuardEnvironment()
    assert env.convex_self_hosted_admin_key is not None
    assert env.convex_self_hosted_admin_key.get_secret_value() == "admin-key-secret-123"
    assert "admin-key-secret-123" not in repr(env) and "hunter2" not in repr(env)
    assert "admin-key-secret-123" not in str(env.model_dump())


def test_deployment_url_prefers_self_hosted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEX_URL", "http://b")
    assert GuardEnvironment().deployment_url == "http://b"
    monkeypatch.setenv("CONVEX_SELF_HOSTED_URL", "http://a")
    assert GuardEnvironment().deployment_url == "http://a"


def test_preset_rules_cover_the_seed_routes() -> None:
    rules = {rule.name: rule for rule in preset_rules(GuardEnvironment())}
    assert rules["openaiRequests"].matches("/api/ai/openai/chat", "POST")
    assert not rules["openaiRequests"].matches("/api/ai/openrouter/chat", "POST")
    assert rules["ipAIRequests"].matches("/api/ai/groq/chat", "POST")
    assert not rules["ipAIRequests"].matches("/api/aix", "GET")
    assert rules["selfHostedEmbeddings"].matches("/api/embeddings", "POST")
    assert rules["ipAIRequests"].key == "ip" and rules["userAIRequests"].key == "user"


CONVEX_LIMITS = Path(__file__).resolve().parents[1] / "convex" / "limits.json"


@pytest.mark.skipif(not CONVEX_LIMITS.exists(), reason="convex/limits.json not written yet")
def test_python_preset_equals_the_convex_table() -> None:
    convex_table = json.loads(CONVEX_LIMITS.read_text())
    python_table = {
        name: config.to_convex() for name, config in seed_limits(GuardEnvironment()).items()
    }
    assert python_table == convex_table
