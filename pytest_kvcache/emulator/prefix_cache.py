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

The tiers are in :mod:`.tiers`.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Iterable, Sequence

from .tiers import NoneTier, Tier

__all__ = ["PrefixCache", "chunk_keys"]


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
