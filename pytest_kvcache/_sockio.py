"""Non-blocking TCP sockets whose reads carry the kernel's receive time.

A stamp taken in Python when a read is handed over is late by however long the
process took to notice the socket: the wake-up of an idle core (0.3-1 ms on these
virtual machines), and the event-loop pass that serves other sockets first. Linux
stamps every received packet in the network stack (``SO_TIMESTAMPNS``, software
receive timestamps); ``recvmsg`` hands back the stamp of the newest packet the read
took, so a read's stamp is when its last bytes reached this host, whatever the
process was doing then. The kernel's stamp is ``CLOCK_REALTIME``; it is moved onto
``time.perf_counter``'s ``CLOCK_MONOTONIC`` with the two clocks' offset read right
after the read (integer nanoseconds: realtime does not fit a float exactly).

Where the kernel gives no stamp (not Linux, or the option is refused) a read is
stamped with ``perf_counter`` on arrival, as before; :attr:`StampedSocket.kernel_stamps`
says which. A stamp is never later than the moment the read was handed over.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["SO_TIMESTAMPNS", "StampedSocket", "kernel_stamps_available"]

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python names it since 3.x on Linux
_TIMESPEC = struct.Struct("@qq")
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
_READ_SIZE = 262144


def kernel_stamps_available() -> bool:
    """True where this platform can stamp TCP reads in the kernel."""
    return sys.platform.startswith("linux") and _ANC_SIZE > 0 and hasattr(socket.socket, "recvmsg")


class StampedSocket:
    """A connected non-blocking socket served by an event loop's reader callback.

    Every read goes to ``on_data(data, stamp)`` (``stamp`` in ``perf_counter`` seconds);
    end of stream or an error goes once to ``on_close(exc or None)``. Writes go out at
    once; what the kernel does not take is kept and written when the socket is
    writable again.
    """

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_data: Callable[[bytes, float], None], on_close: Callable[[BaseException | None], None]) -> None:
        self.sock = sock
        self.loop = loop
        self._on_data = on_data
        self._on_close = on_close
        self._pending = bytearray()
        self.closed = False
        self._closing = False  # close() was called while bytes were still to be written
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.kernel_stamps = False
        if kernel_stamps_available():
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self.kernel_stamps = True
            except OSError:
                pass
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        ancillary: Sequence[tuple[int, int, bytes]]  # recvmsg's list, or none
        try:
            if self.kernel_stamps:
                data, ancillary, _flags, _addr = self.sock.recvmsg(_READ_SIZE, _ANC_SIZE)
            else:
                data, ancillary = self.sock.recv(_READ_SIZE), ()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        now_ns = time.perf_counter_ns()
        if not data:
            self._lost(None)
            return
        stamp_ns = now_ns
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(raw)
                offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.perf_counter_ns()
                kernel_ns = sec * 1_000_000_000 + nsec - offset
                if kernel_ns < now_ns:  # a realtime step could put it after the read: keep ours then
                    stamp_ns = kernel_ns
        self._on_data(data, stamp_ns / 1e9)

    def write(self, data: bytes) -> None:
        if self.closed or self._closing:
            return
        if self._pending:
            self._pending += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._pending += data[sent:]
            self.loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._pending[:sent]
        if not self._pending:
            self.loop.remove_writer(self._fd)
            if self._closing:
                self._lost(None)

    def is_closing(self) -> bool:
        return self.closed or self._closing

    def _detach(self) -> None:
        self.closed = True
        self.loop.remove_reader(self._fd)  # a no-op where close() removed it already
        if self._pending:
            self._pending.clear()
            self.loop.remove_writer(self._fd)
        self.sock.close()

    def _lost(self, exc: BaseException | None) -> None:
        if not self.closed:
            self._detach()
            self._on_close(exc)

    def close(self) -> None:
        """Close from our side once what was written has gone out (reads stop at once);
        ``on_close(None)`` is called then, as for a close by the peer."""
        if self.closed or self._closing:
            return
        if self._pending:
            self._closing = True
            self.loop.remove_reader(self._fd)
            return
        self._lost(None)
