"""Anomaly alerts: rules the stores evaluate (`rules`), and their delivery (`deliver`).

`rules` is sans-IO and imports only the core, so the stores can evaluate it; `deliver`
imports the stores. Only the rules are imported eagerly, so a store importing them never
imports the deliverer (and httpx) back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convex_guard.alerts.rules import DEFAULT_RULES, AlertKind, AlertRule, Finding

if TYPE_CHECKING:
    from convex_guard.alerts.deliver import AlertDeliverer, AlertSettings

__all__ = [
    "DEFAULT_RULES",
    "AlertDeliverer",
    "AlertKind",
    "AlertRule",
    "AlertSettings",
    "Finding",
]


def __getattr__(name: str) -> Any:
    if name in ("AlertDeliverer", "AlertSettings"):
        from convex_guard.alerts import deliver

        return getattr(deliver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
