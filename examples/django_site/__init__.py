"""The example AI gateway as a Django project, guarded natively or the ASGI way."""
