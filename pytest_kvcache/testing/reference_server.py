"""A reference OpenAI-compatible server whose timings are fixed and known.

It exists to measure the load generator's own error: every streamed request gets its
first content chunk at ``arrival + ttft`` and chunk ``k`` at ``arrival + ttft + k*itl``,
where ``arrival`` is when the read holding the start of the request's head reached
this host: the kernel's receive stamp (``SO_TIMESTAMPNS``, see ``_sockio``), so that
the wake-up of this process's idle core is not counted as the client's time; where
the kernel gives no stamp, ``time.perf_counter()`` on arrival. The last JSON event
of a stream carries the truth::

    "server_timing": {"arrival_perf_s": 123.4, "chunk_perf_s": [123.44, 123.448, ...]}

``chunk_perf_s`` are the stamps taken right before each content chunk was handed to the
socket. ``perf_counter`` is ``CLOCK_MONOTONIC`` on Linux, so the stamps compare directly
with a client's in another process.

Run it with::

    python -m pytest_kvcache.testing.reference_server --host 127.0.0.1 --port 8123 \\
        --ttft-ms 40 --itl-ms 8 [--model NAME] [--tokens-per-chunk 1] [--error-every N] \\
        [--cut-after-chunks K [--cut-every N]] [--malformed-every N] \\
        [--stall-every N --stall-s S] [--early-headers] [--workers N] \\
        [--max-body-bytes N] [--max-header-bytes N] [--max-json-depth N] [--max-prompt-chars N]

How deadlines are kept with little CPU: it is one asyncio process with raw non-blocking sockets
served by the loop's reader callbacks (no web framework), and all chunk deadlines sit in one heap
served by a Linux ``timerfd`` armed at the earliest deadline with an absolute ``CLOCK_MONOTONIC``
time (``epoll``'s own timeout is rounded up to whole milliseconds). The timer fires ``EARLY_S``
before the deadline (and the timer slack is set to 1 ns), and a wake-up serves every deadline due
within ``EARLY_S`` (spinning the few microseconds to each), so requests that arrived together are
written together. Without ``timerfd`` (not Linux) it falls back to ``loop.call_later`` a little
early plus a spin. Request parsing happens after every connection that became readable in the same
event-loop pass was stamped, so a burst of requests gets arrival stamps that do not wait for each
other's JSON decoding. Where one core cannot write the chunks on time (tens of thousands a second),
``--workers N`` serves the port from N processes (``SO_REUSEPORT``: the kernel spreads the
connections); the stamps still compare, being one system-wide clock.

Endpoints, in vLLM's shapes: ``GET /health``, ``GET /version`` (``--served-version``),
``GET /v1/models``, ``POST /tokenize``,
``POST /detokenize``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``,
``max_tokens``, ``stream_options.include_usage``/``continuous_usage_stats``; exactly
``max_tokens`` tokens, the final usage event, ``data: [DONE]``). Tokens are words of the
emulator's :class:`~pytest_kvcache.emulator.tokenizer.WordTokenizer`.

Fault knobs count generation requests from 1 and apply to request ``seq`` when
``seq % N == 0``: ``--error-every`` answers HTTP 500 with a JSON error;
``--cut-after-chunks K`` closes the connection after K content chunks (every
``--cut-every`` request, default all); ``--malformed-every`` sends one event that is not
JSON in place of the second chunk; ``--stall-every`` pauses the stream ``--stall-s``
seconds after the first chunk. SIGTERM and SIGINT stop it with exit code 0.

Limits (a hostile request costs a bounded time and memory, and gets a 4xx in vLLM's error
shape, never a hang): a request line + headers over ``--max-header-bytes`` (64 KiB) get
431; a body over ``--max-body-bytes`` (16 MiB: a 1M-token prompt as text or ids is ~7 MB)
gets 413 as soon as its ``Content-Length`` is read; a missing or malformed request line,
a malformed header line, a ``Content-Length`` that is not one non-negative integer, and
any ``Transfer-Encoding`` get 400. Such a request is answered after the responses
already due on its connection, with ``Connection: close``; what the client sends after it
is dropped, and the connection closes when the client does (at most ``LINGER_S`` later).
JSON bodies must be ``application/json`` (415 otherwise; no ``Content-Type`` is taken as
JSON), strict JSON (no ``NaN``/``Infinity``), an object, nested at most
``--max-json-depth`` (64) containers deep; fields have their OpenAI types (``stream`` a
boolean, ``max_tokens`` a positive integer, ...). A prompt longer than
``--max-prompt-chars`` (16 x ``--max-model-len``) is refused before it is tokenized, and
one of more tokens than ``--max-model-len`` gets vLLM's ``This model's maximum context
length is N tokens...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import heapq
import itertools
import json
import os
import re
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from .._openai_request import (
    BadRequest,
    RequestLimits,
    add_limit_options,
    chat_ids,
    check_model,
    encode_prompt,
    flag,
    is_json_type,
    json_body,
    too_long,
)
from .._sockio import SO_TIMESTAMPNS, StampedSocket, kernel_stamps_available
from ..emulator.tokenizer import WordTokenizer, get_tokenizer

__all__ = ["ReferenceServer", "ReferenceSettings", "main", "serve"]

perf = time.perf_counter
EARLY_S = 100e-6  # the timerfd is armed this early; the rest of the wait is a spin
LINGER_S = 2.0  # a refused request's connection stays open this long for the client to read the answer


@dataclass(frozen=True)
class ReferenceSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "reference-model"
    ttft_ms: float = 40.0
    itl_ms: float = 8.0
    tokens_per_chunk: int = 1
    max_model_len: int = 1_000_000
    vocab_size: int = 32000
    error_every: int = 0
    cut_after_chunks: int = 0
    cut_every: int = 1
    malformed_every: int = 0
    stall_every: int = 0
    stall_s: float = 0.0
    early_headers: bool = False
    workers: int = 1
    served_version: str = "0.0.0-reference"
    limits: RequestLimits = RequestLimits()


# -- precise timers -------------------------------------------------------------------------
class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


def _timerfd():
    """(fd, settime function) of a CLOCK_MONOTONIC timerfd, or None where unavailable."""
    if not sys.platform.startswith("linux") or time.get_clock_info("perf_counter").implementation != \
            "clock_gettime(CLOCK_MONOTONIC)":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_itimerspec), ctypes.c_void_p]
    fd = create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
    try:  # timer slack (50 us by default) would make every wake-up that much late
        libc.prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except AttributeError:
        pass
    if fd < 0:
        return None
    spec = _itimerspec()
    ref = ctypes.byref(spec)

    def arm(when: float) -> None:
        sec = int(when)
        nsec = int((when - sec) * 1e9)
        if sec == 0 and nsec == 0:
            nsec = 1  # a zero value would disarm
        spec.it_value.tv_sec = sec
        spec.it_value.tv_nsec = nsec
        settime(fd, 1, ref, None)  # TFD_TIMER_ABSTIME

    return fd, arm


class _Timers:
    """One heap of deadlines (perf_counter seconds) served with microsecond precision."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list = []
        self._seq = itertools.count()
        self._armed: float | None = None
        self._firing = False
        self._handle: asyncio.TimerHandle | None = None
        tfd = _timerfd()
        if tfd is not None:
            self._fd, self._arm_fd = tfd
            loop.add_reader(self._fd, self._on_fd)
        else:
            self._fd = None

    def at(self, when: float, fn, *args) -> None:
        heapq.heappush(self.heap, (when, next(self._seq), fn, args))
        if not self._firing and (self._armed is None or when < self._armed):
            self._arm(when)

    def _arm(self, when: float) -> None:
        self._armed = when
        if self._fd is not None:
            self._arm_fd(when - EARLY_S)
        else:  # fallback: wake ~1.5 ms early (epoll rounds to ms) and spin
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self.loop.call_later(max(0.0, when - perf() - 0.0015), self._fire)

    def _on_fd(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        self._fire()

    def _fire(self) -> None:
        self._armed = None
        self._firing = True
        heap = self.heap
        horizon = EARLY_S if self._fd is not None else 0.002
        try:
            while heap and heap[0][0] <= perf() + horizon:
                when, _, fn, args = heapq.heappop(heap)
                while perf() < when:
                    pass
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001 - one broken stream must not stop the others
                    print(f"reference server: timer callback failed: {exc!r}", file=sys.stderr)
        finally:
            self._firing = False
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None


# -- HTTP -------------------------------------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 415: "Unsupported Media Type", 431: "Request Header Fields Too Large",
            500: "Internal Server Error"}
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token: a method or a header name
_SLICE = 1 << 20  # characters of a prompt split at a time when counting its words
_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")


def _response(status: int, body: bytes = b"", content_type: str = "application/json",
              close: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n")
    return head.encode("latin-1") + body


def _json_response(status: int, obj) -> bytes:
    return _response(status, json.dumps(obj).encode())


def _error_body(message: str, code: int) -> dict:
    kind = {404: "NotFoundError", 500: "InternalServerError"}.get(code, "BadRequestError" if code < 500 else "Error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


def _parse_head(head: str, max_body: int) -> tuple[str, str, dict[str, str], int]:
    """Method, path, headers (names in lower case) and body length of a request head
    (without its blank line); :class:`BadRequest` says what is wrong with a malformed one."""
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if (len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith("/")
            or parts[2] not in ("HTTP/1.1", "HTTP/1.0")):
        raise BadRequest(f"bad request line {lines[0][:100]!r}: expected 'METHOD /path HTTP/1.1'")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(f"bad header line {line[:100]!r}: expected 'Name: value'")
        name = name.lower()
        if name == "content-length" and name in headers:  # which one would frame the body?
            raise BadRequest("more than one Content-Length header")
        headers[name] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest("Transfer-Encoding (e.g. chunked request bodies) is not supported: send Content-Length")
    cl = headers.get("content-length", "0")
    if not (cl.isascii() and cl.isdigit()):
        raise BadRequest(f"bad Content-Length {cl[:40]!r}: expected one non-negative integer")
    digits = cl.lstrip("0") or "0"
    if len(digits) > len(str(max_body)) or int(digits) > max_body:
        raise BadRequest(f"request body of {digits[:40]} bytes is over the limit of {max_body} bytes "
                          "(--max-body-bytes)", 413)
    return parts[0], parts[1].split("?", 1)[0], headers, int(digits)


def _count_words(text: str, limit: int) -> int:
    """``len(text.split())`` (the tokenizer's count) a slice at a time, stopping once past ``limit``:
    a huge prompt costs neither the memory of all its words nor the time to split them all."""
    n = 0
    for i in range(0, len(text), _SLICE):
        part = text[i:i + _SLICE]
        n += len(part.split())
        if i and not part[0].isspace() and not text[i - 1].isspace():
            n -= 1  # the word across the slices' boundary was counted in both
        if n > limit:
            break
    return n


class _Request:
    __slots__ = ("arrival", "body", "headers", "method", "path")

    def __init__(self, arrival: float, method: str, path: str, headers: dict, body: bytes) -> None:
        self.arrival, self.method, self.path, self.headers, self.body = arrival, method, path, headers, body


class _Connection:
    def __init__(self, server: ReferenceServer) -> None:
        self.server = server
        self.transport: StampedSocket | None = None
        self.closed = False
        self._buf = bytearray()  # appends in place: a body that trickles in is not copied again per read
        self._need = 0  # the buffer's length when the request whose head was parsed is complete
        self._rejected = False  # a malformed request was queued: nothing after it is read
        self._arrival = 0.0
        self._queue: list[_Request | BadRequest] = []
        self._busy = False
        self._scheduled = False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)

    def data_received(self, data: bytes, stamp: float) -> None:
        """``stamp``: when the read's bytes reached this host (the kernel's stamp where it gives one)."""
        if self._rejected:
            return  # the connection ends after its error answer: what the client still sends is dropped
        if not self._buf:
            self._arrival = stamp  # the arrival of a request whose head starts here
        self._buf += data
        if len(self._buf) < self._need:
            return  # the body of a parsed head is still coming
        if not self._scheduled:
            # parse after every connection readable in this loop pass has been stamped
            self._scheduled = True
            self.server.loop.call_soon(self._parse, stamp)

    def _parse(self, stamp: float) -> None:
        self._scheduled = False
        lim = self.server.s.limits
        while self._buf and not self.closed and not self._rejected:
            end = self._buf.find(b"\r\n\r\n", 0, lim.max_header_bytes + 4)
            if end < 0:
                if len(self._buf) > lim.max_header_bytes:
                    self._reject(BadRequest(f"request line and headers are over the limit of {lim.max_header_bytes} "
                                            "bytes (--max-header-bytes)", 431))
                break
            try:
                method, path, headers, length = _parse_head(self._buf[:end].decode("latin-1"), lim.max_body_bytes)
            except BadRequest as exc:
                self._reject(exc)
                break
            if len(self._buf) < end + 4 + length:
                self._need = end + 4 + length
                break
            body = bytes(self._buf[end + 4: end + 4 + length])
            del self._buf[: end + 4 + length]
            self._need = 0
            self._queue.append(_Request(self._arrival, method, path, headers, body))
            self._arrival = stamp  # pipelined bytes after this request arrived with it
        self._next()

    def _reject(self, exc: BadRequest) -> None:
        """Queue the answer to a malformed request (after those already due) and read no more."""
        self._rejected = True
        self._buf.clear()
        self._need = 0
        self._queue.append(exc)

    def _next(self) -> None:
        if self._busy or not self._queue or self.closed:
            return
        req = self._queue.pop(0)
        self._busy = True  # a rejected request is the connection's last: it stays busy
        if isinstance(req, BadRequest):
            self.write(_response(req.code, json.dumps(_error_body(str(req), req.code)).encode(), close=True))
            # closing at once, with the client's bytes unread, would reset the connection and
            # could destroy the answer before the client reads it: close when it does, or later
            self.server.loop.call_later(LINGER_S, self.close)
            return
        self.server.handle(self, req)

    def done(self) -> None:
        """The current response is complete: serve the next pipelined request."""
        self._busy = False
        if self._queue:
            self._next()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # calls connection_lost
        self.closed = True


# -- the streams ---------------------------------------------------------------------------
class _Stream:
    """One streamed generation: chunk k is written at ``first + k*itl``."""

    __slots__ = (
        "arrival",
        "conn",
        "continuous",
        "cut_after",
        "first",
        "head",
        "include_usage",
        "itl",
        "k",
        "malformed",
        "max_tokens",
        "middle",
        "n_prompt",
        "nchunks",
        "prefix",
        "server",
        "stall_s",
        "stamps",
        "suffix",
        "tok",
        "tpc",
        "usage_head",
        "word_base",
        "word_span",
    )

    arrival: float  # perf_counter seconds
    conn: _Connection
    continuous: bool  # usage in every chunk
    cut_after: int  # close after this many chunks (0: never)
    first: float  # the first chunk's deadline
    head: bytes  # written before the first chunk: the response head and a chat's role event
    include_usage: bool  # a final usage event
    itl: float
    k: int  # the next chunk
    malformed: bool  # the second event is not JSON
    max_tokens: int
    middle: bytes  # closes a chunk's choice
    n_prompt: int
    nchunks: int
    prefix: bytes  # opens a chunk's event up to its text
    server: ReferenceServer
    stall_s: float
    stamps: list[float]
    suffix: bytes  # closes the last chunk's choice
    tok: WordTokenizer
    tpc: int  # tokens per chunk
    usage_head: bytes  # opens the final usage event
    word_base: int
    word_span: int

    def fire(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        k = self.k
        last = k == self.nchunks - 1
        parts = []
        if self.malformed and k == 1:
            parts.append(b'data: {"id": "broken", "choices": [{"text": \n\n')
        else:
            done = min(self.max_tokens, (k + 1) * self.tpc)
            usage = (b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
                     % (self.n_prompt, self.n_prompt + done, done)) if self.continuous else b""
            parts.append(self.prefix + self.text(k) + (self.suffix if last else self.middle) + usage)
        if k == 0 and self.head:
            payload_head = self.head
        else:
            payload_head = b""
        stamp = perf()
        self.stamps.append(stamp)
        if last and not self.include_usage:
            body = parts[0] + b',"server_timing":' + self.timing() + b"}\n\n"
        else:
            body = parts[0] + (b"}\n\n" if not parts[0].endswith(b"\n\n") else b"")
        conn.write(payload_head + _chunk(body))
        self.k = k + 1
        if self.cut_after and self.k >= self.cut_after and not last:
            conn.close()
            return
        if last:
            tail = b""
            if self.include_usage:
                mt = self.max_tokens
                tail = (self.usage_head + b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
                        % (self.n_prompt, self.n_prompt + mt, mt) + b',"server_timing":' + self.timing() + b"}\n\n")
            conn.write(_chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n")
            self.server.finished += 1
            conn.done()
            return
        when = self.first + self.k * self.itl
        if self.stall_s and k == 0:
            self.first += self.stall_s
            when += self.stall_s
        self.server.timers.at(when, self.fire)

    def text(self, k: int) -> bytes:
        """Chunk k's text as a JSON string: its tokens' words, each after a space (the
        words are plain ASCII letters, so no escaping is needed)."""
        tok, base, span, tpc = self.tok, self.word_base, self.word_span, self.tpc
        lo = tok.num_special
        words = [tok.id_to_word(lo + (base - lo + j * 104729) % span)
                 for j in range(k * tpc, min(self.max_tokens, (k + 1) * tpc))]
        return ('" ' + " ".join(words) + '"').encode()

    def timing(self) -> bytes:
        return (b'{"arrival_perf_s":%s,"chunk_perf_s":[%s]}'
                % (repr(self.arrival).encode(), ",".join(map(repr, self.stamps)).encode()))


class ReferenceServer:
    def __init__(self, settings: ReferenceSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.s = settings
        self.loop = loop
        self.tok = get_tokenizer(settings.vocab_size)
        self.timers = _Timers(loop)
        self.connections: set[_Connection] = set()
        self.seq = 0
        self.finished = 0
        self.created = int(time.time())
        self._listener: socket.socket | None = None

    async def start(self) -> None:
        family, kind, proto, _, address = socket.getaddrinfo(self.s.host, self.s.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.s.workers > 1:  # worker processes share the port: the kernel spreads connections
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if kernel_stamps_available():  # accepted sockets inherit it: bytes that come before
                with contextlib.suppress(OSError):  # the accept are stamped too
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind(address)
            sock.listen(4096)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                print(f"reference server: accept failed: {exc!r}", file=sys.stderr)
                return
            conn = _Connection(self)
            conn.transport = StampedSocket(sock, self.loop, conn.data_received, conn.connection_lost)
            self.connections.add(conn)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.getsockname()[1]

    def close(self) -> None:
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for c in list(self.connections):
            c.close()
        self.timers.close()

    # -- dispatch -----------------------------------------------------------------------
    def handle(self, conn: _Connection, req: _Request) -> None:
        try:
            route = (req.method, req.path)
            if route == ("GET", "/health"):
                conn.write(_response(200, b"", "text/plain"))
            elif route == ("GET", "/version"):
                conn.write(_json_response(200, {"version": self.s.served_version}))
            elif route == ("GET", "/v1/models"):
                m = self.s.model
                conn.write(_json_response(200, {"object": "list", "data": [{
                    "id": m, "object": "model", "created": self.created, "owned_by": "vllm", "root": m,
                    "parent": None, "max_model_len": self.s.max_model_len, "permission": []}]}))
            elif route == ("POST", "/tokenize"):
                conn.write(self._tokenize(self._json(req)))
            elif route == ("POST", "/detokenize"):
                conn.write(self._detokenize(self._json(req)))
            elif route in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
                if self._generate(conn, req, chat=req.path.endswith("chat/completions")):
                    return  # the stream calls conn.done() when it ends
            elif req.path in ("/health", "/version", "/v1/models", "/tokenize", "/detokenize", "/v1/completions",
                              "/v1/chat/completions"):
                raise BadRequest(f"method {req.method} not allowed", 405)
            else:
                raise BadRequest(f"no route {req.path}", 404)
        except BadRequest as exc:
            conn.write(_json_response(exc.code, _error_body(str(exc), exc.code)))
        except Exception:  # noqa: BLE001 - a bug costs one answer, not the connection nor the server
            traceback.print_exc()
            conn.write(_json_response(500, _error_body("reference server: internal error", 500)))
        conn.done()

    def _json(self, req: _Request) -> dict:
        s = self.s
        content_type = req.headers.get("content-type")
        if content_type is not None and not is_json_type(content_type):
            raise BadRequest(f"Content-Type {content_type[:100]!r} is not supported: send application/json", 415)
        body = json_body(req.body, s.limits.max_json_depth)
        check_model(body, s.model)
        return body

    def _check_chars(self, chars: int) -> None:
        self.s.limits.check_chars(chars, self.s.max_model_len)

    def _chat_ids(self, body: dict) -> list[int]:
        return chat_ids(self.tok, body, self.s.limits, self.s.max_model_len)

    def _tokenize(self, body: dict) -> bytes:
        if "messages" in body:
            ids = self._chat_ids(body)
        elif isinstance(body.get("prompt"), str):
            self._check_chars(len(body["prompt"]))
            ids = encode_prompt(self.tok, body["prompt"])
        else:
            raise BadRequest("'prompt' (a string) or 'messages' is required")
        return _json_response(200, {"count": len(ids), "max_model_len": self.s.max_model_len, "tokens": ids,
                                    "token_strs": None})

    def _detokenize(self, body: dict) -> bytes:
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise BadRequest("'tokens' must be a list of integers")
        try:
            return _json_response(200, {"prompt": self.tok.decode(ids)})
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def _prompt_len(self, body: dict, chat: bool) -> int:
        """The prompt's tokens; a prompt over the context length is refused here, once counted past it."""
        limit = self.s.max_model_len
        if chat:
            n = len(self._chat_ids(body))
            if n > limit:
                raise BadRequest(too_long(limit, n))
            return n
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            self._check_chars(len(prompt))
            n = _count_words(prompt, limit)
            if n > limit:
                raise BadRequest(too_long(limit, f"more than {limit}"))
            return n
        if isinstance(prompt, list) and len(prompt) > limit:
            raise BadRequest(too_long(limit, len(prompt)))
        if isinstance(prompt, list) and all(type(i) is int and 0 <= i < self.s.vocab_size for i in prompt):
            return len(prompt)
        raise BadRequest(f"'prompt' must be a string or a list of token ids in [0, {self.s.vocab_size})")

    def _generate(self, conn: _Connection, req: _Request, chat: bool) -> bool:
        """Answer a generation request; True when a stream was started (it ends itself)."""
        s = self.s
        body = self._json(req)
        n = self._prompt_len(body, chat)
        if n == 0:
            raise BadRequest("The prompt is empty: at least one token is required")
        mt = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
            else body.get("max_tokens")
        if mt is None:
            mt = 16
        if type(mt) is not int or mt < 1:
            raise BadRequest("max_tokens must be a positive integer")
        if n + mt > s.max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {s.max_model_len} tokens. However, you requested "
                f"{n + mt} tokens ({n} in the messages, {mt} in the completion). Please reduce the length of "
                "the messages or completion.")
        stream = flag(body, "stream")
        so = body.get("stream_options")
        if so is None:
            so = {}
        if not isinstance(so, dict):
            raise BadRequest("stream_options must be an object")
        continuous, include_usage = flag(so, "continuous_usage_stats"), flag(so, "include_usage")
        self.seq += 1
        seq = self.seq
        if s.error_every and seq % s.error_every == 0:
            conn.write(_json_response(500, _error_body("reference server: injected internal error", 500)))
            return False
        rid = f"{'chatcmpl' if chat else 'cmpl'}-ref{seq}"
        lo, hi = self.tok.num_special, self.tok.vocab_size
        ttft, itl = s.ttft_ms / 1000.0, s.itl_ms / 1000.0
        tpc = max(1, s.tokens_per_chunk)
        nchunks = -(-mt // tpc)
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = json.dumps(s.model)
        if not stream:
            words = [self.tok.id_to_word(lo + (seq * 7919 + k * 104729) % (hi - lo)) for k in range(mt)]
            self.timers.at(req.arrival + ttft + (nchunks - 1) * itl, self._whole, conn, req, rid, chat, n, mt,
                           words, model)
            return True
        head = b'data: {"id":"%s","object":"%s","created":%d,"model":%s' % (
            rid.encode(), obj.encode(), self.created, model.encode())
        st = _Stream()
        st.conn, st.server, st.arrival = conn, self, req.arrival
        st.first, st.itl = req.arrival + ttft, itl
        st.word_base, st.word_span, st.tok = lo + seq * 7919, hi - lo, self.tok
        if chat:
            st.prefix = head + b',"choices":[{"index":0,"delta":{"content":'
            st.middle = b'},"logprobs":null,"finish_reason":null}]'
            st.suffix = b'},"logprobs":null,"finish_reason":"length"}]'
        else:
            st.prefix = head + b',"choices":[{"index":0,"text":'
            st.middle = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]'
            st.suffix = b',"logprobs":null,"finish_reason":"length","stop_reason":null}]'
        st.usage_head = head + b',"choices":[]'
        st.n_prompt, st.max_tokens, st.tpc, st.nchunks, st.k = n, mt, tpc, nchunks, 0
        st.continuous, st.include_usage = continuous, include_usage
        st.stamps = []
        st.cut_after = s.cut_after_chunks if (s.cut_after_chunks and seq % max(1, s.cut_every) == 0) else 0
        st.malformed = bool(s.malformed_every and seq % s.malformed_every == 0 and nchunks > 2)
        st.stall_s = s.stall_s if (s.stall_every and seq % s.stall_every == 0) else 0.0
        first_events = b""
        if chat:
            role = head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,' \
                          b'"finish_reason":null}]'
            if st.continuous:
                role += b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":0}' % (n, n)
            first_events = _chunk(role + b"}\n\n")
        if s.early_headers:
            conn.write(_STREAM_HEAD)
            st.head = first_events
        else:
            st.head = _STREAM_HEAD + first_events
        self.timers.at(st.first, st.fire)
        return True

    def _whole(self, conn: _Connection, req: _Request, rid: str, chat: bool, n: int, mt: int,
               words: list[str], model: str) -> None:
        stamp = perf()
        text = "".join(" " + w for w in words)
        usage = {"prompt_tokens": n, "total_tokens": n + mt, "completion_tokens": mt}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": self.created,
               "model": self.s.model, "choices": [choice], "usage": usage,
               "server_timing": {"arrival_perf_s": req.arrival, "chunk_perf_s": [stamp]}}
        conn.write(_json_response(200, out))
        self.finished += 1
        conn.done()


async def serve(settings: ReferenceSettings, ready=None) -> None:
    """Run until SIGTERM/SIGINT (or cancellation)."""
    loop = asyncio.get_running_loop()
    server = ReferenceServer(settings, loop)
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not POSIX
            pass
    # one write per line: worker processes share the output and must not interleave mid-line
    sys.stdout.write(f"reference server listening on http://{settings.host}:{server.port} "
                     f"(pid {os.getpid()}, ttft {settings.ttft_ms:g} ms, itl {settings.itl_ms:g} ms, "
                     f"timer {'timerfd' if server.timers._fd is not None else 'call_later+spin'})\n")
    sys.stdout.flush()
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        server.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pytest_kvcache.testing.reference_server",
                                description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="reference-model")
    p.add_argument("--ttft-ms", type=float, default=40.0)
    p.add_argument("--itl-ms", type=float, default=8.0)
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=1_000_000)
    p.add_argument("--error-every", type=int, default=0, metavar="N")
    p.add_argument("--cut-after-chunks", type=int, default=0, metavar="K")
    p.add_argument("--cut-every", type=int, default=1, metavar="N")
    p.add_argument("--malformed-every", type=int, default=0, metavar="N")
    p.add_argument("--stall-every", type=int, default=0, metavar="N")
    p.add_argument("--stall-s", type=float, default=0.0, metavar="S")
    p.add_argument("--early-headers", action="store_true",
                   help="send the response head at once, not with the first chunk (as vLLM does)")
    p.add_argument("--served-version", default="0.0.0-reference", metavar="V",
                   help="what GET /version reports, as vLLM's server does (to rehearse an upgrade)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="serve from N processes sharing the port (SO_REUSEPORT), for chunk rates one core "
                        "cannot write; a fixed --port is needed (fault knobs count per process)")
    add_limit_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    settings = ReferenceSettings(
        host=a.host, port=a.port, model=a.model, ttft_ms=a.ttft_ms, itl_ms=a.itl_ms,
        tokens_per_chunk=a.tokens_per_chunk, max_model_len=a.max_model_len, error_every=a.error_every,
        cut_after_chunks=a.cut_after_chunks, cut_every=a.cut_every, malformed_every=a.malformed_every,
        stall_every=a.stall_every, stall_s=a.stall_s, early_headers=a.early_headers, workers=a.workers,
        served_version=a.served_version, limits=RequestLimits.from_args(a))
    if settings.workers > 1 and settings.port == 0:
        _parser().error("--workers needs a fixed --port: the processes must bind the same one")
    children = [_fork_worker(settings) for _ in range(settings.workers - 1)]
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            _stop_worker(pid)
    return 0


def _fork_worker(settings: ReferenceSettings) -> int:
    """A child process serving the same port; it ends with this process (SIGTERM on its death)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # whatever happens, the child must never return into the parent's code
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        asyncio.run(serve(settings))
        code = 0
    except KeyboardInterrupt:
        code = 0
    except BaseException:  # noqa: BLE001 - reported, then the worker ends
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _stop_worker(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


if __name__ == "__main__":
    sys.exit(main())
