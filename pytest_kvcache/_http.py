"""A minimal HTTP/1.1 streaming client that stamps bytes with when they arrived.

The measured requests do not go through httpx: with httpx the time between the
bytes reaching the socket and the caller seeing them was about 1.5-2 ms per chunk on
these machines (a fixed 40 ms TTFT read as 41.5-42.3 ms even at concurrency 1).
On a plain-HTTP connection on Linux each read carries the kernel's receive time
(``_sockio``): the stamp is when the bytes reached this host, so neither the wake-up
of the client's idle core (0.3-1 ms here) nor an event-loop pass spent on other
streams is in it. Elsewhere (TLS, other systems) the stamp is ``perf_counter`` taken
first thing in the read callback. The HTTP framing is decoded right after (offset
arithmetic, no buffer shuffling) and the body bytes are kept with the stamp. The SSE
event split and JSON decoding wait until the response is complete and then run in
slices (``loadgen``): per-chunk work in the loop is what delays the *other* streams'
reads, and a read late enough to take two chunks at once gives both the later stamp.

A request's start stamp is taken inside :meth:`StreamConnection.send`, right before
its own write (a single write; TCP_NODELAY), so neither the other requests of a burst
nor a task switch sit between the stamp and the bytes leaving. Each connection
carries one request at a time with keep-alive and is opened before the round starts.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from urllib.parse import urlsplit

from ._sockio import StampedSocket, kernel_stamps_available
from .errors import KVCacheError

__all__ = ["HTTPStreamError", "StreamConnection", "StreamPool", "split_events"]


class HTTPStreamError(KVCacheError):
    """The connection broke or the response was not valid HTTP/1.1."""


class _ResponseParser:
    """Incremental HTTP/1.1 response parser: status and headers, then the body by
    Content-Length, chunked transfer coding, or until the connection closes.

    It works on offsets into the bytes it was given (no per-byte buffer shuffling), so
    a read holding one or a few whole chunks costs a couple of ``find`` calls and
    slices.
    """

    __slots__ = ("_buf", "_remaining", "_state", "complete", "headers", "keep_alive", "status")

    def __init__(self) -> None:
        self._buf = b""
        self._state = "head"
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._remaining = 0
        self.complete = False
        self.keep_alive = True

    def feed(self, data: bytes) -> list[bytes]:
        """Body bytes decoded from ``data``; raises HTTPStreamError on bad framing.

        The chunked states, a streamed response's every read, stay inline (a call per
        read costs ~10% of the parse, see docs/measuring.md on per-chunk work); the head,
        the trailer and a body until the close take :meth:`_edge_step`.
        """
        data = self._buf + data if self._buf else data
        self._buf = b""
        out: list[bytes] = []
        pos = 0
        n = len(data)
        state = self._state
        while not self.complete:
            if state == "chunk-size":
                end = data.find(b"\r\n", pos)
                if end < 0:
                    _check_partial_size_line(data, pos)
                    break
                line = data[pos:end]
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise HTTPStreamError(f"bad chunk size line {line[:40]!r}") from None
                if size < 0:
                    raise HTTPStreamError(f"bad chunk size line {line[:40]!r}")
                pos = end + 2
                self._remaining = size
                state = "chunk-data" if size else "trailer"
            elif state == "chunk-data" or state == "length":  # a counted run of body bytes
                take = min(self._remaining, n - pos)
                if take:
                    out.append(data[pos:pos + take])
                    pos += take
                    self._remaining -= take
                if self._remaining:
                    break
                if state == "length":
                    self.complete = True
                    break
                state = "chunk-end"
            elif state == "chunk-end":
                if n - pos < 2:
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise HTTPStreamError("chunk not followed by CRLF")
                pos += 2
                state = "chunk-size"
            else:
                state, pos, wait = self._edge_step(state, data, pos, out)
                if wait:
                    break
        self._state = state
        if pos < n:
            self._keep(data, pos)
        return out

    def _edge_step(self, state: str, data: bytes, pos: int, out: list[bytes]) -> tuple[str, int, bool]:
        """One step of the head, the trailer or a body read until the close: the next
        state, the next position and whether the parser waits for more bytes."""
        n = len(data)
        if state == "head":
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if n - pos > 65536:
                    raise HTTPStreamError("response head larger than 64 KiB")
                return state, pos, True
            return self._head(data[pos:end].decode("latin-1")), end + 4, False
        if state == "until-close":
            if pos < n:
                out.append(data[pos:] if pos else data)
            return state, n, True
        # the trailer: header lines after the last chunk, ended by an empty line
        end = data.find(b"\r\n", pos)
        if end < 0:
            return state, pos, True
        if end == pos:
            self.complete = True
        return state, end + 2, False

    def _keep(self, data: bytes, pos: int) -> None:
        """Bytes after ``pos`` wait for the next read; after a complete response they
        are an error."""
        if self.complete:
            raise HTTPStreamError(f"unexpected bytes after the response: {data[pos:pos + 40]!r}")
        self._buf = data[pos:]

    def _head(self, text: str) -> str:
        lines = text.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HTTPStreamError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
        try:
            self.status = int(parts[1])
        except ValueError:
            raise HTTPStreamError(f"bad status line {lines[0][:80]!r}") from None
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPStreamError(f"bad header line {line[:80]!r}")
            self.headers[name.strip().lower()] = value.strip()
        self.keep_alive = self.headers.get("connection", "").lower() != "close"
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return "chunk-size"
        if "content-length" in self.headers:
            try:
                self._remaining = int(self.headers["content-length"])
            except ValueError:
                raise HTTPStreamError(f"bad Content-Length {self.headers['content-length'][:40]!r}") from None
            if self._remaining < 0:
                raise HTTPStreamError("negative Content-Length")
            if self._remaining == 0:
                self.complete = True
            return "length"
        self.keep_alive = False
        return "until-close"

    def finish_at_eof(self) -> bool:
        """The connection closed: True when that ends the response properly."""
        if self._state == "until-close" and self.status is not None:
            self.complete = True
        return self.complete


def _check_partial_size_line(data: bytes, pos: int) -> None:
    """A chunk size line still without its CRLF may only be so long."""
    if len(data) - pos > 1024:
        raise HTTPStreamError(f"chunk size line too long: {data[pos:pos + 40]!r}")


def split_events(pieces, carry: bytes = b"") -> tuple[list[tuple[float, bytes]], bytes]:
    """``(stamp, body bytes)`` reads -> ``(stamp, SSE event)`` pairs, and the unfinished rest.

    An event gets the stamp of the read that completed it. Lines may end with LF or
    CRLF; events end with an empty line. ``carry`` is the rest of earlier reads (to
    split a response a slice of reads at a time).
    """
    events: list[tuple[float, bytes]] = []
    sse = carry
    for stamp, piece in pieces:
        sse = sse + piece if sse else piece
        if b"\r" in sse:
            sse = sse.replace(b"\r\n", b"\n")
        if b"\n\n" in sse:
            parts = sse.split(b"\n\n")
            sse = parts.pop()
            for ev in parts:
                if ev:
                    events.append((stamp, ev))
    return events, sse


class StreamConnection:
    """One keep-alive connection carrying one request at a time.

    Each read arrives with its stamp (:meth:`_on_data`): the kernel's receive time on a
    plain-HTTP Linux socket (:class:`~pytest_kvcache._sockio.StampedSocket`), else
    ``perf_counter`` taken first thing in the protocol callback (TLS, other systems).
    The HTTP framing is decoded and ``(stamp, body bytes)`` kept; nothing else happens
    per read: the SSE split and JSON decoding wait until the response is complete
    (:meth:`wait`), so the work done for one stream cannot delay the stamp of another,
    and the request's coroutine wakes once per response, not once per chunk.
    """

    def __init__(self) -> None:
        self.transport: StampedSocket | asyncio.Transport | None = None
        self.closed = False
        self._parser: _ResponseParser | None = None
        self.pieces: list[tuple[float, bytes]] = []
        self.first_byte: float | None = None
        self._error: str | None = None
        self._done: asyncio.Future | None = None

    @property
    def kernel_stamps(self) -> bool:
        return isinstance(self.transport, StampedSocket) and self.transport.kernel_stamps

    # -- what the socket delivers --------------------------------------------------------

    def _on_data(self, data: bytes, stamp: float) -> None:
        parser = self._parser
        if parser is None or parser.complete:
            self._fail("unexpected bytes from the server between requests")
            return
        try:
            pieces = parser.feed(data)
        except HTTPStreamError as exc:
            self._fail(str(exc))
            return
        if self.first_byte is None:
            self.first_byte = stamp
        for piece in pieces:
            self.pieces.append((stamp, piece))
        if parser.complete:
            done = self._done
            if done is not None and not done.done():
                done.set_result(None)

    def _on_close(self, exc) -> None:
        self.closed = True
        parser = self._parser
        if parser is not None and not parser.complete and not parser.finish_at_eof() and self._error is None:
            if parser.status is None:
                self._error = f"connection closed by the server before a response ({exc or 'EOF'})"
            else:
                self._error = f"connection closed by the server mid-response ({exc or 'EOF'})"
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    # -- the request side --------------------------------------------------------------

    def send(self, request: bytes) -> float:
        """Write ``request``; return the start stamp, taken right before the write."""
        if self.closed or self.transport is None or self.transport.is_closing():
            raise HTTPStreamError("connection closed before the request was sent")
        self._parser = _ResponseParser()
        self.pieces = []
        self.first_byte = None
        self._error = None
        self._done = asyncio.get_running_loop().create_future()
        start = time.perf_counter()
        self.transport.write(request)
        return start

    async def wait(self) -> None:
        """Until the response is complete or broken (the caller bounds the time)."""
        if self._done is None:
            raise HTTPStreamError("no request sent")
        await self._done

    @property
    def status(self) -> int | None:
        return self._parser.status if self._parser is not None else None

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def complete(self) -> bool:
        return self._parser is not None and self._parser.complete

    def events(self) -> tuple[list[tuple[float, bytes]], bytes]:
        """The response's SSE events with their arrival stamps, and any unfinished rest."""
        return split_events(self.pieces)

    def body(self) -> bytes:
        return b"".join(p for _, p in self.pieces)

    @property
    def reusable(self) -> bool:
        return (not self.closed and self._error is None and self._parser is not None
                and self._parser.complete and self._parser.keep_alive)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()


class _StampingProtocol(asyncio.Protocol):
    """Feeds an asyncio transport's reads to a StreamConnection, stamped on arrival
    (TLS, or where the kernel cannot stamp reads)."""

    def __init__(self, conn: StreamConnection) -> None:
        self.conn = conn

    def connection_made(self, transport) -> None:
        self.conn.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.conn._on_data(data, time.perf_counter())  # the stamp first: the rest is bookkeeping

    def connection_lost(self, exc) -> None:
        self.conn._on_close(exc)


class StreamPool:
    """Connections to one server, one per concurrency slot, opened ahead of the load."""

    def __init__(self, base_url: str, size: int, *, kernel_stamps: bool = True) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL {base_url!r}: use http:// or https://")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_header = parts.netloc
        self.size = size
        self._kernel_stamps = kernel_stamps
        self._refused_kernel_stamps = False  # a socket of this pool would not take the option
        self._idle: list[StreamConnection] = []

    @property
    def kernel_stamps(self) -> bool:
        """Whether reads are stamped by the kernel: plain HTTP on Linux unless turned off,
        and every connection opened so far took the option."""
        return self._wants_kernel_stamps() and not self._refused_kernel_stamps

    def _wants_kernel_stamps(self) -> bool:
        return self._kernel_stamps and self._ssl is None and kernel_stamps_available()

    async def _connect(self) -> StreamConnection:
        loop = asyncio.get_running_loop()
        conn = StreamConnection()
        if not self._wants_kernel_stamps():
            await loop.create_connection(lambda: _StampingProtocol(conn), self.host, self.port, ssl=self._ssl)
            return conn
        family, kind, proto, _, address = (await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            conn.transport = StampedSocket(sock, loop, conn._on_data, conn._on_close)
        except BaseException:
            sock.close()
            raise
        if not conn.kernel_stamps:  # its reads are stamped in Python: the round must not say "kernel"
            self._refused_kernel_stamps = True
        return conn

    async def open(self) -> None:
        missing = self.size - len(self._idle)
        if missing > 0:
            self._idle.extend(await asyncio.gather(*(self._connect() for _ in range(missing))))

    async def acquire(self) -> StreamConnection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return await self._connect()

    def release(self, conn: StreamConnection) -> None:
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()

    def request_bytes(self, path: str, body: bytes) -> bytes:
        head = (f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
        return head.encode("latin-1") + body

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
