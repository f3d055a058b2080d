"""Redis URLs: the one parser the backends, doctor and the emulator share."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlparse

__all__ = ["RedisAddress", "parse_redis_url"]


class RedisAddress(NamedTuple):
    host: str
    port: int = 6379
    db: int = 0
    password: str | None = None


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[:password@]host[:port][/db]`` (also ``rediss://``, ``valkey://``)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "valkey") or not parsed.hostname:
        raise ValueError(f"{url!r}: use redis://HOST:PORT[/DB]")
    try:
        return RedisAddress(parsed.hostname, parsed.port or 6379, int(parsed.path.strip("/") or 0), parsed.password)
    except ValueError:  # a port or database that is no number
        raise ValueError(f"{url!r}: use redis://HOST:PORT[/DB]") from None
