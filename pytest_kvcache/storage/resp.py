"""A minimal RESP2 client (SET, GET, DEL, FLUSHDB, PING) for the ``redis`` tier.

One socket per client; the tier keeps one client per thread. Only the replies these
commands give are parsed: simple strings, errors, integers and bulk strings. (The
emulator has its own client in emulator/prefix_cache.py; one of the two should serve
both once the emulator's refactoring settles.)
"""

from __future__ import annotations

import socket

from .._redis_url import parse_redis_url

__all__ = ["RespClient", "RespError"]


class RespError(RuntimeError):
    """An error reply from the server, or a reply this client does not understand."""


class RespClient:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        address = parse_redis_url(url)
        self._sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
        # a block's SET ends in a short segment that Nagle would hold back for the server's ACK
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._file = self._sock.makefile("rb", buffering=1 << 20)
        if address.password is not None:
            self.command(b"AUTH", address.password.encode())
        if address.db:
            self.command(b"SELECT", str(address.db).encode())

    def command(self, *parts: bytes) -> bytes | int | None:
        head = b"*%d\r\n" % len(parts)
        self._sock.sendall(head + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._reply()

    def _reply(self) -> bytes | int | None:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise RespError("connection closed by the redis server")
        kind, body = line[:1], line[1:-2]
        if kind == b"+":
            return body
        if kind == b"-":
            raise RespError(body.decode(errors="replace"))
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            if len(data) != size + 2:
                raise RespError("connection closed inside a bulk reply")
            return data[:-2]
        raise RespError(f"unexpected reply {line[:40]!r}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()
