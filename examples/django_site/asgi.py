"""ASGI entry point: `uvicorn examples.django_site.asgi:application`.

By default the ASGI way: `GuardMiddleware` around Django's ASGI application (the native
middleware is then left out of `MIDDLEWARE`). With `CONVEX_GUARD_DJANGO=native`, Django's own
ASGI application, guarded by the native middleware running async.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_site.settings")
os.environ.setdefault("CONVEX_GUARD_DJANGO", "asgi")

from django.conf import settings
from django.core.asgi import get_asgi_application

from convex_guard import GuardMiddleware, GuardSettings

django_application = get_asgi_application()
if settings.GUARD_MODE == "asgi":
    application: object = GuardMiddleware(
        django_application, settings=GuardSettings.from_mapping(settings.CONVEX_GUARD)
    )
else:
    application = django_application
