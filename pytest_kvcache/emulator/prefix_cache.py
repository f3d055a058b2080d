"""Chunked prefix cache with LMCache semantics, over storage tiers that do real I/O.

* A prompt's token ids are cut into chunks of ``chunk_size`` tokens; only whole chunks
  are keys (LMCache's ``save_unfull_chunk: false``), so prompts shorter than one chunk
  never hit.  Chunk keys form a hash chain: ``key[i] = blake2b(key[i-1] + ids of chunk
  i)`` with ``key[-1] = blake2b(namespace)`` (the namespace holds the model name and the
  chunk size), so a key names the whole prefix up to its chunk.
* A lookup returns the longest run of consecutive chunks present from the start.
* Every stored chunk holds real bytes: ``chunk_size * kv_bytes_per_token *
  payload_scale`` of them (payload_scale defaults to 1/4096: 3,584 bytes for a
  256-token chunk of Qwen2.5-7B, so a 100k-token prompt stores ~1.4 MB and large
  scenarios fit in RAM and on disk).  The content is derived from the key (the true KV
  of that prefix).  A read checks what storage can check (the length, and for files and
  redis a header with magic and crc32): a missing, short or corrupt frame is evicted and
  counts as a miss.  It does not compare the bytes with the true content (an engine
  cannot know it): :meth:`PrefixCache.load` reports the digests of chunks whose bytes
  differ, and the emulator's answer follows them, as a real model's output follows the
  KV it was given.
* ``corrupt_rate`` (a fault knob) stores a seeded share of the chunks with altered bytes,
  framed with the CRC of those bytes: corruption between the engine's copy and the tier
  (an offload connector's bug), which no frame check catches.
* A salt (vLLM's ``cache_salt``) is mixed into the namespace of a request's keys, so
  salted requests share no chunk with unsalted or differently salted ones.
* Tier sizes are given in GB of the *real* model's KV (like LMCache's
  ``max_local_cpu_size``): a tier holds as many tokens as a real one of that size would,
  and the bytes actually held are that times ``payload_scale``.  ``usage()`` returns
  the bytes actually held; :meth:`PrefixCache.modeled_usage` the real-model equivalent.

Tiers share one small interface (``contains``, ``get``, ``put``, their batched forms
``get_many`` and ``put_many``, ``evict``, ``usage``, ``clear``), LRU with a byte limit,
thread-safe (the emulator writes in a thread while it reads on its event loop):

``none``  never stores, never hits.
``cpu``   bytes in an ``OrderedDict``.
``disk``  one real file per chunk (``<key hex>.kvchunk``) under a directory, written
          atomically (temporary file + ``os.replace``), read back on a hit; the index is
          rebuilt from the directory at start (hits survive a restart).  With
          ``use_odirect`` files are padded to 4 KiB and read/written with ``O_DIRECT``
          through aligned buffers, falling back to buffered I/O where the filesystem
          refuses it (tmpfs).
``gds``   the disk tier under another name (its bandwidth is modeled in costmodel).
``waterfall`` a cpu tier over a disk tier (as LMCache's local CPU backend over its local
          disk, and the MLPerf storage benchmark's tiers): new chunks go to RAM; chunks
          the RAM's LRU pushes out are demoted to disk (real files); a hit is served by
          the fastest tier holding the chunk, and a disk hit is promoted back to RAM.
          :meth:`WaterfallTier.where` says which tier holds a key (for the cost model).
``redis`` real reads and writes against a Redis server (``--redis-url redis://host:port[/db]``)
          through a small built-in RESP client (no extra package), one connection per
          thread.  A request's chunks travel in batches, one round trip each (``MGET``
          to read, ``MSET`` to write, up to ``REDIS_BATCH`` chunks), as LMCache's
          Redis connector fetches and stores a lookup's chunks concurrently
          (``batched_get_non_blocking``, ``batched_put``) rather than one after
          another.  Values carry the same header (magic, length, crc32) as files; keys
          are named like LMCache's (``kvem@<namespace>@<key hex>kv_bytes``).  The LRU
          index is rebuilt with ``SCAN`` at start (hits survive an emulator restart
          while the server lives).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from .._redis_url import parse_redis_url

__all__ = [
    "CpuTier",
    "DiskTier",
    "NoneTier",
    "PrefixCache",
    "RedisTier",
    "Tier",
    "WaterfallTier",
    "chunk_keys",
    "make_tier",
]

log = logging.getLogger("pytest_kvcache.emulator")

_T = TypeVar("_T")
_MAGIC = b"KVEM"
_HEADER = struct.Struct("<4sIII")  # magic, payload length, crc32, reserved


def _frame(data: bytes) -> bytes:
    """A stored chunk: header (magic, length, CRC32) + payload."""
    return _HEADER.pack(_MAGIC, len(data), zlib.crc32(data), 0) + data


def _unframe(raw: bytes | None) -> bytes | None:
    """The payload of a stored chunk, or None when it is missing, short or corrupt."""
    if raw is None or len(raw) < _HEADER.size:
        return None
    magic, length, crc, _ = _HEADER.unpack_from(raw)
    payload = raw[_HEADER.size:_HEADER.size + length]
    if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload
_ALIGN = 4096
_SUFFIX = ".kvchunk"


def chunk_keys(ids: Sequence[int], chunk_size: int, namespace: bytes = b"") -> list[bytes]:
    """Hash-chain keys of the whole chunks of ``ids`` (a partial tail has no key)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    n = len(ids) // chunk_size
    if n == 0:
        return []
    raw = array("I", ids[: n * chunk_size]).tobytes()
    step = chunk_size * 4
    prev = hashlib.blake2b(b"kvem-root|" + namespace, digest_size=16).digest()
    keys = []
    blake = hashlib.blake2b
    for i in range(n):
        h = blake(prev, digest_size=16)
        h.update(raw[i * step : (i + 1) * step])
        prev = h.digest()
        keys.append(prev)
    return keys


# -------------------------------------------------------------------------------------
# tiers
# -------------------------------------------------------------------------------------
class Tier:
    """Interface of a storage tier (LRU with a byte limit)."""

    name = "base"

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._lock = threading.Lock()

    def contains(self, key: bytes) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, key: bytes) -> bytes | None:  # pragma: no cover - interface
        raise NotImplementedError

    def put(self, key: bytes, data: bytes) -> list[bytes]:  # pragma: no cover
        """Store ``data``; return the keys evicted to make room."""
        raise NotImplementedError

    def get_many(self, keys: Sequence[bytes]) -> Iterator[bytes | None]:
        """``get`` of each key in order, lazily: a reader that stops at the first miss
        reads no further (tiers with a round-trip cost fetch in batches instead)."""
        return (self.get(k) for k in keys)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """``put`` of each (key, data) in order; return the keys evicted to make room."""
        evicted: list[bytes] = []
        for key, data in items:
            evicted.extend(self.put(key, data))
        return evicted

    def evict(self, key: bytes) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def usage(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def clear(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _accept(self, key: bytes, raw: bytes | None) -> bytes | None:
        """The payload of a chunk read back from storage, marked recently used; a corrupt
        or truncated one is evicted and is a miss, never a silent hit. For tiers that keep
        an ``_index`` (an OrderedDict in LRU order) of what they stored."""
        payload = _unframe(raw)
        if payload is None:
            self.evict(key)
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return payload


class NoneTier(Tier):
    name = "none"

    def __init__(self) -> None:
        super().__init__(0)

    def contains(self, key: bytes) -> bool:
        return False

    def get(self, key: bytes) -> bytes | None:
        return None

    def put(self, key: bytes, data: bytes) -> list[bytes]:
        return []

    def evict(self, key: bytes) -> bool:
        return False

    def usage(self) -> int:
        return 0

    def __len__(self) -> int:
        return 0

    def clear(self) -> None:
        pass


class CpuTier(Tier):
    name = "cpu"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._used = 0

    def contains(self, key: bytes) -> bool:
        return key in self._data

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: bytes, data: bytes) -> list[bytes]:
        return [k for k, _ in self.put_items(key, data)]

    def put_items(self, key: bytes, data: bytes) -> list[tuple[bytes, bytes]]:
        """Like :meth:`put`, returning the evicted (key, data) pairs (for demotion)."""
        size = len(data)
        evicted: list[tuple[bytes, bytes]] = []
        with self._lock:
            if size > self.capacity_bytes:
                return evicted
            old = self._data.pop(key, None)
            if old is not None:
                self._used -= len(old)
            while self._data and self._used + size > self.capacity_bytes:
                k, v = self._data.popitem(last=False)
                self._used -= len(v)
                evicted.append((k, v))
            self._data[key] = data
            self._used += size
        return evicted

    def evict(self, key: bytes) -> bool:
        with self._lock:
            v = self._data.pop(key, None)
            if v is None:
                return False
            self._used -= len(v)
            return True

    def usage(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._used = 0


class DiskTier(Tier):
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int, use_odirect: bool = False, name: str = "disk") -> None:
        super().__init__(capacity_bytes)
        self.name = name
        self.path = os.path.abspath(path)
        self._prefix = os.path.join(self.path, "")
        os.makedirs(self.path, exist_ok=True)
        self.use_odirect = bool(use_odirect) and hasattr(os, "O_DIRECT")
        self.odirect_active = self.use_odirect
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> payload bytes
        self._used = 0
        self._tmp_seq = 0
        self._rebuild()

    # -- files ----------------------------------------------------------------------
    def _file(self, key: bytes) -> str:
        return self._prefix + key.hex() + _SUFFIX

    def _rebuild(self) -> None:
        found = []
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return
        for e in entries:
            if e.name.startswith(".") and ".tmp" in e.name:
                try:
                    os.unlink(e.path)  # our own leftover temporary file
                except OSError:
                    pass
                continue
            if not e.name.endswith(_SUFFIX):
                continue
            try:
                key = bytes.fromhex(e.name[: -len(_SUFFIX)])
                st = e.stat()
            except (ValueError, OSError):
                continue
            found.append((st.st_mtime, key, max(0, st.st_size - _HEADER.size)))
        found.sort()
        for _, key, size in found:
            self._index[key] = size
            self._used += size
        if found:
            log.info("disk tier %s: %d chunks found from a previous run", self.path, len(found))
        self._evict_to(0)

    def _write_file(self, fname: str, blob: bytes) -> None:
        self._tmp_seq += 1
        tmp = f"{self._prefix}.{fname[len(self._prefix):]}.tmp{os.getpid()}.{self._tmp_seq}"
        if self.odirect_active:
            try:
                self._write_odirect(tmp, blob)
                os.replace(tmp, fname)
                return
            except OSError as exc:
                self.odirect_active = False
                log.warning("O_DIRECT refused on %s (%s); using buffered I/O", self.path, exc)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        # bare descriptors, as for reads (a buffered file object costs more than the write)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        os.replace(tmp, fname)

    @staticmethod
    def _aligned(n: int) -> int:
        return (n + _ALIGN - 1) // _ALIGN * _ALIGN

    def _write_odirect(self, tmp: str, blob: bytes) -> None:
        import mmap

        size = self._aligned(len(blob))
        buf = mmap.mmap(-1, size)
        try:
            buf.write(blob)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
            try:
                os.write(fd, buf)
            finally:
                os.close(fd)
        finally:
            buf.close()

    def _read_odirect(self, fname: str) -> bytes:
        import mmap

        fd = os.open(fname, os.O_RDONLY | os.O_DIRECT)
        try:
            size = self._aligned(os.fstat(fd).st_size)
            buf = mmap.mmap(-1, max(size, _ALIGN))
            try:
                n = os.readv(fd, [buf])
                return bytes(buf[:n])
            finally:
                buf.close()
        finally:
            os.close(fd)

    def _read_file(self, fname: str, size: int) -> bytes:
        """Up to ``size`` bytes from the start of a chunk file."""
        if self.odirect_active:
            try:
                return self._read_odirect(fname)[:size]
            except FileNotFoundError:
                raise
            except OSError as exc:
                self.odirect_active = False
                log.warning("O_DIRECT read refused on %s (%s); using buffered I/O", self.path, exc)
        # Bare descriptors: a chunk is a few KiB, so the calls are the cost, and a buffered
        # file object costs twice the read itself (a 10k-token hit reads 39 files).
        fd = os.open(fname, os.O_RDONLY)
        try:
            return os.read(fd, size)
        finally:
            os.close(fd)

    # -- interface ------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self._index

    def get(self, key: bytes) -> bytes | None:
        return next(self.get_many([key]))

    def get_many(self, keys: Sequence[bytes]) -> Iterator[bytes | None]:
        """Each chunk read back from its file and checked, lazily (see :meth:`Tier.get_many`);
        a missing, short or corrupt one is evicted and is a miss.  One tight loop without a
        lock per chunk: the read is on the prefill path, and a 100k-token hit reads 390."""
        index = self._index
        for key in keys:
            size = index.get(key)
            if size is None:
                yield None
                continue
            try:
                payload = _unframe(self._read_file(self._file(key), _HEADER.size + size))
            except OSError:
                payload = None
            if payload is None:
                self.evict(key)
                yield None
                continue
            try:
                index.move_to_end(key)  # recently used (one atomic step: no lock needed)
            except KeyError:
                pass  # evicted meanwhile by the writer thread
            yield payload

    def put(self, key: bytes, data: bytes) -> list[bytes]:
        size = len(data)
        if size > self.capacity_bytes:
            return []
        blob = _frame(data)
        self._write_file(self._file(key), blob)
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old
            self._index[key] = size
            self._used += size
        return self._evict_to(0)

    def _evict_to(self, extra: int) -> list[bytes]:
        evicted = []
        with self._lock:
            while len(self._index) > 1 and self._used + extra > self.capacity_bytes:
                k, v = self._index.popitem(last=False)
                self._used -= v
                evicted.append(k)
        for k in evicted:
            try:
                os.unlink(self._file(k))
            except OSError:
                pass
        return evicted

    def evict(self, key: bytes) -> bool:
        with self._lock:
            v = self._index.pop(key, None)
            if v is None:
                return False
            self._used -= v
        try:
            os.unlink(self._file(key))
        except OSError:
            pass
        return True

    def usage(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._used = 0
        for k in keys:
            try:
                os.unlink(self._file(k))
            except OSError:
                pass


class WaterfallTier(Tier):
    """A cpu tier over a disk tier: hits from the fastest holder, LRU demotion to disk."""

    name = "waterfall"

    def __init__(self, upper: CpuTier, lower: Tier) -> None:
        super().__init__(upper.capacity_bytes + lower.capacity_bytes)
        self.upper = upper
        self.lower = lower

    def where(self, key: bytes) -> str | None:
        """Name of the fastest tier holding ``key`` (index only, no I/O)."""
        if self.upper.contains(key):
            return self.upper.name
        if self.lower.contains(key):
            return self.lower.name
        return None

    def contains(self, key: bytes) -> bool:
        return self.upper.contains(key) or self.lower.contains(key)

    def _to_upper(self, key: bytes, data: bytes) -> list[bytes]:
        """Put in RAM; demote what RAM's LRU pushes out; return keys dropped from both."""
        dropped: list[bytes] = []
        for k, v in self.upper.put_items(key, data):
            if not self.lower.contains(k):
                dropped.extend(self.lower.put(k, v))
        return dropped

    def get(self, key: bytes) -> bytes | None:
        data = self.upper.get(key)
        if data is not None:
            return data
        data = self.lower.get(key)
        if data is not None:  # promote: the chunk is hot again
            with self._lock:
                self._to_upper(key, data)
        return data

    def put(self, key: bytes, data: bytes) -> list[bytes]:
        with self._lock:
            return self._to_upper(key, data)

    def evict(self, key: bytes) -> bool:
        a = self.upper.evict(key)
        b = self.lower.evict(key)
        return a or b

    def usage(self) -> int:
        return self.upper.usage() + self.lower.usage()

    def __len__(self) -> int:
        """Distinct chunks held (a promoted chunk keeps its copy on disk)."""
        lower = getattr(self.lower, "_index", None)
        if lower is None:
            return len(self.upper) + len(self.lower)
        return len(self.upper) + sum(1 for k in list(lower) if not self.upper.contains(k))

    def clear(self) -> None:
        with self._lock:
            self.upper.clear()
            self.lower.clear()


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


REDIS_BATCH = 256
"""Chunks per Redis round trip: a whole 64k-token prompt, ~1 MB at the default payload
scale (bounded, so one command never holds the single-threaded server for long)."""


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``items`` in consecutive slices of at most ``REDIS_BATCH``."""
    for start in range(0, len(items), REDIS_BATCH):
        yield items[start:start + REDIS_BATCH]


class RedisTier(Tier):
    """Chunks as Redis strings (real MGET/MSET/DEL in batches), LRU with a byte limit."""

    name = "redis"

    def __init__(self, url: str, capacity_bytes: int, prefix: str = "kvem@") -> None:
        super().__init__(capacity_bytes)
        self.url = url
        self.prefix = prefix.encode()
        self.client = RespClient(url)
        self.client.call("PING")
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._used = 0
        self._rebuild()

    def _rkey(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode() + b"kv_bytes"

    def _rebuild(self) -> None:
        cursor = b"0"
        pattern = self.prefix.replace(b"*", b"\\*") + b"*kv_bytes"
        found = 0
        while True:
            cursor, names = self.client.call("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            for name in names:
                hexkey = name[len(self.prefix): -len(b"kv_bytes")]
                try:
                    key = bytes.fromhex(hexkey.decode())
                except ValueError:
                    continue
                size = max(0, int(self.client.call("STRLEN", name)) - _HEADER.size)
                self._index[key] = size
                self._used += size
                found += 1
            if cursor in (b"0", 0):
                break
        if found:
            log.info("redis tier %s: %d chunks found", self.url, found)
        self._evict_to(0)

    def contains(self, key: bytes) -> bool:
        return key in self._index

    def get(self, key: bytes) -> bytes | None:
        return next(self.get_many([key]))

    def get_many(self, keys: Sequence[bytes]) -> Iterator[bytes | None]:
        """The chunks of ``keys`` in order, one ``MGET`` round trip per batch; a batch is
        fetched when the reader reaches it.  A failed round trip is a miss (logged), not
        an eviction; a missing or corrupt value is evicted (``_accept``)."""
        for batch in _batches(keys):
            held = [k for k in batch if k in self._index]
            fetched: dict[bytes, bytes | None] = {}
            if held:
                try:
                    fetched = dict(zip(held, self.client.call("MGET", *map(self._rkey, held))))
                except RespError as exc:
                    log.warning("redis MGET failed: %s", exc)
            for k in batch:
                yield self._accept(k, fetched[k]) if k in fetched else None

    def put(self, key: bytes, data: bytes) -> list[bytes]:
        return self.put_many([(key, data)])

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """Store the chunks, one ``MSET`` round trip per batch, then evict to the limit
        (the same survivors as storing them one by one: LRU evicts from the front)."""
        evicted: list[bytes] = []
        for batch in _batches(items):
            fitting = [(k, d) for k, d in batch if len(d) <= self.capacity_bytes]
            if not fitting:
                continue
            self.client.call("MSET", *(part for k, d in fitting for part in (self._rkey(k), _frame(d))))
            with self._lock:
                for k, d in fitting:
                    old = self._index.pop(k, None)
                    if old is not None:
                        self._used -= old
                    self._index[k] = len(d)
                    self._used += len(d)
            evicted.extend(self._evict_to(0))
        return evicted

    def _evict_to(self, extra: int) -> list[bytes]:
        evicted = []
        with self._lock:
            while len(self._index) > 1 and self._used + extra > self.capacity_bytes:
                k, v = self._index.popitem(last=False)
                self._used -= v
                evicted.append(k)
        if evicted:
            try:
                self.client.call("DEL", *[self._rkey(k) for k in evicted])
            except RespError as exc:
                log.warning("redis DEL failed: %s", exc)
        return evicted

    def evict(self, key: bytes) -> bool:
        with self._lock:
            v = self._index.pop(key, None)
            if v is None:
                return False
            self._used -= v
        try:
            self.client.call("DEL", self._rkey(key))
        except RespError:
            pass
        return True

    def usage(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._used = 0
        for batch in _batches(keys):
            try:
                self.client.call("DEL", *map(self._rkey, batch))
            except RespError as exc:
                log.warning("redis DEL failed: %s", exc)


def make_tier(
    backend: str,
    *,
    capacity_bytes: int,
    disk_path: str | None = None,
    use_odirect: bool = False,
    redis_url: str | None = None,
    redis_prefix: str = "kvem@",
    lower_capacity_bytes: int | None = None,
) -> Tier:
    """The tier for ``backend`` (``none``, ``cpu``, ``disk``, ``gds``, ``redis``;
    ``waterfall`` takes ``capacity_bytes`` for RAM and ``lower_capacity_bytes`` for disk)."""
    if backend == "waterfall":
        if not disk_path:
            raise ValueError("backend 'waterfall' needs a disk path")
        return WaterfallTier(CpuTier(capacity_bytes),
                             DiskTier(disk_path, lower_capacity_bytes or capacity_bytes, use_odirect=use_odirect))
    if backend == "redis":
        if not redis_url:
            raise ValueError("backend 'redis' needs a redis URL")
        return RedisTier(redis_url, capacity_bytes, prefix=redis_prefix)
    if backend == "none":
        return NoneTier()
    if backend == "cpu":
        return CpuTier(capacity_bytes)
    if backend in ("disk", "gds"):
        if not disk_path:
            raise ValueError(f"backend {backend!r} needs a disk path")
        return DiskTier(disk_path, capacity_bytes, use_odirect=use_odirect, name=backend)
    raise ValueError(f"unknown backend {backend!r}")


# -------------------------------------------------------------------------------------
# the cache
# -------------------------------------------------------------------------------------
class PrefixCache:
    """Chunked prefix cache over one tier (see the module docstring)."""

    def __init__(
        self,
        tier: Tier,
        *,
        chunk_size: int = 256,
        kv_bytes_per_token: int = 57_344,
        payload_scale: float = 1 / 4096,
        namespace: str = "",
        read_delay_s: float = 0.0,
        corrupt_rate: float = 0.0,
        seed: int = 0,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if payload_scale <= 0:
            raise ValueError("payload_scale must be positive")
        if not 0.0 <= corrupt_rate <= 1.0:
            raise ValueError("corrupt_rate must be in [0, 1]")
        self.tier = tier
        self.chunk_size = int(chunk_size)
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.payload_scale = float(payload_scale)
        self.namespace = f"{namespace}|chunk={chunk_size}".encode()
        self.payload_len = max(16, round(self.chunk_size * self.kv_bytes_per_token * self.payload_scale))
        # extra time each chunk read back takes: a slower host's storage, for tests
        self.read_delay_s = float(read_delay_s)
        # chunks whose seeded draw (64 bits) is below this are stored altered (corrupt_rate)
        self._corrupt_below = round(corrupt_rate * 2**64)
        self._corrupt_tag = f"kvem-corrupt|{seed}|".encode()
        self.corrupted_chunks = 0  # chunks stored altered so far

    @property
    def enabled(self) -> bool:
        return not isinstance(self.tier, NoneTier)

    def keys(self, ids: Sequence[int], salt: str | None = None) -> list[bytes]:
        """The chunk keys of ``ids``; a ``salt`` (vLLM's ``cache_salt``) gives keys no
        unsalted or differently salted request shares."""
        namespace = self.namespace
        if salt is not None:
            namespace += b"|salt=" + salt.encode("utf-8", "surrogatepass")
        return chunk_keys(ids, self.chunk_size, namespace)

    def _fill(self, pattern: bytes) -> bytes:
        return (pattern * (self.payload_len // len(pattern) + 1))[:self.payload_len]

    def payload(self, key: bytes) -> bytes:
        """The deterministic content of the chunk named ``key`` (its true KV)."""
        return self._fill(hashlib.blake2b(key, digest_size=64).digest())

    def corrupts(self, key: bytes) -> bool:
        """Whether ``corrupt_rate`` stores the chunk ``key`` altered (a seeded draw per key)."""
        if not self._corrupt_below:
            return False
        draw = hashlib.blake2b(self._corrupt_tag + key, digest_size=8).digest()
        return int.from_bytes(draw, "little") < self._corrupt_below

    def _altered(self, key: bytes) -> bytes:
        """``payload(key)`` XOR a key-derived mask: what a corrupting offload stores."""
        true = hashlib.blake2b(key, digest_size=64).digest()
        mask = hashlib.blake2b(b"kvem-mask|" + key, digest_size=64).digest()
        return self._fill(bytes(a ^ b for a, b in zip(true, mask)))

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading chunks present in the tier (index only, no I/O)."""
        if not self.enabled:
            return 0
        n = 0
        for k in keys:
            if not self.tier.contains(k):
                break
            n += 1
        return n

    def load(self, keys: Sequence[bytes], buffered: frozenset[bytes] = frozenset()) -> tuple[int, list[bytes]]:
        """Read leading chunks back; return how many were read (it stops at the first
        missing, short or corrupt frame, which is evicted) and, in order, the digests of
        those whose bytes are not their true KV (the caller's answer follows them).

        Keys in ``buffered`` are still being written: they are served from the write
        buffer (the bytes handed to the write) without reading the tier.
        """
        reads = self.tier.get_many([k for k in keys if k not in buffered])
        n = 0
        read = 0
        wrong: list[bytes] = []
        for k in keys:
            if k in buffered:
                if self.corrupts(k):
                    wrong.append(hashlib.blake2b(self._altered(k), digest_size=16).digest())
                n += 1
                continue
            data = next(reads, None)
            read += 1
            if data is None:
                break
            if len(data) != self.payload_len:  # does not fit the KV layout
                self.tier.evict(k)
                break
            if data != self.payload(k):
                wrong.append(hashlib.blake2b(data, digest_size=16).digest())
            n += 1
        if self.read_delay_s and read:
            time.sleep(self.read_delay_s * read)
        return n, wrong

    def store(self, keys: Iterable[bytes]) -> int:
        """Write chunks not yet present (altered where ``corrupts``); return how many."""
        if not self.enabled:
            return 0
        items = []
        altered = 0
        for k in keys:
            if self.tier.contains(k):
                continue
            if self.corrupts(k):
                items.append((k, self._altered(k)))
                altered += 1
            else:
                items.append((k, self.payload(k)))
        self.tier.put_many(items)
        self.corrupted_chunks += altered
        return len(items)

    def usage(self) -> int:
        return self.tier.usage()

    def modeled_usage(self) -> int:
        """Bytes the stored chunks would take for the real model."""
        return round(self.tier.usage() / self.payload_scale)

    def clear(self) -> None:
        self.tier.clear()
