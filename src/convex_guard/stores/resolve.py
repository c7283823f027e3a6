"""Which store the guard uses when it is named by a word, and whether the guard owns it."""

from __future__ import annotations

from typing import Literal, cast

from convex_guard.core.logs import logger
from convex_guard.core.settings import GuardEnvironment
from convex_guard.stores.base import LogStore, Store
from convex_guard.stores.memory import MemoryStore
from convex_guard.stores.resilient import ResilientStore

#: `"env"`: Convex when CONVEX_SELF_HOSTED_URL/CONVEX_URL is set, else memory.
StoreChoice = Literal["env", "memory", "convex"]


def resolve_store(
    choice: LogStore | StoreChoice,
    env: GuardEnvironment,
    *,
    timeout: float = 0.5,
    fallback: bool = True,
) -> tuple[Store, bool]:
    """The store to use, and whether the guard created it (and so closes it at shutdown).

    A Convex deployment named by the environment comes wrapped in a `ResilientStore`: calls
    are bounded by `timeout`, a circuit breaker stops paying it while the deployment is down,
    and (with `fallback`) limits are decided in this process meanwhile. A store given as an
    object is used as it is: `GuardSettings` has checked that it has every capability the
    configured middlewares call, and they call nothing else.
    """
    if not isinstance(choice, str):
        return cast(Store, choice), False
    if choice == "convex" or (choice == "env" and env.deployment_url):
        from convex_guard.stores.convex import ConvexStore

        convex = ConvexStore.from_env(env)
        return ResilientStore(convex, timeout=timeout, use_fallback=fallback), True
    if choice == "env":
        logger.warning(
            "convex-guard: no CONVEX_SELF_HOSTED_URL/CONVEX_URL set; using the in-memory store "
            "(limits, keys and logs are per process)"
        )
    return MemoryStore(), True
