"""When a request's first token and each next one are due: the emulator's schedulers.

All run on a virtual clock (see the docstring of :mod:`.app`): ``fixed`` serves every
request on its own, ``fifo`` prefills one request at a time, ``batched`` runs vLLM-like
engine steps of continuous batching with chunked prefill.  :func:`make_scheduler` picks
one from the profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

from .costmodel import Profile, attended_pairs
from .metrics import Stats
from .offload import Offload
from .request import Request
from .settings import Settings

__all__ = ["EngineLoad", "Scheduler", "make_scheduler", "sleep_until"]

log = logging.getLogger("pytest_kvcache.emulator")

perf = time.perf_counter

#: what a scheduler answers for a request: (queue_ms, cached tokens, deadline of the first token)
FirstToken = tuple[float, int, float]


async def sleep_until(deadline: float, spin: float) -> None:
    """Sleep until ``perf_counter() >= deadline``: coarse sleep, then yield-spin."""
    while True:
        rem = deadline - perf()
        if rem <= 0:
            return
        if rem > spin:
            await asyncio.sleep(rem - spin)
        else:
            await asyncio.sleep(0)


@dataclass
class EngineLoad:
    """The requests the modeled engine holds (``/metrics`` gauges and the cost model's input)."""

    waiting: int = 0
    running: int = 0  # past the queue, not finished
    decoding: int = 0  # past the first token, not finished
    context_tokens: int = 0  # tokens of running requests (GPU KV usage)


class Scheduler:
    """What every scheduler shares: the request's modeled times, jitter, and its slot."""

    def __init__(self, settings: Settings, offload: Offload, stats: Stats) -> None:
        self.s = settings
        self.profile: Profile = settings.profile
        self.offload = offload
        self.stats = stats
        self.chunk_size = offload.cache.chunk_size
        self.tier_name = settings.backend
        self.load = EngineLoad()
        self.slow = settings.slowdown
        self.slow_prefill = settings.slowdown_prefill
        self.slow_decode = settings.slowdown_decode
        self.slow_load = settings.slowdown_load
        self.jitter_width = settings.jitter
        self.spin = settings.spin_ms / 1000.0
        self.step_prefill_s = 0.0  # batched scheduler: prefill time of the current step
        self.slot_freed = asyncio.Event()  # batched scheduler: a running request finished
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker

    async def _run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # -- a request's way through ------------------------------------------------------
    async def first_token(self, req: Request) -> FirstToken:
        """Return (queue_ms, cached, deadline of the first token).

        In the modeled profiles this waits for the scheduler, which answers once the
        request's tier read is settled (FIFO: the deadline is usually still ahead) or
        its last prefill step has ended (batched); in the fixed profile it returns at
        once.  The caller sleeps to the deadline after preparing the first chunk, so the
        write leaves on time.
        """
        assert self._queue is not None
        fut = asyncio.get_running_loop().create_future()
        self.load.waiting += 1
        self._queue.put_nowait((req, fut))
        queue_ms, cached, deadline = await fut
        return queue_ms, cached, deadline

    def token_deadline(self, req: Request, k: int, first: float, previous: float) -> float:
        """When token ``k`` (> 0) of ``req`` is due, the first one due at ``first`` and the one
        before at ``previous``."""
        return previous + self.itl_s(req)

    def admit(self, req: Request) -> None:
        """``req`` leaves the queue and runs."""
        self.load.running += 1
        self.load.context_tokens += req.n

    def release(self, req: Request) -> None:
        """A running request ends (or will not reach its first token): it frees its slot."""
        self.load.running -= 1
        self.load.context_tokens -= req.n
        self.slot_freed.set()

    def _failed(self, req: Request, fut: asyncio.Future, step: str, exc: Exception) -> None:
        """A worker's ``step`` of ``req`` raised ``exc``: its handler gets it, its slot is freed."""
        log.exception("%s failed for %s", step, req.rid)
        self.release(req)
        if not fut.done():
            fut.set_exception(exc)

    def after_response(self, req: Request) -> None:
        """``req``'s response has ended (or broken off)."""

    def account(self, req: Request, cached: int) -> None:
        self.stats.account_prefill(req, cached, self.offload.cache.enabled, self.tier_name)

    # -- modeled times ----------------------------------------------------------------
    def jitter(self, req: Request) -> float:
        """A seeded factor in [1 - jitter, 1 + jitter] (exactly 1.0 without jitter)."""
        if not self.jitter_width:
            return 1.0
        if req.rng is None:
            req.rng = random.Random((self.s.seed * 1_000_003 + req.seq) ^ 0x71773E)
        return 1.0 + self.jitter_width * (2.0 * req.rng.random() - 1.0)

    def load_ms(self, req: Request, cached: int) -> float:
        if req.split is not None and cached:
            return self.profile.load_split_ms(req.split)
        return self.profile.load_ms(self.tier_name, cached)

    def itl_s(self, req: Request | None = None) -> float:
        itl = self.slow * self.profile.itl_ms(self.load.decoding) / 1000.0
        if self.step_prefill_s:
            # batched scheduler: a decode step shares the GPU with the prefill chunks of
            # the step in progress (chunked prefill), so it lasts that much longer
            itl += self.step_prefill_s
        if self.slow_decode != 1.0:
            itl *= self.slow_decode
        if self.jitter_width and req is not None:
            itl *= self.jitter(req)
        return itl


class FixedScheduler(Scheduler):
    """The ``fixed`` profile: every request is independent; its hit chunks are read back
    within its fixed TTFT, and its new chunks are written after its response."""

    def start(self) -> None:
        pass

    async def first_token(self, req: Request) -> FirstToken:
        offload = self.offload
        hit = offload.hit_chunks(req)
        loaded = await offload.load(req, hit)
        cached = loaded.chunks * self.chunk_size
        self.account(req, cached)
        self.admit(req)
        ttft_ms = self.slow * self.profile.fixed_ttft_ms
        if self.slow_prefill != 1.0:
            ttft_ms *= self.slow_prefill
        req.modeled_ms = ttft_ms
        return 0.0, cached, offload.settle(req, hit, loaded, req.arrival + ttft_ms / 1000.0)

    def token_deadline(self, req: Request, k: int, first: float, previous: float) -> float:
        itl = self.slow * self.profile.fixed_itl_ms / 1000.0
        if self.slow_decode != 1.0:
            itl *= self.slow_decode
        return first + k * itl

    def after_response(self, req: Request) -> None:
        self.offload.store_background(req, 0)  # no timing effect


class FifoScheduler(Scheduler):
    """One prefill worker takes requests FIFO (so TTFT grows with concurrency) on a
    virtual clock (see the docstring of :mod:`.app`)."""

    async def _run(self) -> None:
        assert self._queue is not None
        free_at = 0.0  # when the modeled GPU finishes the previous prefill
        while True:
            req, fut = await self._queue.get()
            start = max(req.arrival, free_at)
            # A plain sleep: waking up to a millisecond late only delays the start of the
            # real read inside its window (the model counts from ``start``), while the
            # previous request's first token is due at this very instant and needs the loop.
            if start > perf():
                await asyncio.sleep(start - perf())
            self.load.waiting -= 1
            if fut.done():  # the client went away while waiting
                continue
            self.admit(req)
            try:
                cached, deadline, first = await self._prefill(req, start)
            except asyncio.CancelledError:
                if not fut.done():
                    fut.cancel()
                raise
            except Exception as exc:  # never kill the worker
                self._failed(req, fut, "prefill", exc)
                continue
            free_at = deadline
            if fut.done():  # cancelled during the read: give its slot back
                self.release(req)
            else:
                fut.set_result(((start - req.arrival) * 1000.0, cached, first))

    async def _prefill(self, req: Request, start: float) -> tuple[int, float, float]:
        """Look ``req`` up, read its hit back and start storing the rest; return the tokens
        cached, when the modeled prefill ends and when its first token may leave."""
        cs = self.chunk_size
        offload = self.offload
        hit = offload.hit_chunks(req)
        loaded = await offload.load(req, hit)
        stored = offload.store_background(req, loaded.chunks)
        cached = loaded.chunks * cs
        req.modeled_ms = self._modeled_prefill_ms(req, hit * cs, cached, stored)
        deadline = start + req.modeled_ms / 1000.0
        first = offload.settle(req, hit, loaded, deadline)
        self.account(req, cached)
        return cached, deadline, first

    def _modeled_prefill_ms(self, req: Request, hit: int, cached: int, stored: int) -> float:
        """Scaled modeled time of ``req`` (ms): the load of the ``hit`` tokens the lookup
        found, the prefill of all but the ``cached`` ones read back (so a chunk that failed
        is recomputed), and the store of ``stored`` tokens."""
        prof = self.profile
        return self.slow * self.jitter(req) * (
            self.slow_prefill * prof.prefill_ms(req.n - cached, req.n)
            + self.slow_load * (self.load_ms(req, hit) + prof.store_ms(self.tier_name, stored)))


class _Prefill:
    """A sequence admitted by the batched scheduler, until its first token."""

    __slots__ = ("cached", "extra_ms", "fut", "hit", "j", "load", "remaining", "req", "start")

    def __init__(self, req: Request, fut: asyncio.Future, hit: int, load: asyncio.Future,
                 start: float, extra_ms: float, j: float, chunk_size: int) -> None:
        self.req = req
        self.fut = fut
        self.hit = hit  # chunks the lookup found (their load is charged)
        self.load = load  # the real read of those chunks (a future of Loaded)
        self.cached = hit * chunk_size  # tokens not to compute (fewer if a chunk fails)
        self.remaining = max(1, req.n - self.cached)  # tokens still to prefill
        self.start = start  # virtual time of admission
        self.extra_ms = extra_ms  # load/store time joining the next step
        self.j = j  # jitter factor


@dataclass
class _Step:
    """One engine step's plan: its modeled compute and the sequences it prefills."""

    compute_ms: float
    other_ms: float
    scheduled: list[Request]
    finished: list[_Prefill]


class BatchedScheduler(Scheduler):
    """vLLM-like continuous batching (profiles with ``scheduler: "batched"``).

    Each step serves every decoding sequence one token (their intervals are modeled
    per request by :meth:`itl_s`; here they only take budget and step time) and
    fills the rest of ``max_num_batched_tokens`` with prefill chunks of admitted
    sequences in arrival order (chunked prefill); while a step computes prefill
    chunks, each decode interval grows by that compute time (decode and prefill share
    the GPU), so cold prefills slow the streams around them.  A sequence is admitted
    from the waiting queue while fewer than ``max_num_seqs`` run; on admission its
    cached prefix is looked up, its real read starts (a task, see :meth:`.Offload.load`)
    and its load/store time joins its first step.  A sequence's first token leaves when
    the step that ends its prefill ends; its read must have ended by then (else the
    token waits for it: an overrun), and chunks that failed verification are
    prefilled in the next steps before it does.

    Steps run on a virtual clock: each starts when the previous one ends (or, after
    the engine was idle, when the request that woke it arrived), and lasts its
    modeled time, so the loop's delays do not accumulate over steps.
    """

    async def _run(self) -> None:
        assert self._queue is not None
        q = self._queue
        waiting: list = []
        prefilling: list[_Prefill] = []
        clock = 0.0  # virtual time: the end of the last step
        while True:
            if not waiting and not prefilling:
                waiting.append(await q.get())
            while not q.empty():
                waiting.append(q.get_nowait())
            clock = self._admit(waiting, prefilling, clock)
            if not prefilling:
                # every slot decodes: wait until a request finishes (no busy loop)
                self.slot_freed.clear()
                await self.slot_freed.wait()
                clock = max(clock, perf())
                continue
            try:
                clock = await self._step(prefilling, clock)
            except asyncio.CancelledError:
                for e in prefilling:
                    if not e.fut.done():
                        e.fut.cancel()
                raise

    def _admit(self, waiting: list, prefilling: list[_Prefill], clock: float) -> float:
        """Admit waiting sequences while slots are free: look each up, start its read and
        the store of the rest; return the virtual clock (never before their arrival)."""
        prof = self.profile
        cs = self.chunk_size
        offload = self.offload
        while waiting and self.load.running < prof.max_num_seqs:
            req, fut = waiting.pop(0)
            self.load.waiting -= 1
            if fut.done():  # the client went away while waiting
                continue
            clock = max(clock, req.arrival)  # a step never starts before its requests arrived
            self.admit(req)
            try:
                hit = offload.hit_chunks(req)
                load = asyncio.ensure_future(offload.load(req, hit))
                stored = offload.store_background(req, hit)
            except Exception as exc:  # never kill the worker
                self._failed(req, fut, "load", exc)
                continue
            j = self.jitter(req)
            extra = self.slow_load * j * (self.load_ms(req, hit * cs) + prof.store_ms(self.tier_name, stored))
            prefilling.append(_Prefill(req, fut, hit, load, clock, extra, j, cs))
        return clock

    def _plan(self, prefilling: list[_Prefill]) -> _Step:
        """Fill one step's token budget with prefill chunks, in arrival order."""
        prof = self.profile
        budget = max(1, prof.max_num_batched_tokens - self.load.decoding)
        step = _Step(prof.step_base_ms, 0.0, [], [])
        for e in prefilling:
            if budget <= 0:
                break
            c = min(e.remaining, budget)
            budget -= c
            ctx = e.req.n - e.remaining + c
            step.compute_ms += e.j * (prof.prefill_ms_per_token * c
                                      + prof.prefill_ms_per_token_sq * attended_pairs(c, ctx) / 1000.0)
            step.other_ms += e.extra_ms
            e.extra_ms = 0.0
            e.remaining -= c
            step.scheduled.append(e.req)
            if e.remaining == 0:
                step.finished.append(e)
        return step

    async def _step(self, prefilling: list[_Prefill], clock: float) -> float:
        """Run one step from ``clock`` (virtual time); return when it ended."""
        prof = self.profile
        step = self._plan(prefilling)
        step_ms = self.slow * (self.slow_prefill * step.compute_ms + step.other_ms
                               + self.slow_decode * prof.decode_ms_per_running_seq * self.load.decoding)
        deadline = clock + step_ms / 1000.0
        self.step_prefill_s = self.slow * self.slow_prefill * (step.compute_ms - prof.step_base_ms) / 1000.0
        for r in step.scheduled:
            r.modeled_ms += step_ms
        await sleep_until(deadline, self.spin)
        self.step_prefill_s = 0.0
        for e in step.finished:
            await self._finish_prefill(e, deadline, prefilling)
        return deadline

    async def _finish_prefill(self, e: _Prefill, deadline: float, prefilling: list[_Prefill]) -> None:
        """The step that ended at ``deadline`` computed the last of ``e``'s prompt.  Settle
        its real read (waiting for it if it is late); chunks that failed verification go
        back to prefill (recomputed in the next steps, and offloaded again), else its
        first token is due."""
        cs = self.chunk_size
        req = e.req
        loaded = await e.load
        if loaded.chunks * cs < e.cached:
            e.cached = loaded.chunks * cs
            e.remaining = e.hit * cs - e.cached
            stored = self.offload.store_background(req, loaded.chunks)
            e.extra_ms = self.slow_load * e.j * self.profile.store_ms(self.tier_name, stored)
            return
        prefilling.remove(e)
        first = self.offload.settle(req, e.hit, loaded, deadline)
        self.account(req, e.cached)
        if e.fut.done():  # cancelled: give its slot back
            self.release(req)
            return
        e.fut.set_result(((e.start - req.arrival) * 1000.0, e.cached, first))


def make_scheduler(settings: Settings, offload: Offload, stats: Stats) -> Scheduler:
    """The scheduler of ``settings.profile``: fixed, batched or FIFO."""
    if settings.profile.kind == "fixed":
        return FixedScheduler(settings, offload, stats)
    if settings.profile.scheduler == "batched":
        return BatchedScheduler(settings, offload, stats)
    return FifoScheduler(settings, offload, stats)
