"""Anomaly alerts: the rules (`core.alerts`, evaluated by the stores) and their delivery.

The rules are sans-IO and live in the core, so the stores evaluate them where the rows are
written; the deliverer here reads what the stores raised and posts it, exactly once across
instances.
"""

from convex_guard.alerts.deliver import AlertDeliverer, AlertSettings
from convex_guard.core.alerts import DEFAULT_RULES, AlertKind, AlertRule, Finding, WatchedLimit

__all__ = [
    "DEFAULT_RULES",
    "AlertDeliverer",
    "AlertKind",
    "AlertRule",
    "AlertSettings",
    "Finding",
    "WatchedLimit",
]
