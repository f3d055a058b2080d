"""Storage tiers holding real bytes: GPU memory (``hbm``), RAM (``cpu``), a file (``disk``),
a file on a GPUDirect Storage mount read and written from GPU memory (``gds``) and a redis
server (``redis``).

Every tier stores fixed-size blocks (one KV block: ``block_tokens`` x bytes per token)
in ``slots`` places; the hierarchy (hierarchy.py) decides which block lives where and
evicts, a tier only moves bytes. Each tier says in ``description`` what it really is:
an ``hbm`` tier without a GPU is RAM and says so, a ``disk`` tier that could not use
O_DIRECT names the reason and uses posix_fadvise(DONTNEED) instead, so that its reads
still come from the disk and not from the page cache (docs/measuring.md), a ``gds`` tier
whose I/O kvikio does through host memory (its compat mode) says so. A ``gds`` tier that
cannot run here (no mount given, no GPU, no kvikio) raises :class:`TierUnavailable`.
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
from ..errors import KVCacheError

__all__ = [
    "ALIGN", "MEMORY_FILESYSTEMS", "DiskTier", "GdsTier", "HbmTier", "RamTier", "RedisTier",
    "SlotTable", "Tier", "TierSpec", "TierUnavailable", "open_tier",
]

#: the alignment O_DIRECT needs of offsets, lengths and buffers (a page covers every disk here)
ALIGN = 4096

TIER_KINDS = ("hbm", "cpu", "disk", "gds", "redis")


class TierUnavailable(KVCacheError, OSError):
    """A tier that cannot open on this machine; the message names what is missing and the
    fix. An OSError, so that code handling a tier that cannot open handles this one too."""


@dataclass(frozen=True)
class TierSpec:
    """One tier of a hierarchy: its kind and capacity in bytes (``disk``: ``direct``
    asks for O_DIRECT; ``redis``: ``url`` of the server; ``gds``: its folder is the
    config's ``gds_path``, given to :func:`open_tier`)."""

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
    #: its reads and writes are CPU work (copies in RAM): timed by the thread's CPU time
    #: (storage.hierarchy), not the wall clock
    cpu_bound: bool = False

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
    cpu_bound = True

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


#: the fix for a gds tier without its folder
GDS_PATH_FIX = "set --kv-gds-path DIR or gds_path: DIR in the scenario file"
#: kvikio's compat mode in a gds tier's description, as ``hbm`` says RAM without a GPU
GDS_COMPAT = "kvikio compat mode: POSIX through host memory, not GPUDirect"


def _cuda_device_seen() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except (ImportError, RuntimeError):  # no cupy, or no CUDA driver (CUDARuntimeError)
        return not isinstance(_gpu(), str)


def _gds_missing(folder: Path | None) -> list[str]:
    """What a gds tier lacks here, each with its fix; empty where it can open."""
    missing = []
    if folder is None:
        missing.append(f"no folder on a GDS mount given ({GDS_PATH_FIX})")
    elif not folder.is_dir():
        missing.append(f"the GDS folder {folder} does not exist or is not a folder (create it on the GDS mount, "
                       f"or {GDS_PATH_FIX})")
    if not _cuda_device_seen():
        missing.append("no GPU: neither cupy nor torch sees a CUDA device")
    try:
        import kvikio.defaults  # a submodule ``import kvikio`` leaves out
    except ImportError:
        missing.append("kvikio is not installed (pip install kvikio-cu12)")
    else:
        if not hasattr(kvikio.defaults, "is_compat_mode_preferred"):  # and defaults.set: kvikio 25.04
            missing.append(f"kvikio {kvikio.__version__} is older than 25.04 (pip install -U kvikio-cu12)")
    return missing


def _open_cufile(kvikio: Any, path: Path) -> tuple[Any, str | None]:
    """``path`` opened through kvikio, and why its I/O is POSIX through host memory where
    it is (kvikio's compat mode; None: cuFile moves the bytes)."""
    if kvikio.defaults.is_compat_mode_preferred():
        return kvikio.CuFile(path, "r+"), "KVIKIO_COMPAT_MODE=ON, or no usable libcufile under AUTO"
    try:
        # under AUTO kvikio would fall back to POSIX for this one file without a word
        with kvikio.defaults.set("compat_mode", kvikio.CompatMode.OFF):
            return kvikio.CuFile(path, "r+"), None
    except (RuntimeError, OSError) as exc:  # cuFile refused it: no O_DIRECT there, not a GDS file system
        with kvikio.defaults.set("compat_mode", kvikio.CompatMode.ON):
            return kvikio.CuFile(path, "r+"), f"cuFile refused the file: {exc}"


class GdsTier(Tier):
    """One file of ``slots`` aligned slots in a folder on a GDS mount, read and written by
    cuFile (kvikio) between the file and GPU memory: a block is copied into a GPU buffer
    (cupy, one per thread) and written from it, read into it and copied out, as the hbm
    tier copies its blocks; the file I/O itself never passes through host memory, except
    in kvikio's compat mode, which the description names."""

    kind = "gds"

    def __init__(self, spec: TierSpec, block_bytes: int, folder: Path) -> None:
        import cupy
        import kvikio.defaults
        import numpy

        super().__init__(spec, block_bytes)
        self._cupy, self._numpy = cupy, numpy
        self.slot_bytes = -(-block_bytes // ALIGN) * ALIGN  # cuFile moves whole pages straight to the GPU
        self.slots = spec.capacity_bytes // self.slot_bytes
        self.path = folder / f"kv-tier-{uuid.uuid4().hex[:12]}.bin"
        self.path.write_bytes(b"")
        os.truncate(self.path, self.slots * self.slot_bytes)
        try:
            self._file, compat = _open_cufile(kvikio, self.path)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self._table = SlotTable(self.slots)
        self._buffers = threading.local()
        from ..doctor import mount_fstype

        filesystem = mount_fstype(folder) or "an unknown file system"
        mode = f"{GDS_COMPAT}: {compat}" if compat else "GPUDirect Storage through kvikio's cuFile"
        self.description = f"file {self.path} on {filesystem} ({mode})"

    def _buffer(self) -> Any:
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = self._cupy.empty(self.slot_bytes, dtype=self._cupy.uint8)
        return buf

    def write(self, key: str, data: bytes) -> None:
        data = _checked(self, data)
        offset = self._table.assign(key) * self.slot_bytes
        buf = self._buffer()
        buf[:self.block_bytes].set(self._numpy.frombuffer(data, dtype=self._numpy.uint8))
        self._cupy.cuda.get_current_stream().synchronize()  # the copy has landed before cuFile reads the buffer
        self._file.raw_write(buf, self.slot_bytes, offset)

    def read(self, key: str) -> bytes:
        offset = self._table.find(key) * self.slot_bytes
        buf = self._buffer()
        if self._file.raw_read(buf, self.slot_bytes, offset) != self.slot_bytes:
            raise OSError(f"{self.path}: short read at offset {offset}")
        return buf[:self.block_bytes].get().tobytes()

    def delete(self, key: str) -> None:
        self._table.release(key)

    def close(self) -> None:
        self._file.close()
        self._buffers = threading.local()  # the GPU buffers go with it
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


def open_tier(spec: TierSpec, block_bytes: int, folder: Path, gds_path: str | Path | None = None) -> Tier:
    """The tier a spec names; ``folder`` holds a disk tier's file, ``gds_path`` (a folder
    on a GDS mount) a gds tier's. A gds tier that cannot run here raises TierUnavailable."""
    if spec.kind == "disk":
        return DiskTier(spec, block_bytes, folder)
    if spec.kind == "gds":
        gds_folder = Path(gds_path).expanduser() if gds_path else None
        missing = _gds_missing(gds_folder)
        if missing or gds_folder is None:
            raise TierUnavailable(f"tier gds cannot open: {'; '.join(missing)}")
        return GdsTier(spec, block_bytes, gds_folder)
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
