"""Secrets out of what MLflow records: every config value is a param, and params are
shown to everyone who can open the experiment, forever.

Two rules, both deliberately broad (a redacted path costs nothing, a leaked token does):
a value whose key names a secret (``password``, ``token``, ``api_key``, ``credentials``,
...) is replaced whole, and a URI anywhere (``https://user:pass@host``) loses its userinfo.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "secret",
        "key",
        "apikey",
        "credential",
        "credentials",
        "authorization",
    }
)
# snake_case, kebab-case, dotted and camelCase keys split into lower-case words.
WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
URI_WITH_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@")


def is_secret_key(key: str) -> bool:
    """Whole words only, so ``tokenizer``, ``tokens`` and ``keep`` stay visible."""
    return any(word.lower() in SECRET_WORDS for word in WORD.findall(key))


def redact_uri(value: str) -> str:
    """``scheme://user:pass@host/x`` -> ``scheme://***@host/x``; anything else unchanged."""
    if not URI_WITH_USERINFO.match(value):
        return value
    parts = urlsplit(value)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) safe to log; ``key`` is the name
    ``value`` is stored under. An unset secret (None, "") stays visible as unset."""
    if key and is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value
