"""docker-compose.yml parses, pins every image, and carries the seed's settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def load() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_every_image_is_pinned() -> None:
    services = load()["services"]
    assert isinstance(services, dict)
    assert {"backend", "dashboard"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: 'latest' is not a pin"
        if repository.startswith("ghcr.io/get-convex/"):
            # Upstream publishes self-hosted images under commit-hash tags.
            assert re.fullmatch(r"[0-9a-f]{40}", tag), f"{name}: {tag!r} is not a commit hash"
        else:
            assert re.search(r"\d+\.\d+", tag), f"{name}: {tag!r} is not a version"


def test_backend_follows_upstream_and_the_seed() -> None:
    backend = load()["services"]["backend"]
    assert backend["stop_signal"] == "SIGINT"
    assert "data:/convex/data" in backend["volumes"]
    assert "3210/version" in backend["healthcheck"]["test"]
    env = "\n".join(backend["environment"])
    for variable in ("CONVEX_CLOUD_ORIGIN", "CONVEX_SITE_ORIGIN", "CONVEX_DEPLOYMENT_NAME"):
        assert f"${{{variable}" in env
    # The seed's DATABASE_URL reaches the backend under the name it reads.
    assert "POSTGRES_URL=${POSTGRES_URL:-${DATABASE_URL:-}}" in env


def test_dashboard_points_at_the_backend() -> None:
    dashboard = load()["services"]["dashboard"]
    assert any(e.startswith("NEXT_PUBLIC_DEPLOYMENT_URL=") for e in dashboard["environment"])
    assert dashboard["depends_on"]["backend"]["condition"] == "service_healthy"


#: The first commit of upstream's `release` branch whose images accept what convex 1.48 and the
#: rate limiter 0.4 push (the `commitTs` validator, /api/deploy2/evaluate_push and the
#: 1.0/getTransactionMetrics syscall). Moving the pin means checking those again.
VERIFIED_RELEASE = "652b828b5129e6cdbcaa3c20efa8d116d09ff3bf"


def test_backend_and_dashboard_share_the_verified_release_pin() -> None:
    services = load()["services"]
    assert isinstance(services, dict)
    tags = {name: services[name]["image"].rpartition(":")[2] for name in ("backend", "dashboard")}
    assert tags == {"backend": VERIFIED_RELEASE, "dashboard": VERIFIED_RELEASE}


def test_backend_waits_for_postgres_only_when_it_runs() -> None:
    services = load()["services"]
    assert isinstance(services, dict)
    wait = services["backend"]["depends_on"]["postgres"]
    assert wait == {"condition": "service_healthy", "required": False}
    assert services["postgres"]["profiles"] == ["postgres"]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
