"""A minimal synchronous Redis client (RESP2) for the redis tier: no extra package."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from .._redis_url import parse_redis_url

__all__ = ["RespClient", "RespError"]

class RespError(Exception):
    """An error reply of a Redis server, or a broken connection."""


_READ_BUFFER = 1 << 20


class RespClient:
    """A minimal synchronous Redis client (RESP2), one socket per thread."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.host, self.port, self.db, self.password = parse_redis_url(url)
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            import socket

            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a buffer that holds a whole batch's reply takes it in a few reads, not hundreds
            c = (sock, sock.makefile("rb", buffering=_READ_BUFFER))
            self._local.conn = c
            if self.password:
                self.call("AUTH", self.password)
            if self.db:
                self.call("SELECT", str(self.db))
        return c

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            self._local.conn = None
            try:
                c[1].close()
                c[0].close()
            except OSError:
                pass

    @staticmethod
    def _encode(args: Sequence[bytes | str]) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else bytes(a)
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
        return b"".join(out)

    def _read(self, f):
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise RespError("connection closed by the Redis server")
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest
        if t == b"-":
            raise RespError(rest.decode(errors="replace"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)
            if len(data) != n + 2:
                raise RespError("connection closed by the Redis server")
            return data[:-2]
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(f) for _ in range(n)]
        raise RespError(f"bad reply {line!r}")

    def call(self, *args: bytes | str):
        try:
            sock, f = self._conn()
            sock.sendall(self._encode(args))
            return self._read(f)
        except (OSError, RespError) as exc:
            if not isinstance(exc, RespError) or "closed" in str(exc):
                self.close()
            raise RespError(str(exc)) from exc
