"""The emulator's real tier I/O: lookups, reads on the event loop, writes in the background.

A request's hit chunks are read back on the event loop (file tiers in short turns), new
chunks are written by one writer thread (file and redis tiers; memory tiers inline), and a
chunk still being written is served from the write buffer, as LMCache stages offloads in
CPU memory.  The host's read time is reported beside the modeled time, never added to it
while it fits (see the docstring of :mod:`.app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .metrics import Stats
from .prefix_cache import PrefixCache
from .request import Loaded, Request

__all__ = ["READ_GROUP", "READ_TURN_S", "Offload"]

log = logging.getLogger("pytest_kvcache.emulator")
lmlog = logging.getLogger("pytest_kvcache.emulator.lmcache")

perf = time.perf_counter

#: a file tier's read of a request's chunks yields to the event loop after this much
#: reading (seconds) ...
READ_TURN_S = 0.002
#: ... checked after each group of this many chunks (~0.1 ms of reading on a 2-core VM)
READ_GROUP = 8


class Offload:
    """The offload tier as one emulated server uses it (LMCache's role)."""

    def __init__(self, cache: PrefixCache, backend: str, disabled: bool, stats: Stats) -> None:
        self.cache = cache
        self.tier_name = backend
        # Tier reads run on the event loop (file tiers in turns, see load; a redis read
        # is one MGET round trip, as LMCache's retrieve holds up the engine step).  File
        # and redis tiers write in one writer thread, in the background.
        self.file_tier = backend in ("disk", "gds", "waterfall")
        self.threaded_writes = self.file_tier or backend == "redis"
        self.disabled = disabled
        self.stats = stats
        self._pending: dict[bytes, asyncio.Future] = {}
        self._bg: set[asyncio.Task] = set()
        self._writer: ThreadPoolExecutor | None = None  # the offload writes' thread, made on first use

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a tier write (or clear): in the writer thread where the tier writes files or
        talks to redis (one thread, as LMCache offloads in the background), inline for
        memory tiers.  The thread takes the interpreter lock when the event loop lets go
        of it (``__main__`` sets a long switch interval), so writes fill the loop's idle
        time and never hold a response up."""
        if not self.threaded_writes:
            return fn(*args)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="kv-write")
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def hit_chunks(self, req: Request) -> int:
        """Leading chunks of ``req`` the tier's index holds (or that are still being
        written): the lookup, no I/O."""
        if not self.cache.enabled or not req.keys or self.disabled:
            return 0
        tier = self.cache.tier
        pending = self._pending
        hit = 0
        for k in req.keys:
            if not (tier.contains(k) or k in pending):
                break
            hit += 1
        return hit

    def _split(self, req: Request, keys: list[bytes], buffered: frozenset[bytes]) -> None:
        """A waterfall's hit tokens per tier serving them, looked up before the load (which promotes)."""
        where = getattr(self.cache.tier, "where", None)
        if where is None:
            return
        split: dict[str, int] = {}
        for k in keys:
            place = "cpu" if k in buffered else where(k)
            split[place] = split.get(place, 0) + self.cache.chunk_size
        req.split = split

    async def load(self, req: Request, hit: int) -> Loaded:
        """Read back the ``hit`` leading chunks of ``req`` (the lookup found them); stop at
        the first whose frame fails (missing, short, CRC).  The bytes are not compared
        with the true KV (an engine cannot): the digests of those that differ go into
        the answer (:func:`.answer.answer_rng`).

        A chunk whose offload write is still in flight is served from the write buffer
        (LMCache stages offloads in CPU memory), so no lookup waits for a write and a
        warm round right after a cold one hits fully; only chunks already in the tier
        are read back (for real).

        Reads run on the event loop, not in a thread: a chunk file costs three system
        calls, and a reader thread must win the interpreter lock back after each while
        the loop parses request bodies; with the loop that busy, a 10k-token read took
        ~5 ms in a thread against ~0.7 ms here.  A file tier's read yields to the loop
        after each ``READ_TURN_S`` of reading (a 100k-token one, ~5 ms, in a few turns),
        so it holds the loop no longer than parsing a request body does.  This assumes
        the files are in the page cache (this server wrote them); a read that goes to
        the device (``use_odirect``, a cold cache after a restart) holds the loop that
        long, and shows as overruns.
        """
        started = perf()
        keys = req.keys[:hit]
        buffered = frozenset(k for k in keys if k in self._pending)
        self._split(req, keys, buffered)
        if not hit:
            return Loaded(0, [], started, perf())
        if not self.file_tier:
            done, wrong = self.cache.load(keys, buffered)
            return Loaded(done, wrong, started, perf())
        return await self._load_in_turns(keys, buffered, started)

    async def _load_in_turns(self, keys: list[bytes], buffered: frozenset[bytes], started: float) -> Loaded:
        """A file tier's read, yielding to the event loop after each ``READ_TURN_S`` of it."""
        load = self.cache.load
        done = 0
        wrong: list[bytes] = []
        turn = started
        for i in range(0, len(keys), READ_GROUP):
            if perf() - turn > READ_TURN_S:
                await asyncio.sleep(0)
                turn = perf()
            part = keys[i:i + READ_GROUP]
            ok, bad = load(part, buffered)
            done += ok
            wrong += bad
            if ok < len(part):
                break
        return Loaded(done, wrong, started, perf())

    def settle(self, req: Request, hit: int, loaded: Loaded, deadline: float) -> float:
        """Record the host's read time of ``req`` beside the model and the KV its answer
        follows; return when its first token may leave: ``deadline``, or the end of the
        read if that came later (an overrun, counted: the time past ``deadline`` that the
        read itself took)."""
        if loaded.chunks < hit:
            log.warning("request %s: %d of %d hit chunks failed verification (frame missing, short or CRC "
                        "mismatch); recomputing", req.rid, hit - loaded.chunks, hit)
        if hit == 0:
            return deadline
        req.wrong = loaded.wrong
        if loaded.wrong:
            log.debug("request %s: %d loaded chunks are not their true KV; the answer follows them",
                      req.rid, len(loaded.wrong))
        st = self.stats
        io = loaded.done - loaded.started
        st.io_seconds += io
        req.io_ms = io * 1000.0
        if loaded.done <= deadline:
            return deadline
        over = loaded.done - max(deadline, loaded.started)
        st.io_overrun_seconds += over
        st.io_overruns += 1
        req.io_overrun_ms = over * 1000.0
        log.debug("request %s: tier read overran the modeled deadline by %.3f ms", req.rid, over * 1000.0)
        return loaded.done

    def store_background(self, req: Request, from_chunk: int) -> int:
        """Start writing the chunks from ``from_chunk`` on; return tokens to be stored."""
        if not self.cache.enabled or self.disabled:
            return 0
        tier = self.cache.tier
        keys = [k for k in req.keys[from_chunk:] if not tier.contains(k) and k not in self._pending]
        if not keys:
            return 0
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        for k in keys:
            self._pending[k] = fut
        stored_tokens = len(keys) * self.cache.chunk_size
        task = loop.create_task(self._store(keys, fut, stored_tokens, req.n))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return stored_tokens

    async def _store(self, keys: list[bytes], fut: asyncio.Future, stored_tokens: int, n: int) -> None:
        try:
            await self.write(self.cache.store, keys)
        except Exception as exc:  # a failed offload write is logged, not fatal  # noqa: BLE001 - never let it kill the server
            log.warning("offload write failed: %s", exc)
        finally:
            for k in keys:
                self._pending.pop(k, None)
            if not fut.done():
                fut.set_result(None)
        self.stats.lm_stored += stored_tokens
        lmlog.info("Stored %d out of total %d tokens", stored_tokens, n)

    async def reset(self) -> None:
        """Empty the tier once the writes in flight are done (``POST /reset_prefix_cache``)."""
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=30)
        await self.write(self.cache.clear)

    async def close(self) -> None:
        """Let the writes in flight end (5 s at most), then stop the writer thread."""
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=5)
        if self._writer is not None:
            self._writer.shutdown(wait=False, cancel_futures=True)
