"""`convex_guard.django`: the guard as Django middleware; see `integrations.django`."""

from convex_guard.integrations.django import (
    DjangoGuardMiddleware,
    close_all,
    guard_scope,
    guard_settings,
)

__all__ = ["DjangoGuardMiddleware", "close_all", "guard_scope", "guard_settings"]
