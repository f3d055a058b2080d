"""Sockets whose reads carry the kernel's receive time (_sockio), and the client's use of them."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pytest_kvcache import _sockio
from pytest_kvcache._http import StreamPool
from pytest_kvcache._sockio import StampedSocket, kernel_stamps_available

needs_kernel_stamps = pytest.mark.skipif(not kernel_stamps_available(), reason="the kernel stamps TCP reads on Linux")
BLOCK_S = 0.08  # how long the test holds the event loop while bytes wait in the socket


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


async def stamp_of_bytes_sent_while_the_loop_was_held() -> tuple[float, float, float]:
    """(send time, the read's stamp, when the read was handled), perf_counter seconds."""
    loop = asyncio.get_running_loop()
    near, far = tcp_pair()
    got: asyncio.Future = loop.create_future()

    def on_data(data: bytes, stamp: float) -> None:
        if not got.done():
            got.set_result((stamp, time.perf_counter()))

    conn = StampedSocket(far, loop, on_data, lambda exc: None)
    try:
        sent = time.perf_counter()
        near.sendall(b"x")
        time.sleep(BLOCK_S)  # noqa: ASYNC251 - held on purpose: the reader callback cannot run meanwhile
        stamp, handled = await asyncio.wait_for(got, 10)
    finally:
        conn.close()
        near.close()
    return sent, stamp, handled


@needs_kernel_stamps
def test_a_read_is_stamped_when_its_bytes_arrived_not_when_the_loop_got_to_it() -> None:
    sent, stamp, handled = asyncio.run(stamp_of_bytes_sent_while_the_loop_was_held())
    assert handled - sent >= BLOCK_S
    assert sent <= stamp < sent + BLOCK_S / 2
    assert stamp <= handled


def test_without_kernel_stamps_the_read_is_stamped_when_handled(monkeypatch) -> None:
    monkeypatch.setattr(_sockio, "kernel_stamps_available", lambda: False)
    sent, stamp, handled = asyncio.run(stamp_of_bytes_sent_while_the_loop_was_held())
    assert stamp - sent >= BLOCK_S
    assert stamp <= handled


def test_large_writes_go_out_whole_even_when_closed_at_once() -> None:
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB: more than a socket buffer takes at once

    async def run() -> tuple[bytes, list, bool]:
        loop = asyncio.get_running_loop()
        near, far = tcp_pair()
        closes: list = []
        conn = StampedSocket(near, loop, lambda data, stamp: None, closes.append)
        conn.write(payload)
        conn.close()  # like asyncio's transports: what was written still goes out, then the close
        closing = conn.is_closing()
        far.setblocking(False)
        received = bytearray()
        while chunk := await loop.sock_recv(far, 1 << 20):
            received += chunk
        far.close()
        return bytes(received), closes, closing

    received, closes, closing = asyncio.run(run())
    assert closing
    assert received == payload
    assert closes == [None]


def test_the_peer_closing_is_reported_once() -> None:
    async def run() -> list:
        loop = asyncio.get_running_loop()
        near, far = tcp_pair()
        closes: list = []
        reads: list = []
        conn = StampedSocket(near, loop, lambda data, stamp: reads.append(data), closes.append)
        far.sendall(b"last words")
        far.close()
        while not closes:
            await asyncio.sleep(0.01)
        conn.close()
        assert b"".join(reads) == b"last words"
        return closes

    assert asyncio.run(run()) == [None]


def test_closing_from_our_side_reports_once_and_stops_reading() -> None:
    async def run() -> tuple[list, bool]:
        loop = asyncio.get_running_loop()
        near, far = tcp_pair()
        closes: list = []
        conn = StampedSocket(near, loop, lambda data, stamp: None, closes.append)
        conn.close()
        conn.close()
        conn.write(b"ignored after close")
        far.close()
        return closes, conn.is_closing()

    closes, closing = asyncio.run(run())
    assert closes == [None] and closing


@needs_kernel_stamps
def test_a_pool_whose_socket_refused_kernel_stamps_says_so(monkeypatch) -> None:
    monkeypatch.setattr(_sockio, "SO_TIMESTAMPNS", 0x7FFF)  # an option no socket takes

    async def run() -> tuple[bool, bool, bool]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            pool = StreamPool(f"http://127.0.0.1:{listener.getsockname()[1]}", 1)
            before = pool.kernel_stamps
            await pool.open()
            conn = await pool.acquire()
            try:
                return before, conn.kernel_stamps, pool.kernel_stamps
            finally:
                conn.close()

    before, connection, after = asyncio.run(run())
    assert before and not connection and not after
