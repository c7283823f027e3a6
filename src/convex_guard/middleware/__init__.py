"""Pure-ASGI middlewares, one per module."""
