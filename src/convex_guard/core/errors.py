"""One exception hierarchy: every error the toolkit raises derives from `GuardError`."""

from __future__ import annotations


class GuardError(Exception):
    """Base of every convex-guard error; catch this to catch them all."""


class ConfigurationError(GuardError, ValueError):
    """A setting or limit can never work; fix the configuration and restart."""


class StoreError(GuardError):
    """The store could not answer; the middleware applies its fail-open/fail-closed policy."""


class StoreTimeoutError(StoreError, TimeoutError):
    """The store did not answer within the configured timeout."""


class StoreUnavailableError(StoreError):
    """The store could not be reached (connection refused, DNS, TLS); check its URL and health."""


class StoreConflictError(StoreUnavailableError):
    """Convex gave up on a mutation: what it read kept changing under it, through every retry.

    The backend answers HTTP 503 `OptimisticConcurrencyControlFailure` once its own retries are
    spent; nothing was written. One such error is safe to retry later; many mean a document
    that every instance writes (a hot document): spread that state over more documents (shards,
    per-instance rows) rather than retrying harder.
    """


class StoreOverloadedError(StoreUnavailableError):
    """Convex had no free slot for the call within its queue timeout; nothing ran.

    The backend answers HTTP 429 `TooManyConcurrentRequests` when all its concurrent function
    slots stayed busy. Back off instead of retrying at once (retries add to the queue); if it
    persists, make fewer or cheaper calls, or give the deployment more concurrency.
    """


class ConvexAuthError(StoreError):
    """The Convex deployment refused the admin key; check CONVEX_SELF_HOSTED_ADMIN_KEY."""


class ConvexFunctionNotFoundError(StoreError):
    """The deployment lacks a function convex-guard calls; deploy `convex/` (make convex-deploy)."""


class ConvexValidationError(StoreError):
    """A function rejected its arguments: the deployed `convex/` and this package disagree."""


class StoreAnswerError(StoreError):
    """The store answered, but not in the shape asked for (a store bug, or a deployed `convex/`
    out of step with this package); the answer is not trusted and the fail policy applies."""
