"""Configuration from the environment, under the seed's names (docs/architecture.md)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from convex_guard.core.errors import ConfigurationError

# The userinfo of a URL (`scheme://user:password@`), wherever one appears in a text. A
# password with an unescaped `/`, `?` or `@` still counts: better one host too many hidden than
# half a password shown.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"<>]*@")


class GuardEnvironment(BaseSettings):
    """The seed's environment variables; field names are the variable names, lower-cased.

    Secrets are `SecretStr`, so the admin key and a database URL with a password never show in
    a repr, a log line or an error.
    """

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    convex_self_hosted_url: str | None = None
    convex_url: str | None = None
    convex_self_hosted_admin_key: SecretStr | None = None
    convex_cloud_origin: str | None = None
    convex_site_origin: str | None = None
    convex_deployment_name: str | None = None
    database_url: SecretStr | None = None
    rate_limit_global_requests: Annotated[int, Field(gt=0)] = 10_000
    rate_limit_window_hours: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    rate_limit_shards: Annotated[int, Field(ge=1)] | None = None

    @property
    def deployment_url(self) -> str | None:
        """`CONVEX_SELF_HOSTED_URL`, else `CONVEX_URL`."""
        return self.convex_self_hosted_url or self.convex_url


def load_environment() -> GuardEnvironment:
    """Read the environment, or fail naming each bad variable (never echoing its value)."""
    try:
        return GuardEnvironment()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
            for error in exc.errors(include_input=False)
        )
        raise ConfigurationError(f"Bad environment: {problems}") from None


def redact_url(text: str) -> str:
    """`text` with the userinfo of every URL in it (`http://user:pw@host`) replaced by `***`.

    A deployment URL may carry credentials (a proxy's basic auth); anything printed or
    logged that holds a URL goes through this first.
    """
    return _USERINFO.sub(r"\1***@", text)
