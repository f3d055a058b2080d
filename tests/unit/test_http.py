"""The raw HTTP/1.1 response parser and SSE split of the measuring client (_http)."""

from __future__ import annotations

import pytest

from pytest_kvcache._http import HTTPStreamError, _ResponseParser, split_events

EVENTS = [b'data: {"a": 1}\n\n', b'data: {"b": 22}\n\n', b"data: [DONE]\n\n"]
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n")
BODY = b'{"error": {"message": "boom"}}'
LENGTH = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%b" % (len(BODY), BODY)


def feed_all(pieces: list[bytes]) -> tuple[_ResponseParser, bytes]:
    p = _ResponseParser()
    out = b""
    for piece in pieces:
        out += b"".join(p.feed(piece))
    return p, out


def test_chunked_in_one_read() -> None:
    p, body = feed_all([CHUNKED])
    assert p.complete and p.status == 200 and p.keep_alive
    assert body == b"".join(EVENTS)


@pytest.mark.parametrize("data", [CHUNKED, LENGTH], ids=["chunked", "content-length"])
def test_split_at_every_byte_boundary(data: bytes) -> None:
    whole = feed_all([data])[1]
    for cut in range(1, len(data)):
        p, body = feed_all([data[:cut], data[cut:]])
        assert p.complete, cut
        assert body == whole, cut
    p, body = feed_all([data[i:i + 1] for i in range(len(data))])
    assert p.complete and body == whole


def test_content_length() -> None:
    p, body = feed_all([LENGTH])
    assert p.status == 500 and p.complete and body == BODY
    p, body = feed_all([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert p.complete and body == b""


def test_incomplete_is_not_complete() -> None:
    p, _ = feed_all([CHUNKED[:-3]])
    assert not p.complete
    p, _ = feed_all([LENGTH[:-1]])
    assert not p.complete


def test_until_close() -> None:
    p, body = feed_all([b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"])
    assert not p.complete and not p.keep_alive and body == b"abcdef"
    assert p.finish_at_eof() and p.complete
    p, _ = feed_all([CHUNKED[:-3]])
    assert not p.finish_at_eof()


def test_chunk_extension_and_trailer() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    p, body = feed_all([data])
    assert p.complete and body == b"abc"


@pytest.mark.parametrize("data, message", [
    (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.1 response"),
    (b"HTTP/1.1 abc OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", "not followed by CRLF"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", "unexpected bytes after the response"),
])
def test_bad_framing_raises(data: bytes, message: str) -> None:
    with pytest.raises(HTTPStreamError, match=message):
        feed_all([data])
    with pytest.raises(HTTPStreamError, match=message):  # byte by byte too
        feed_all([data[i:i + 1] for i in range(len(data))])


def test_split_events_stamps_the_read_that_completed_an_event() -> None:
    pieces = [(1.0, b"data: a\n"), (2.0, b"\ndata: b\n\nda"), (3.0, b"ta: c\r\n\r"), (4.0, b"\ndata: d")]
    events, rest = split_events(pieces)
    assert events == [(2.0, b"data: a"), (2.0, b"data: b"), (4.0, b"data: c")]
    assert rest == b"data: d"


def test_split_events_empty() -> None:
    assert split_events([]) == ([], b"")
