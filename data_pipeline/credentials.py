"""Credentials never reach a file or a log: :func:`redact` hides them in configs, manifests and messages."""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "auth", "session", "signature", "cookie")
#: Whole subtrees whose every value is a credential or may carry one (e.g. ``Authorization``).
SECRET_TREES = ("headers",)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SCHEME_SECRET = re.compile(r"^\s*(bearer|basic|token|digest|aws4-hmac-sha256)\s+\S", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"([?&](?:[^=&]*(?:sig|signature|token|key|secret|credential)[^=&]*)=)[^&#\s]+", re.IGNORECASE)


def redact(value: Any, key: str = "") -> Any:
    """A copy of nested options with every credential replaced by ``***``, for files and logs.

    By key (``key``, ``secret``, ``token``, ``Authorization``…; every value under ``headers``)
    and by value (``scheme://user:pass@host`` URLs, ``Bearer …`` strings, signed-URL query
    parameters), so that a credential under an unexpected key name is still hidden.
    """
    lowered = key.lower()
    if isinstance(value, dict):
        if lowered in SECRET_TREES:
            return {k: _hide(v) for k, v in value.items()}
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if any(w in lowered for w in SECRET_WORDS) and value not in (None, "", False):
        return "***"
    if isinstance(value, str):
        if _SCHEME_SECRET.match(value):
            return "***"
        return _QUERY_SECRET.sub(r"\1***", _URL_USERINFO.sub(r"\g<scheme>***@", value))
    return value


def _hide(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    return "***" if value not in (None, "", False) else value


def without_secrets(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every value :func:`redact` would touch left out (not masked): for a file another
    process reads options from, which then finds its credentials in its own environment."""
    def keep(value: Any, shown: Any) -> Any:
        if isinstance(value, dict):
            return {k: keep(v, shown[k]) for k, v in value.items() if isinstance(v, dict) or shown[k] == v}
        return value

    return keep(options, redact(options))
