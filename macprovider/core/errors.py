"""One error tree for the whole package.

Every error a user can cause or meet is one of these; the CLI maps them to a one-line message and an
exit code, the HTTP layer maps `ApiError` to the OpenAI error envelope (docs/api.md#errors).

    MacproviderError                 exit 1
    ├── ConfigError                  exit 2   bad flag / env / YAML value, unreadable config
    ├── ModelError                   exit 1   bad model id, model not cached offline, load failure
    │   ├── InvalidModelId           exit 2   not org/name and not a local directory
    │   └── ModelNotCachedError      exit 1   not in the local cache and the Hub cannot be reached
    ├── ServiceError                 exit 1   launchctl / systemctl failures
    ├── StoreError                   exit 2   autotune database unusable
    ├── ApplyError                   exit 1   --apply could not write the config
    ├── ProviderConflict             exit 1   a provider is already running
    └── ApiError                     (HTTP)   carries status, OpenAI `type`, `code`, `param`
"""

from __future__ import annotations

from typing import Any


class MacproviderError(Exception):
    """Base of every error macprovider raises on purpose. `exit_code` is the CLI exit status."""

    exit_code: int = 1


class ConfigError(MacproviderError):
    """An invalid setting. The message names the setting, the value and where it came from."""

    exit_code = 2


class ModelError(MacproviderError):
    """A model id that is invalid, cannot be found, or cannot be loaded."""


class InvalidModelId(ModelError):
    """A model id that is neither `org/name` nor an existing local directory (a usage error)."""

    exit_code = 2


class ModelNotCachedError(ModelError):
    """The model is not in the local Hub cache and the Hub is unreachable (or offline mode is on)."""


class ServiceError(MacproviderError):
    """A service-manager command (launchctl, systemctl) failed."""


class StoreError(MacproviderError):
    """The autotune SQLite database cannot be opened or migrated."""

    exit_code = 2


class ApplyError(MacproviderError):
    """`autotune --apply` refused or failed to write the config; the old config is untouched."""


class ProviderConflict(MacproviderError):
    """Another provider is running where autotune needs the machine to itself."""


class ApiError(MacproviderError):
    """An error that reaches an HTTP client as the OpenAI envelope.

    `status` is the HTTP status, `code`/`type`/`param` the envelope fields (docs/api.md#errors); `extra` adds
    fields to the error object (e.g. `n_prompt_tokens`, `n_ctx`); `headers` are sent with the response.
    The message must never carry a traceback, a file path or a key.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type or _default_type(status)
        self.extra = extra or {}
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        """The body: `{"error": {"message", "type", "param", "code", ...extra}}`."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        error.update(self.extra)
        return {"error": error}


def _default_type(status: int) -> str:
    """OpenAI's `type` for a status, as its API returns them."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"
