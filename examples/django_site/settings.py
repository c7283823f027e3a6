"""Settings of the example Django gateway.

`CONVEX_GUARD_DJANGO=native` (the default) lists the native middleware in `MIDDLEWARE`: it
guards under WSGI (`wsgi.py`, runserver) and under ASGI alike. With `CONVEX_GUARD_DJANGO=asgi`
the middleware is left out and `asgi.py` wraps the whole ASGI application in `GuardMiddleware`.
"""

from __future__ import annotations

import os
import secrets

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(32)
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "examples.django_site.urls"
INSTALLED_APPS: list[str] = []
USE_TZ = True

GUARD_MODE = os.environ.get("CONVEX_GUARD_DJANGO", "native")
MIDDLEWARE = [
    *(["convex_guard.django.DjangoGuardMiddleware"] if GUARD_MODE == "native" else []),
    "django.middleware.common.CommonMiddleware",
]

# GuardSettings fields; the store comes from the environment (Convex if configured, else
# memory). For instance: {"trusted_proxies": ["10.0.0.0/8"], "exempt_paths": ["/health"]}.
CONVEX_GUARD: dict[str, object] = {}
