"""Secrets come from the environment (or a Prefect Secret block, resolved in flows/) — never from config.

Config files only name the environment variable (e.g. `api_key_env: DANBOORU_API_KEY`), so configs,
digests and manifests never hold a secret. Every resolved secret is registered for redaction: the log
filter and `redact()` replace it with `***` wherever it would otherwise be printed.
"""
from __future__ import annotations

import logging
import os
import re

_SECRETS: set[str] = set()
# Query-string credentials (Danbooru's login/api_key) are masked even when not registered.
_QUERY_SECRET = re.compile(r"(api_key=)[^&\s'\"]+", re.IGNORECASE)


def register_secret(value: str | None) -> None:
    if value and len(value) >= 4:
        _SECRETS.add(value)


def resolve_secret(env_name: str | None) -> str | None:
    if not env_name:
        return None
    value = os.environ.get(env_name) or None
    register_secret(value)
    return value


def redact(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _QUERY_SECRET.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Attach the filter to the handlers of the root logger (filters on loggers do not see children)."""
    target = logger or logging.getLogger()
    flt = RedactingFilter()
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(flt)
    if not any(isinstance(f, RedactingFilter) for f in target.filters):
        target.addFilter(flt)
