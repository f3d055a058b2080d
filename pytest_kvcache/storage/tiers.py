"""Storage tiers holding real bytes: GPU memory (``hbm``), RAM (``cpu``), a file (``disk``)
and a redis server (``redis``).

Every tier stores fixed-size blocks (one KV block: ``block_tokens`` x bytes per token)
in ``slots`` places; the hierarchy (hierarchy.py) decides which block lives where and
evicts, a tier only moves bytes. Each tier says in ``description`` what it really is:
an ``hbm`` tier without a GPU is RAM and says so, a ``disk`` tier that could not use
O_DIRECT names the reason and uses posix_fadvise(DONTNEED) instead, so that its reads
still come from the disk and not from the page cache (docs/measuring.md).
"""

from __future__ import annotations

import mmap
import os
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._resp import RespClient, RespError

__all__ = [
    "ALIGN", "MEMORY_FILESYSTEMS", "DiskTier", "HbmTier", "RamTier", "RedisTier",
    "SlotTable", "Tier", "TierSpec", "open_tier",
]

#: the alignment O_DIRECT needs of offsets, lengths and buffers (a page covers every disk here)
ALIGN = 4096

TIER_KINDS = ("hbm", "cpu", "disk", "redis")


@dataclass(frozen=True)
class TierSpec:
    """One tier of a hierarchy: its kind and capacity in bytes (``disk``: ``direct``
    asks for O_DIRECT; ``redis``: ``url`` of the server)."""

    kind: str
    capacity_bytes: int
    direct: bool = True
    url: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in TIER_KINDS:
            raise ValueError(f"tier {self.kind!r}: use one of {', '.join(TIER_KINDS)}")
        if self.capacity_bytes <= 0:
            raise ValueError(f"tier {self.kind}: capacity must be positive, got {self.capacity_bytes}")
        if self.kind == "redis" and not self.url:
            raise ValueError("tier redis: needs the server's url (redis://HOST:PORT)")


class Tier(ABC):
    """``slots`` blocks of ``block_bytes`` each, addressed by key."""

    kind: str
    description: str

    def __init__(self, spec: TierSpec, block_bytes: int) -> None:
        self.spec = spec
        self.block_bytes = block_bytes
        self.slots = spec.capacity_bytes // block_bytes

    @abstractmethod
    def write(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def read(self, key: str) -> bytes: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Frees what the tier holds (memory, files, remote keys)."""


class SlotTable:
    """Which slot of a tier's preallocated space holds which key, and the free slots."""

    def __init__(self, slots: int) -> None:
        self._lock = threading.Lock()
        self._slot_of: dict[str, int] = {}
        self._free = list(range(slots - 1, -1, -1))

    def assign(self, key: str) -> int:
        """The key's slot, a free one taken for a new key (IndexError when full)."""
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is None:
                slot = self._slot_of[key] = self._free.pop()
            return slot

    def find(self, key: str) -> int:
        with self._lock:
            return self._slot_of[key]

    def release(self, key: str) -> None:
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                self._free.append(slot)


def _checked(tier: Tier, data: bytes) -> bytes:
    if len(data) != tier.block_bytes:
        raise ValueError(f"tier {tier.kind}: blocks are {tier.block_bytes} bytes, got {len(data)}")
    return data


class RamTier(Tier):
    """Its whole capacity allocated and touched up front (anonymous memory), so a write is
    a copy into resident memory and never measures the allocator."""

    kind = "cpu"

    def __init__(self, spec: TierSpec, block_bytes: int, description: str = "RAM (preallocated)") -> None:
        super().__init__(spec, block_bytes)
        self.description = description
        self._table = SlotTable(self.slots)
        self._memory = mmap.mmap(-1, max(1, self.slots * block_bytes))
        zeros = bytes(min(len(self._memory), 1 << 20))
        for offset in range(0, len(self._memory), len(zeros)):  # fault every page in now
            self._memory[offset:offset + len(zeros)] = zeros[:len(self._memory) - offset]

    def write(self, key: str, data: bytes) -> None:
        data = _checked(self, data)
        offset = self._table.assign(key) * self.block_bytes
        self._memory[offset:offset + self.block_bytes] = data

    def read(self, key: str) -> bytes:
        offset = self._table.find(key) * self.block_bytes
        return self._memory[offset:offset + self.block_bytes]

    def delete(self, key: str) -> None:
        self._table.release(key)

    def close(self) -> None:
        self._memory.close()


class HbmTier(Tier):
    """GPU memory through torch: the capacity allocated on the device up front; each copy
    is synchronized, as the seed's are."""

    kind = "hbm"

    def __init__(self, spec: TierSpec, block_bytes: int, backend: Any, name: str) -> None:
        super().__init__(spec, block_bytes)
        self._torch = backend
        self.description = f"GPU memory ({name}, torch)"
        self._table = SlotTable(self.slots)
        self._memory = backend.zeros(max(1, self.slots * block_bytes), dtype=backend.uint8, device="cuda")

    def write(self, key: str, data: bytes) -> None:
        host = self._torch.frombuffer(bytearray(_checked(self, data)), dtype=self._torch.uint8)
        offset = self._table.assign(key) * self.block_bytes
        self._memory[offset:offset + self.block_bytes].copy_(host)
        self._torch.cuda.synchronize()

    def read(self, key: str) -> bytes:
        offset = self._table.find(key) * self.block_bytes
        data = self._memory[offset:offset + self.block_bytes].cpu().numpy().tobytes()
        self._torch.cuda.synchronize()
        return data

    def delete(self, key: str) -> None:
        self._table.release(key)

    def close(self) -> None:
        self._memory = None
        self._torch.cuda.empty_cache()


def _gpu() -> tuple[Any, str] | str:
    """(torch, device name) when a CUDA device is usable, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return torch, torch.cuda.get_device_name(0)


#: file systems whose files live in memory: a disk tier there measures RAM
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


class DiskTier(Tier):
    """One file of ``slots`` aligned slots on a real file system, opened with O_DIRECT
    where the file system takes it; otherwise buffered, each write flushed and each
    block dropped from the page cache (posix_fadvise DONTNEED) so reads hit the disk."""

    kind = "disk"

    def __init__(self, spec: TierSpec, block_bytes: int, folder: Path) -> None:
        super().__init__(spec, block_bytes)
        self.slot_bytes = -(-block_bytes // ALIGN) * ALIGN
        self.slots = spec.capacity_bytes // self.slot_bytes
        self.path = Path(folder) / f"kv-tier-{uuid.uuid4().hex[:12]}.bin"
        self.fallback_reason: str | None = None
        self._fd = self._open(spec.direct)
        os.ftruncate(self._fd, self.slots * self.slot_bytes)
        self._table = SlotTable(self.slots)
        self._buffers = threading.local()
        mode = "O_DIRECT" if self.direct else f"buffered + fadvise DONTNEED ({self.fallback_reason})"
        from ..doctor import mount_fstype  # the doctor's /proc/mounts reading; imported only for a disk tier

        self.filesystem = mount_fstype(self.path.parent) or "an unknown file system"
        memory = ", memory: no disk below" if self.filesystem in MEMORY_FILESYSTEMS else ""
        self.description = f"file {self.path} on {self.filesystem}{memory} ({mode})"

    @property
    def direct(self) -> bool:
        return self.fallback_reason is None

    def _open(self, want_direct: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        if not want_direct:
            self.fallback_reason = "O_DIRECT off by request"
        elif not hasattr(os, "O_DIRECT"):
            self.fallback_reason = "this platform has no O_DIRECT"
        else:
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
                if self._direct_works(fd):
                    return fd
                os.close(fd)
                self.fallback_reason = f"{self.path.parent}: aligned O_DIRECT writes fail there"
            except OSError as exc:  # tmpfs and some overlay mounts refuse O_DIRECT (EINVAL)
                self.fallback_reason = f"{self.path.parent}: O_DIRECT refused: {exc.strerror}"
        return os.open(self.path, flags, 0o600)

    def _direct_works(self, fd: int) -> bool:
        probe = mmap.mmap(-1, ALIGN)
        try:
            return os.pwrite(fd, probe, 0) == ALIGN
        except OSError:
            return False
        finally:
            probe.close()

    def _buffer(self) -> mmap.mmap:
        """A page-aligned buffer per thread (anonymous mmap memory is page-aligned)."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = mmap.mmap(-1, self.slot_bytes)
        return buf

    def write(self, key: str, data: bytes) -> None:
        data = _checked(self, data)
        offset = self._table.assign(key) * self.slot_bytes
        buf = self._buffer()
        buf[:self.block_bytes] = data
        os.pwrite(self._fd, buf, offset)
        if not self.direct:
            os.fdatasync(self._fd)  # DONTNEED leaves dirty pages in the cache
            os.posix_fadvise(self._fd, offset, self.slot_bytes, os.POSIX_FADV_DONTNEED)

    def read(self, key: str) -> bytes:
        offset = self._table.find(key) * self.slot_bytes
        buf = self._buffer()
        if os.preadv(self._fd, [buf], offset) != self.slot_bytes:
            raise OSError(f"{self.path}: short read at offset {offset}")
        if not self.direct:
            os.posix_fadvise(self._fd, offset, self.slot_bytes, os.POSIX_FADV_DONTNEED)
        return bytes(buf[:self.block_bytes])

    def delete(self, key: str) -> None:
        self._table.release(key)

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class RedisTier(Tier):
    """A remote tier: blocks as redis strings under a prefix of this tier's own, one
    connection per thread."""

    kind = "redis"

    def __init__(self, spec: TierSpec, block_bytes: int) -> None:
        super().__init__(spec, block_bytes)
        self.url = str(spec.url)
        self._prefix = f"kvstorage:{uuid.uuid4().hex[:12]}:"
        self._client = RespClient(self.url)  # one connection per thread
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()
        try:
            self._client.call(b"PING")
        except RespError as exc:  # no server: its OSError, which the storage item reports as it is
            raise (exc.__cause__ if isinstance(exc.__cause__, OSError) else exc) from None
        self.description = f"redis server {self.url}"

    def _key(self, key: str) -> bytes:
        return (self._prefix + key).encode()

    def write(self, key: str, data: bytes) -> None:
        name = self._key(key)
        self._client.call(b"SET", name, _checked(self, data))
        with self._lock:
            self._keys.add(name)

    def read(self, key: str) -> bytes:
        data = self._client.call(b"GET", self._key(key))
        if not isinstance(data, bytes):
            raise KeyError(f"{key}: not in redis at {self.url}")
        return data

    def delete(self, key: str) -> None:
        name = self._key(key)
        self._client.call(b"DEL", name)
        with self._lock:
            self._keys.discard(name)

    def close(self) -> None:
        """Deletes this tier's keys from the server and closes every connection."""
        with self._lock:
            names, self._keys = sorted(self._keys), set()
        for start in range(0, len(names), 512):
            self._client.call(b"DEL", *names[start:start + 512])
        self._client.close()


def open_tier(spec: TierSpec, block_bytes: int, folder: Path) -> Tier:
    """The tier a spec names; ``folder`` holds a disk tier's file."""
    if spec.kind == "disk":
        return DiskTier(spec, block_bytes, folder)
    if spec.kind == "redis":
        return RedisTier(spec, block_bytes)
    if spec.kind == "cpu":
        return RamTier(spec, block_bytes)
    gpu = _gpu()
    if isinstance(gpu, str):
        ram = RamTier(spec, block_bytes, description=f"RAM standing in for GPU memory ({gpu})")
        ram.kind = "hbm"
        return ram
    return HbmTier(spec, block_bytes, *gpu)
