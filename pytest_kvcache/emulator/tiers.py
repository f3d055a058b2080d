"""The storage tiers of the prefix cache: LRU with a byte limit, real I/O.

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
          through a small built-in RESP client (:mod:`pytest_kvcache._resp`, no extra package), one connection per
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

import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TypeVar

from .._resp import RespClient, RespError

__all__ = ["CpuTier", "DiskTier", "NoneTier", "REDIS_BATCH", "RedisTier", "Tier", "WaterfallTier", "make_tier",
           "frame", "unframe"]

log = logging.getLogger("pytest_kvcache.emulator")

_T = TypeVar("_T")
_MAGIC = b"KVEM"
_HEADER = struct.Struct("<4sIII")  # magic, payload length, crc32, reserved


def frame(data: bytes) -> bytes:
    """A stored chunk: header (magic, length, CRC32) + payload."""
    return _HEADER.pack(_MAGIC, len(data), zlib.crc32(data), 0) + data


def unframe(raw: bytes | None) -> bytes | None:
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


class Tier:
    """Interface of a storage tier (LRU with a byte limit)."""

    name = "base"

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._lock = threading.Lock()
        self._used = 0  # payload bytes held (a tier that holds none keeps it 0)

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

    def usage(self) -> int:
        """Payload bytes held."""
        return self._used

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def clear(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


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

    def __len__(self) -> int:
        return 0

    def clear(self) -> None:
        pass


class CpuTier(Tier):
    name = "cpu"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._data: OrderedDict[bytes, bytes] = OrderedDict()

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

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._used = 0


class _IndexedTier(Tier):
    """A tier that keeps its chunks outside the process (files, a Redis server) and an
    index of them in LRU order (key -> payload bytes); a subclass says how chunks are
    dropped from its storage (:meth:`_drop`)."""

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._index: OrderedDict[bytes, int] = OrderedDict()

    def _drop(self, keys: list[bytes], quiet: bool = False) -> None:  # pragma: no cover - interface
        """Delete the chunks ``keys`` from storage (already out of the index); ``quiet``:
        a failure is not worth a log line."""
        raise NotImplementedError

    def _record(self, key: bytes, size: int) -> None:
        """Index a chunk just stored (the caller holds the lock)."""
        old = self._index.pop(key, None)
        if old is not None:
            self._used -= old
        self._index[key] = size
        self._used += size

    def _accept(self, key: bytes, raw: bytes | None) -> bytes | None:
        """The payload of a chunk read back from storage, marked recently used; a corrupt
        or truncated one is evicted and is a miss, never a silent hit."""
        payload = unframe(raw)
        if payload is None:
            self.evict(key)
            return None
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return payload

    def _evict_to(self, extra: int) -> list[bytes]:
        evicted = []
        with self._lock:
            while len(self._index) > 1 and self._used + extra > self.capacity_bytes:
                k, v = self._index.popitem(last=False)
                self._used -= v
                evicted.append(k)
        if evicted:
            self._drop(evicted)
        return evicted

    def contains(self, key: bytes) -> bool:
        return key in self._index

    def evict(self, key: bytes) -> bool:
        with self._lock:
            v = self._index.pop(key, None)
            if v is None:
                return False
            self._used -= v
        self._drop([key], quiet=True)
        return True

    def __len__(self) -> int:
        return len(self._index)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._index)
            self._index.clear()
            self._used = 0
        self._drop(keys)


class DiskTier(_IndexedTier):
    name = "disk"

    def __init__(self, path: str, capacity_bytes: int, use_odirect: bool = False, name: str = "disk") -> None:
        super().__init__(capacity_bytes)
        self.name = name
        self.path = os.path.abspath(path)
        self._prefix = os.path.join(self.path, "")
        os.makedirs(self.path, exist_ok=True)
        self.use_odirect = bool(use_odirect) and hasattr(os, "O_DIRECT")
        self.odirect_active = self.use_odirect
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
                payload = unframe(self._read_file(self._file(key), _HEADER.size + size))
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
        blob = frame(data)
        self._write_file(self._file(key), blob)
        with self._lock:
            self._record(key, size)
        return self._evict_to(0)

    def _drop(self, keys: list[bytes], quiet: bool = False) -> None:
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



REDIS_BATCH = 256
"""Chunks per Redis round trip: a whole 64k-token prompt, ~1 MB at the default payload
scale (bounded, so one command never holds the single-threaded server for long)."""


def _batches(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``items`` in consecutive slices of at most ``REDIS_BATCH``."""
    for start in range(0, len(items), REDIS_BATCH):
        yield items[start:start + REDIS_BATCH]


class RedisTier(_IndexedTier):
    """Chunks as Redis strings (real MGET/MSET/DEL in batches), LRU with a byte limit."""

    name = "redis"

    def __init__(self, url: str, capacity_bytes: int, prefix: str = "kvem@") -> None:
        super().__init__(capacity_bytes)
        self.url = url
        self.prefix = prefix.encode()
        self.client = RespClient(url)
        self.client.call("PING")
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
            self.client.call("MSET", *(part for k, d in fitting for part in (self._rkey(k), frame(d))))
            with self._lock:
                for k, d in fitting:
                    self._record(k, len(d))
            evicted.extend(self._evict_to(0))
        return evicted

    def _drop(self, keys: list[bytes], quiet: bool = False) -> None:
        for batch in _batches(keys):
            try:
                self.client.call("DEL", *map(self._rkey, batch))
            except RespError as exc:
                if not quiet:
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
