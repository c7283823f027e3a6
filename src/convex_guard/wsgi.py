"""`convex_guard.wsgi`: the guard for WSGI apps (Flask, …); see `integrations.wsgi`."""

from convex_guard.integrations.wsgi import GuardWSGIMiddleware, guard_scope

__all__ = ["GuardWSGIMiddleware", "guard_scope"]
