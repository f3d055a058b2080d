"""Credentials in URLs (``http://user:token@host``) never reach a report, a run file or
the terminal: the password or token is shown as ``***``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_url", "scrub"]


def _userinfo(url: str) -> tuple[str, str] | None:
    """(the URL's ``user:password`` part, what is shown instead), or None without one."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # not a URL at all: nothing to hide in it
        return None
    userinfo, at, _host = netloc.rpartition("@")
    if not at:
        return None
    user, colon, _secret = userinfo.partition(":")
    return userinfo, f"{user}:***" if colon else "***"  # a lone user part is the token itself


def redact_url(url: str) -> str:
    """``http://user:token@host:8000`` -> ``http://user:***@host:8000``; other URLs unchanged."""
    found = _userinfo(url)
    if found is None:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{found[1]}@{parts.netloc.rpartition('@')[2]}"))


def scrub(value: Any, url: str | None) -> Any:
    """``value`` (text, or a mapping or list of them) with the credentials of ``url``
    replaced wherever they appear, e.g. in an error message quoting the server's URL."""
    found = _userinfo(url) if url else None
    if found is None:
        return value
    secret, shown = f"{found[0]}@", f"{found[1]}@"
    if isinstance(value, str):
        return value.replace(secret, shown)
    if isinstance(value, dict):
        return {k: scrub(v, url) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, url) for v in value)
    return value
