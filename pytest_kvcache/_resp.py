"""A minimal synchronous Redis client (RESP2), no extra package: the emulator's ``redis``
tier and the storage benchmark's ``redis`` tier both use it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ._redis_url import parse_redis_url

__all__ = ["RespClient", "RespError"]


class RespError(RuntimeError):
    """An error reply of a Redis server, a reply this client does not understand, or a
    broken connection."""


_READ_BUFFER = 1 << 20


class RespClient:
    """One connection per thread, opened on its first command; :meth:`close` closes them all."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.address = parse_redis_url(url)
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[tuple[Any, Any]] = []

    def _conn(self) -> tuple[Any, Any]:
        c = getattr(self._local, "conn", None)
        if c is None:
            import socket

            sock = socket.create_connection((self.address.host, self.address.port), timeout=self.timeout)
            # a block's SET ends in a short segment that Nagle would hold back for the server's ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a buffer that holds a whole batch's reply takes it in a few reads, not hundreds
            c = (sock, sock.makefile("rb", buffering=_READ_BUFFER))
            self._local.conn = c
            with self._lock:
                self._open.append(c)
            if self.address.password:
                self.call("AUTH", self.address.password)
            if self.address.db:
                self.call("SELECT", str(self.address.db))
        return c

    @staticmethod
    def _shut(conn: tuple[Any, Any]) -> None:
        try:
            conn[1].close()
            conn[0].close()
        except OSError:
            pass

    def _drop(self) -> None:
        """Closes this thread's connection (after an error); the next command opens another."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            self._local.conn = None
            with self._lock:
                if c in self._open:
                    self._open.remove(c)
            self._shut(c)

    def close(self) -> None:
        """Closes every thread's connection."""
        with self._lock:
            conns, self._open = self._open, []
            self._local = threading.local()
        for c in conns:
            self._shut(c)

    @staticmethod
    def _encode(args: Sequence[bytes | str]) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else bytes(a)
            out.append(b"$%d\r\n" % len(b))
            out.append(b)
            out.append(b"\r\n")
        return b"".join(out)

    def _read(self, f: Any) -> Any:
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
                raise RespError("connection closed inside a bulk reply")
            return data[:-2]
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(f) for _ in range(n)]
        raise RespError(f"unexpected reply {line[:40]!r}")

    def call(self, *args: bytes | str) -> Any:
        """Sends one command and returns its reply: bytes, an int, None or a list of them."""
        try:
            sock, f = self._conn()
            sock.sendall(self._encode(args))
            return self._read(f)
        except RespError as exc:
            if "closed" in str(exc):
                self._drop()
            raise
        except OSError as exc:
            self._drop()
            raise RespError(str(exc)) from exc
