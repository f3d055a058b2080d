"""The emulator's aiohttp application: vLLM's OpenAI-compatible API over a cost model.

Endpoints (vLLM's shapes): ``GET /health``, ``GET /v1/models``, ``POST /tokenize``,
``POST /detokenize``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /metrics`` (Prometheus text, vLLM and LMCache names), ``GET /version``
(``{"version": ..., "kvcache_backend": ...}``: ``--served-version``, by default this package's,
and the offload tier, ``--backend``, which ``--kv-server external`` reads), and the emulator-only
``POST /reset_prefix_cache`` (empties the offload tier, like vLLM's endpoint of that
name empties its own cache).

Scheduling: in the modeled profiles one prefill worker takes requests FIFO (so TTFT
grows with concurrency) on a virtual clock: a request's service starts at ``max(its
arrival, the previous request's deadline)`` and its first token is due at ``service
start + slowdown * modeled_ms``, so the event loop's own delays never accumulate from
one request to the next.  At service start the prompt is looked up in the prefix cache
(index only), and the hit chunks are really read back from the tier while the modeled
window runs.  A chunk whose stored frame is missing, short or fails its CRC ends the hit
("failed verification" in the log): it and the chunks after it are recomputed, and the
deadline grows by their modeled prefill.  Only if the real read has not finished by the
deadline does the first token wait for it (an *overrun*).  So modeled times do not depend on the host: its I/O time is reported
beside the model (``emulator:tier_io_seconds_total``,
``emulator:tier_io_overrun_seconds_total``, ``emulator:tier_io_overruns_total`` in
``/metrics``; ``tier_io_ms`` and ``tier_io_overrun_ms`` per request), never added to it
while it fits.  New chunks are written to the tier in the background (LMCache offloads
asynchronously), one request's at a time; a later lookup that meets a chunk still being
written serves it from the write buffer (LMCache stages offloads in CPU memory) with the
tier's modeled transfer time but no real read.  Reads run on the event loop (file tiers
in short turns), so they never wait for the write backlog nor for a thread to win the
interpreter lock; writes go to one writer thread, which gets the lock when the loop
waits (the command line sets a 50 ms switch interval, so the writer seldom forces it).
Decode then runs per request.  The ``batched`` scheduler keeps the same rules per engine
step (see :meth:`Emulator._batched_worker`).  In the ``fixed`` profile every request is
independent: its hit chunks are read back within its fixed TTFT, and its new chunks are
written after its response.

Answers are greedy and follow the KV: a request's generated tokens are a function of
its prompt's token ids (all of them) and ``--seed`` alone (``max_tokens`` only cuts it
short: a shorter answer is a longer one's beginning), so a warm request that loads
honest KV answers exactly as its cold recomputation did, whatever the backend, the
timing or the request's number; ``temperature`` and the request's ``seed`` are accepted
and do not change that.  Each loaded chunk (read back, or served from the write buffer)
whose bytes are not its true KV mixes their digest into the answer, so a tier that hands
back wrong bytes changes the warm answer, as it would a real model's.  A request's
``cache_salt`` (as vLLM's: a non-empty string; here at most ``MAX_CACHE_SALT_CHARS``, else
400) is mixed into its chunk keys, so it shares no cached chunk with unsalted or
differently salted requests; its answer does not depend on it.

What the served times still contain of the host: the request's handling before it
reaches the scheduler (reading and parsing the body: it overlaps the modeled window,
which starts at arrival, and shows only where it is longer), the event loop's lateness
in writing a token at its deadline (tens of microseconds on an idle loop), and overruns.

Every sleep is to an absolute deadline: ``asyncio.sleep`` to ``deadline - spin_ms``,
then yielding (``asyncio.sleep(0)``) until ``perf_counter() >= deadline``, because
epoll rounds timeouts to whole milliseconds.  Each chunk is encoded before its
deadline and stamped just before its write.  The response headers of a stream leave
together with the first chunk (one send; ``send_headers_early`` in ``--config-json``
sends them at once, as vLLM does).

The last JSON chunk of a streamed response (and the body of a non-streamed one)
carries ``emulator_timing``: ``queue_ms`` (arrival to service start, on the model's
clock), ``ttft_ms`` (arrival to the first content chunk's write), ``itl_ms`` (gaps
between content chunk writes), ``cached_tokens``, ``computed_tokens`` and
``arrival_perf_s`` (the server's ``time.perf_counter()`` at arrival: CLOCK_MONOTONIC,
comparable with a client's on the same Linux host).  Arrival is the handler's entry,
before the body is read.

``max_tokens`` defaults to 16; exactly ``max_tokens`` tokens are always generated
(``finish_reason: "length"``), one per chunk.  Fault knobs (``--config-json``):
``error_rate`` (fraction of requests answered 500), ``crash_after`` (the process exits
with status 3 when request N+1 arrives), ``stall_ms`` + ``stall_every`` (every N-th
request's first token comes ``stall_ms`` late), ``corrupt_rate`` (fraction of offloaded
chunks, a seeded draw per chunk key, stored with altered bytes under a valid CRC: warm
answers that load them differ from the cold ones; counted in
``emulator:corrupted_chunks_total``).

Knobs for testing the plugin (``--config-json`` keys, most also flags; all seeded by
``--seed`` and deterministic given the order in which requests arrive):

* ``offload_disabled`` (``--offload-disabled``): the tier accepts nothing and never
  hits, like a misconfigured LMCache that silently recomputes; lookups are still
  counted (``vllm:external_prefix_cache_queries_total``, ``lmcache:num_requested_tokens_total``,
  "LMCache hit tokens: 0" log lines) and cost their lookup time.
* ``jitter`` (``--jitter``, a fraction in [0, 1)): every modeled time of a request
  (prefill/step share, load, each decode interval) is multiplied by a factor drawn
  uniformly from ``[1 - jitter, 1 + jitter]`` by a generator seeded with
  ``(seed, request number)``.  Modeled profiles only (the fixed profile stays exact).
* ``slowdown_prefill``, ``slowdown_decode``, ``slowdown_load`` (``--slowdown-prefill``
  etc., default 1.0): multiply the modeled compute of prefill, the decode intervals, and
  the modeled load + store transfer, on top of ``--slowdown``.  In the fixed profile
  ``slowdown_prefill`` scales the fixed TTFT and ``slowdown_decode`` the fixed ITL.
* ``read_delay_ms`` (``--config-json`` only, default 0): every chunk read back from the
  tier takes this much longer (a sleep inside the read): a slower host's storage, to
  check that the served times do not follow it until it outlasts the model.

Request limits (a hostile request costs bounded time and memory and gets a 4xx in
vLLM's error shape): ``--max-header-bytes`` (request line + headers, 431; aiohttp's
parser itself refuses with 400 a line over 8190 bytes or more than 128 headers),
``--max-body-bytes`` (413, checked on ``Content-Length`` before the body is read, and
by aiohttp's ``client_max_size`` as a body without one comes in), ``--max-json-depth``
(400), ``--max-prompt-chars`` (400 before tokenizing, which for millions of words would
hold the loop for seconds). Bodies must be ``application/json`` (415; none is taken as
JSON), strict JSON (no ``NaN``/``Infinity``), an object; fields have their OpenAI types
(``stream`` a boolean, ``max_tokens`` a positive integer, ...).

``emulator_timing`` also carries ``modeled_ms``: the modeled (scaled) prefill-side time
of the request without queueing and real I/O, so tests can compare the model's figures
without wall-clock noise; ``tier_io_ms``: the host's time for the request's real tier
read and its frame checks (0 without a hit); ``tier_io_overrun_ms``: how long its first token
waited for that read past the modeled deadline (0 when the read fitted in the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple

from aiohttp import hdrs, web

from .. import __version__
from .._openai_request import (
    BadRequest,
    chat_chars,
    flag,
    is_json_type,
    json_body,
    too_long,
)
from .costmodel import Profile, attended_pairs, make_profile
from .prefix_cache import PrefixCache, make_tier
from .tokenizer import get_tokenizer

__all__ = ["EMULATOR_KEYS", "Emulator", "Settings", "create_app"]

log = logging.getLogger("pytest_kvcache.emulator")
lmlog = logging.getLogger("pytest_kvcache.emulator.lmcache")

perf = time.perf_counter

#: --config-json keys that are not profile fields (see Settings)
EMULATOR_KEYS = {
    "use_odirect": bool,
    "spin_ms": float,
    "vocab_size": int,
    "error_rate": float,
    "crash_after": int,
    "stall_ms": float,
    "stall_every": int,
    "default_max_tokens": int,
    "send_headers_early": bool,
    "offload_disabled": bool,
    "jitter": float,
    "slowdown_prefill": float,
    "slowdown_decode": float,
    "slowdown_load": float,
    "redis_url": str,
    "read_delay_ms": float,
    "corrupt_rate": float,
}

#: vLLM's cache_salt has no length limit; the emulator's keeps a hostile one cheap
MAX_CACHE_SALT_CHARS = 256

#: a file tier's read of a request's chunks yields to the event loop after this much
#: reading (seconds) ...
READ_TURN_S = 0.002
#: ... checked after each group of this many chunks (~0.1 ms of reading on a 2-core VM)
READ_GROUP = 8

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class Settings:
    """Everything the emulator is configured with (the CLI builds one)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "emulated-model"
    backend: str = "none"
    profile: Profile = field(default_factory=lambda: make_profile("quick"))
    slowdown: float = 1.0
    seed: int = 0
    chunk_size: int = 256
    disk_path: str | None = None
    cpu_size_gb: float = 128.0
    disk_size_gb: float = 512.0
    payload_scale: float = 1 / 4096
    max_model_len: int = 131072
    # --config-json extras (EMULATOR_KEYS)
    use_odirect: bool = False
    spin_ms: float = 1.5
    vocab_size: int = 32000
    error_rate: float = 0.0
    crash_after: int = 0
    stall_ms: float = 0.0
    stall_every: int = 0
    default_max_tokens: int = 16
    send_headers_early: bool = False
    offload_disabled: bool = False
    jitter: float = 0.0
    slowdown_prefill: float = 1.0
    slowdown_decode: float = 1.0
    slowdown_load: float = 1.0
    redis_url: str | None = None
    redis_size_gb: float = 512.0
    served_version: str = __version__
    read_delay_ms: float = 0.0
    corrupt_rate: float = 0.0
    # request limits (see the module docstring)
    max_body_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 65536
    max_json_depth: int = 64
    max_prompt_chars: int | None = None  # None: 16 x max_model_len


class _Hist:
    __slots__ = ("buckets", "counts", "n", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.n += 1
        self.total += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        out.append(f"{name}_count{{{labels}}} {self.n}")
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        return out


class _Stats:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = 0
        self.failed = 0
        self.aborted = 0
        self.queries = 0
        self.ext_queries = 0
        self.ext_hits = 0
        self.local_compute = 0
        self.lm_requested = 0
        self.lm_hit = 0
        self.lm_stored = 0
        self.ttft = _Hist(_TTFT_BUCKETS)
        self.itl = _Hist(_ITL_BUCKETS)
        # the host's time for real tier reads, reported beside the model (not in it)
        self.io_seconds = 0.0
        self.io_overrun_seconds = 0.0
        self.io_overruns = 0
        # hit tokens per tier that served them (waterfall: cpu and disk)
        self.tier_hits: dict[str, int] = {}


class _Request:
    __slots__ = ("arrival", "digest", "ids", "io_ms", "io_overrun_ms", "keys", "max_tokens", "modeled_ms", "n",
                 "rid", "rng", "seq", "split", "wrong")

    def __init__(self, rid: str, seq: int, ids: Sequence[int], arrival: float, max_tokens: int,
                 digest: bytes) -> None:
        self.rid = rid
        self.seq = seq
        self.ids = ids
        self.digest = digest  # of the prompt's token ids: the answer's seed
        self.wrong: list[bytes] = []  # digests of the loaded chunks that are not their true KV
        self.keys: list[bytes] = []
        self.arrival = arrival
        self.n = len(ids)
        self.max_tokens = max_tokens
        self.modeled_ms = 0.0
        self.io_ms = 0.0
        self.io_overrun_ms = 0.0
        self.rng: random.Random | None = None
        self.split: dict[str, int] | None = None  # waterfall: hit tokens per tier


class _Prompt(NamedTuple):
    """A prompt as the emulator serves it: token ids, chunk keys (none without a tier) and
    the digest of the ids (its greedy answer's seed)."""

    ids: array
    keys: list[bytes]
    digest: bytes


@dataclass(frozen=True)
class _Loaded:
    """Outcome of a request's real tier read: how many of its hit chunks were read back
    (their frames intact), the digests of those whose bytes are not their true KV, and
    when (``perf_counter``) the read was handed to the tier and ended."""

    chunks: int
    wrong: list[bytes]
    started: float
    done: float


class _Prefill:
    """A sequence admitted by the batched scheduler, until its first token."""

    __slots__ = ("cached", "extra_ms", "fut", "hit", "j", "load", "remaining", "req", "start")

    def __init__(self, req: _Request, fut: asyncio.Future, hit: int, load: asyncio.Future,
                 start: float, extra_ms: float, j: float, chunk_size: int) -> None:
        self.req = req
        self.fut = fut
        self.hit = hit  # chunks the lookup found (their load is charged)
        self.load = load  # the real read of those chunks (a future of _Loaded)
        self.cached = hit * chunk_size  # tokens not to compute (fewer if a chunk fails)
        self.remaining = max(1, req.n - self.cached)  # tokens still to prefill
        self.start = start  # virtual time of admission
        self.extra_ms = extra_ms  # load/store time joining the next step
        self.j = j  # jitter factor


class _EventStream(web.StreamResponse):
    """A streamed response whose headers leave with the first chunk (one send, not two).

    aiohttp >= 3.12 buffers headers when ``_send_headers_immediately`` is false; older
    versions send them at ``prepare()`` as before.  Clients see the status line no later
    than the first token, exactly when they need it.
    """

    _send_headers_immediately = False


def _error(message: str, code: int) -> web.Response:
    etype = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}.get(code, "BadRequestError")
    body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


def _cache_salt(body: dict) -> str | None:
    """A request's ``cache_salt`` (vLLM's rule: a non-empty string if given), bounded."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str):
        raise BadRequest(f"'cache_salt' must be a string, got {type(salt).__name__}")
    if not salt:
        raise BadRequest("Parameter 'cache_salt' must be a non-empty string if provided.")
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise BadRequest(f"'cache_salt' is {len(salt)} characters long, over the emulator's limit of "
                         f"{MAX_CACHE_SALT_CHARS}")
    return salt


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _limits(max_header_bytes: int) -> Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]:
    """Middleware: 431 for a request head over the limit, and aiohttp's own 4xx (no route, wrong
    method) in vLLM's JSON error shape."""

    @web.middleware
    async def limits(request: web.Request, handler: _Handler) -> web.StreamResponse:
        raw = request.raw_headers
        size = len(request.method) + len(request.raw_path) + 11 + sum(len(k) + len(v) + 4 for k, v in raw)
        if size > max_header_bytes:
            return _error(f"request line and headers are {size} bytes, over the limit of {max_header_bytes} "
                          "bytes (--max-header-bytes)", 431)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(f"{exc.reason}: {request.method} {request.path[:200]}", exc.status)

    return limits


#: Prompts of at least this many characters are remembered (ids and chunk keys) ...
_MEMO_MIN_CHARS = 20_000
#: ... up to this many tokens in all (4 bytes each), the oldest forgotten first.
_MEMO_MAX_TOKENS = 30_000_000


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


class Emulator:
    """State of one emulated server: tokenizer, prefix cache, scheduler, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.profile = settings.profile
        self.fixed = self.profile.kind == "fixed"
        self.tok = get_tokenizer(settings.vocab_size)
        self.tok.enable_fast()
        self.max_prompt_chars = settings.max_prompt_chars or 16 * settings.max_model_len
        # A warm round resends the cold round's prompts: tokenizing and hashing a 100k-word
        # prompt again (~13 ms of a 2-core VM) is host time the model does not charge, and it
        # would hold the loop past the short modeled windows of warm requests.
        self._prompts: OrderedDict[tuple[int, int, str | None], _Prompt] = OrderedDict()
        self._prompt_tokens = 0
        gb = {"cpu": settings.cpu_size_gb, "waterfall": settings.cpu_size_gb,
              "redis": settings.redis_size_gb}.get(
            settings.backend, settings.disk_size_gb)
        capacity = int(gb * 1e9 * settings.payload_scale)
        disk_path = settings.disk_path
        if settings.backend in ("disk", "gds", "waterfall") and not disk_path:
            raise ValueError(f"--backend {settings.backend} needs --disk-path")
        if not 0.0 <= settings.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if not 0.0 <= settings.corrupt_rate <= 1.0:
            raise ValueError("corrupt_rate must be in [0, 1]")
        for k in ("slowdown_prefill", "slowdown_decode", "slowdown_load"):
            if not getattr(settings, k) > 0:
                raise ValueError(f"{k} must be > 0")
        tier = make_tier(settings.backend, capacity_bytes=capacity, disk_path=disk_path,
                         use_odirect=settings.use_odirect, redis_url=settings.redis_url,
                         redis_prefix=f"kvem@{settings.model}@{settings.chunk_size}@",
                         lower_capacity_bytes=int(settings.disk_size_gb * 1e9 * settings.payload_scale))
        self.cache = PrefixCache(tier, chunk_size=settings.chunk_size,
                                 kv_bytes_per_token=self.profile.kv_bytes_per_token,
                                 payload_scale=settings.payload_scale,
                                 namespace=settings.model,
                                 read_delay_s=settings.read_delay_ms / 1000.0,
                                 corrupt_rate=settings.corrupt_rate, seed=settings.seed)
        self.tier_name = settings.backend
        # Tier reads run on the event loop (file tiers in turns, see _load; a redis read
        # is one MGET round trip, as LMCache's retrieve holds up the engine step).  File
        # and redis tiers write in one writer thread, in the background.
        self.file_tier = settings.backend in ("disk", "gds", "waterfall")
        self.threaded_writes = self.file_tier or settings.backend == "redis"
        self.offload_disabled = settings.offload_disabled
        self.jitter = settings.jitter
        self.slow_prefill = settings.slowdown_prefill
        self.slow_decode = settings.slowdown_decode
        self.slow_load = settings.slowdown_load
        self.stats = _Stats()
        self.created = int(time.time())
        self.spin = settings.spin_ms / 1000.0
        self.slow = settings.slowdown
        self._seq = 0
        self._rid_prefix = os.urandom(4).hex()
        self._fault_rng = random.Random(settings.seed ^ 0x5EED)
        self.waiting = 0
        self.running = 0  # past the queue, not finished
        self.decoding = 0  # past the first token, not finished
        self.context_tokens = 0  # tokens of running requests (GPU KV usage)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._pending: dict[bytes, asyncio.Future] = {}
        self._bg: set[asyncio.Task] = set()
        self._active: set[asyncio.Task] = set()  # handlers generating tokens
        self._writer = None  # the thread pool (one thread) of offload writes, made on first use
        self._step_prefill_s = 0.0  # batched scheduler: prefill time of the current step
        self._slot_freed = asyncio.Event()  # batched scheduler: a running request finished

    def abort_requests(self) -> int:
        """Cancel every request in flight (used on SIGTERM); return how many."""
        tasks = [t for t in self._active if not t.done()]
        for t in tasks:
            t.cancel()
        return len(tasks)

    # -- lifecycle ------------------------------------------------------------------
    async def startup(self, app: web.Application) -> None:
        self._queue = asyncio.Queue()
        if self.s.corrupt_rate and self.cache.enabled:
            log.warning("fault injection: %g of offloaded chunks are stored with altered bytes under a valid CRC "
                        "(--corrupt-rate); warm answers that load them differ from the cold ones",
                        self.s.corrupt_rate)
        if not self.fixed:
            worker = self._batched_worker if self.profile.scheduler == "batched" else self._prefill_worker
            self._worker = asyncio.get_running_loop().create_task(worker())

    async def shutdown(self, app: web.Application) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=5)
        if self._writer is not None:
            self._writer.shutdown(wait=False, cancel_futures=True)

    # -- helpers --------------------------------------------------------------------
    def _next_rid(self, prefix: str) -> tuple[str, int]:
        self._seq += 1
        return f"{prefix}-{self._rid_prefix}{self._seq:08x}", self._seq

    async def _write(self, fn, *args):
        """Run a tier write (or clear): in the writer thread where the tier writes files or
        talks to redis (one thread, as LMCache offloads in the background), inline for
        memory tiers.  The thread takes the interpreter lock when the event loop lets go
        of it (``__main__`` sets a long switch interval), so writes fill the loop's idle
        time and never hold a response up."""
        if not self.threaded_writes:
            return fn(*args)
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(1, thread_name_prefix="kv-write")
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def _hit_chunks(self, req: _Request) -> int:
        """Leading chunks of ``req`` the tier's index holds (or that are still being
        written): the lookup, no I/O."""
        if not self.cache.enabled or not req.keys or self.offload_disabled:
            return 0
        tier = self.cache.tier
        pending = self._pending
        hit = 0
        for k in req.keys:
            if not (tier.contains(k) or k in pending):
                break
            hit += 1
        return hit

    async def _load(self, req: _Request, hit: int) -> _Loaded:
        """Read back the ``hit`` leading chunks of ``req`` (the lookup found them); stop at
        the first whose frame fails (missing, short, CRC).  The bytes are not compared
        with the true KV (an engine cannot): the digests of those that differ go into
        the answer (:meth:`_answer_rng`).

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
        where = getattr(self.cache.tier, "where", None)
        if where is not None:
            # which tier serves each chunk, looked up before the load (which promotes)
            split: dict[str, int] = {}
            for k in keys:
                place = "cpu" if k in buffered else where(k)
                split[place] = split.get(place, 0) + self.cache.chunk_size
            req.split = split
        load = self.cache.load
        if not hit:
            return _Loaded(0, [], started, perf())
        if not self.file_tier:
            done, wrong = load(keys, buffered)
            return _Loaded(done, wrong, started, perf())
        done = 0
        wrong: list[bytes] = []
        turn = started
        for i in range(0, hit, READ_GROUP):
            if perf() - turn > READ_TURN_S:
                await asyncio.sleep(0)
                turn = perf()
            part = keys[i:i + READ_GROUP]
            ok, bad = load(part, buffered)
            done += ok
            wrong += bad
            if ok < len(part):
                break
        return _Loaded(done, wrong, started, perf())

    def _settle_load(self, req: _Request, hit: int, loaded: _Loaded, deadline: float) -> float:
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

    def _store_background(self, req: _Request, from_chunk: int) -> int:
        """Start writing the chunks from ``from_chunk`` on; return tokens to be stored."""
        if not self.cache.enabled or self.offload_disabled:
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

        async def run() -> None:
            try:
                await self._write(self.cache.store, keys)
            except Exception as exc:  # a failed offload write is logged, not fatal  # noqa: BLE001 - never let it kill the server
                log.warning("offload write failed: %s", exc)
            finally:
                for k in keys:
                    self._pending.pop(k, None)
                if not fut.done():
                    fut.set_result(None)
            self.stats.lm_stored += stored_tokens
            lmlog.info("Stored %d out of total %d tokens", stored_tokens, req.n)

        task = loop.create_task(run())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return stored_tokens

    def _account_prefill(self, req: _Request, cached: int) -> None:
        st = self.stats
        st.prompt_tokens += req.n
        st.queries += req.n
        st.local_compute += req.n - cached
        if self.cache.enabled:
            st.ext_queries += req.n
            st.ext_hits += cached
            st.lm_requested += req.n
            st.lm_hit += cached
            left = cached  # the tiers in lookup order; a chunk that failed verification ended the load
            for tier, tokens in (req.split or {self.tier_name: cached}).items():
                st.tier_hits[tier] = st.tier_hits.get(tier, 0) + min(tokens, left)
                left -= min(tokens, left)
            lmlog.info("Reqid: %s, Total tokens %d, LMCache hit tokens: %d, need to load: %d",
                       req.rid, req.n, cached, cached)
            if cached:
                lmlog.info("Retrieved %d out of total %d tokens", cached, req.n)

    # -- scheduling -----------------------------------------------------------------
    async def _prefill_worker(self) -> None:
        """FIFO scheduler: one prefill at a time, on a virtual clock (module docstring)."""
        assert self._queue is not None
        cs = self.cache.chunk_size
        free_at = 0.0  # when the modeled GPU finishes the previous prefill
        while True:
            req, fut = await self._queue.get()
            start = max(req.arrival, free_at)
            # A plain sleep: waking up to a millisecond late only delays the start of the
            # real read inside its window (the model counts from ``start``), while the
            # previous request's first token is due at this very instant and needs the loop.
            if start > perf():
                await asyncio.sleep(start - perf())
            self.waiting -= 1
            if fut.done():  # the client went away while waiting
                continue
            self.running += 1
            self.context_tokens += req.n
            try:
                hit = self._hit_chunks(req)
                loaded = await self._load(req, hit)
                stored = self._store_background(req, loaded.chunks)
                cached = loaded.chunks * cs
                req.modeled_ms = self._modeled_prefill_ms(req, hit * cs, cached, stored)
                deadline = start + req.modeled_ms / 1000.0
                first = self._settle_load(req, hit, loaded, deadline)
                self._account_prefill(req, cached)
            except asyncio.CancelledError:
                if not fut.done():
                    fut.cancel()
                raise
            except Exception as exc:  # never kill the worker
                log.exception("prefill failed for %s", req.rid)
                self._release(req)
                if not fut.done():
                    fut.set_exception(exc)
                continue
            free_at = deadline
            if fut.done():  # cancelled during the read: give its slot back
                self._release(req)
            else:
                fut.set_result(((start - req.arrival) * 1000.0, cached, first))

    def _release(self, req: _Request) -> None:
        """A request past the queue that will not reach its first token frees its slot."""
        self.running -= 1
        self.context_tokens -= req.n
        self._slot_freed.set()

    def _jitter(self, req: _Request) -> float:
        """A seeded factor in [1 - jitter, 1 + jitter] (exactly 1.0 without jitter)."""
        if not self.jitter:
            return 1.0
        if req.rng is None:
            req.rng = random.Random((self.s.seed * 1_000_003 + req.seq) ^ 0x71773E)
        return 1.0 + self.jitter * (2.0 * req.rng.random() - 1.0)

    def _modeled_prefill_ms(self, req: _Request, hit: int, cached: int, stored: int) -> float:
        """FIFO scheduler: scaled modeled time of ``req`` (ms): the load of the ``hit``
        tokens the lookup found, the prefill of all but the ``cached`` ones read back
        (so a chunk that failed is recomputed), and the store of ``stored`` tokens."""
        prof = self.profile
        return self.slow * self._jitter(req) * (
            self.slow_prefill * prof.prefill_ms(req.n - cached, req.n)
            + self.slow_load * (self._load_ms(req, hit) + prof.store_ms(self.tier_name, stored)))

    def _load_ms(self, req: _Request, cached: int) -> float:
        if req.split is not None and cached:
            return self.profile.load_split_ms(req.split)
        return self.profile.load_ms(self.tier_name, cached)

    async def _batched_worker(self) -> None:
        """vLLM-like continuous batching (profiles with ``scheduler: "batched"``).

        Each step serves every decoding sequence one token (their intervals are modeled
        per request by :meth:`_itl_s`; here they only take budget and step time) and
        fills the rest of ``max_num_batched_tokens`` with prefill chunks of admitted
        sequences in arrival order (chunked prefill); while a step computes prefill
        chunks, each decode interval grows by that compute time (decode and prefill share
        the GPU), so cold prefills slow the streams around them.  A sequence is admitted
        from the waiting queue while fewer than ``max_num_seqs`` run; on admission its
        cached prefix is looked up, its real read starts (a task, see :meth:`_load`) and
        its load/store time joins its first step.  A sequence's first token leaves when
        the step that ends its prefill ends; its read must have ended by then (else the
        token waits for it: an overrun), and chunks that failed verification are
        prefilled in the next steps before it does.

        Steps run on a virtual clock: each starts when the previous one ends (or, after
        the engine was idle, when the request that woke it arrived), and lasts its
        modeled time, so the loop's delays do not accumulate over steps.
        """
        assert self._queue is not None
        prof = self.profile
        cs = self.cache.chunk_size
        q = self._queue
        waiting: list = []
        prefilling: list[_Prefill] = []
        clock = 0.0  # virtual time: the end of the last step
        while True:
            if not waiting and not prefilling:
                waiting.append(await q.get())
            while not q.empty():
                waiting.append(q.get_nowait())
            # admit
            while waiting and self.running < prof.max_num_seqs:
                req, fut = waiting.pop(0)
                self.waiting -= 1
                if fut.done():  # the client went away while waiting
                    continue
                clock = max(clock, req.arrival)  # a step never starts before its requests arrived
                self.running += 1
                self.context_tokens += req.n
                try:
                    hit = self._hit_chunks(req)
                    load = asyncio.ensure_future(self._load(req, hit))
                    stored = self._store_background(req, hit)
                except Exception as exc:  # never kill the worker
                    log.exception("load failed for %s", req.rid)
                    self._release(req)
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                j = self._jitter(req)
                extra = self.slow_load * j * (self._load_ms(req, hit * cs) + prof.store_ms(self.tier_name, stored))
                prefilling.append(_Prefill(req, fut, hit, load, clock, extra, j, cs))
            if not prefilling:
                # every slot decodes: wait until a request finishes (no busy loop)
                self._slot_freed.clear()
                await self._slot_freed.wait()
                clock = max(clock, perf())
                continue
            # one step
            t0 = clock
            budget = max(1, prof.max_num_batched_tokens - self.decoding)
            compute = prof.step_base_ms
            other = 0.0
            finished: list[_Prefill] = []
            scheduled = []
            for e in prefilling:
                if budget <= 0:
                    break
                c = min(e.remaining, budget)
                budget -= c
                ctx = e.req.n - e.remaining + c
                compute += e.j * (prof.prefill_ms_per_token * c
                                  + prof.prefill_ms_per_token_sq * attended_pairs(c, ctx) / 1000.0)
                other += e.extra_ms
                e.extra_ms = 0.0
                e.remaining -= c
                scheduled.append(e.req)
                if e.remaining == 0:
                    finished.append(e)
            step_ms = self.slow * (self.slow_prefill * compute + other
                                   + self.slow_decode * prof.decode_ms_per_running_seq * self.decoding)
            deadline = t0 + step_ms / 1000.0
            clock = deadline
            self._step_prefill_s = self.slow * self.slow_prefill * (compute - prof.step_base_ms) / 1000.0
            for r in scheduled:
                r.modeled_ms += step_ms
            try:
                await sleep_until(deadline, self.spin)
                self._step_prefill_s = 0.0
                for e in finished:
                    await self._finish_prefill(e, deadline, prefilling)
            except asyncio.CancelledError:
                for e in prefilling:
                    if not e.fut.done():
                        e.fut.cancel()
                raise

    async def _finish_prefill(self, e: _Prefill, deadline: float, prefilling: list[_Prefill]) -> None:
        """Batched scheduler: the step that ended at ``deadline`` computed the last of
        ``e``'s prompt.  Settle its real read (waiting for it if it is late); chunks that
        failed verification go back to prefill (recomputed in the next steps, and
        offloaded again), else its first token is due."""
        cs = self.cache.chunk_size
        req = e.req
        loaded = await e.load
        if loaded.chunks * cs < e.cached:
            e.cached = loaded.chunks * cs
            e.remaining = e.hit * cs - e.cached
            stored = self._store_background(req, loaded.chunks)
            e.extra_ms = self.slow_load * e.j * self.profile.store_ms(self.tier_name, stored)
            return
        prefilling.remove(e)
        first = self._settle_load(req, e.hit, loaded, deadline)
        self._account_prefill(req, e.cached)
        if e.fut.done():  # cancelled: give its slot back
            self._release(req)
            return
        e.fut.set_result(((e.start - req.arrival) * 1000.0, e.cached, first))

    async def _first_token(self, req: _Request) -> tuple[float, int, float]:
        """Return (queue_ms, cached, deadline of the first token).

        In the modeled profiles this waits for the scheduler, which answers once the
        request's tier read is settled (FIFO: the deadline is usually still ahead) or
        its last prefill step has ended (batched); in the fixed profile it returns at
        once.  The caller sleeps to the deadline after preparing the first chunk, so the
        write leaves on time.
        """
        if self.fixed:
            hit = self._hit_chunks(req)
            loaded = await self._load(req, hit)
            cached = loaded.chunks * self.cache.chunk_size
            self._account_prefill(req, cached)
            self.running += 1
            self.context_tokens += req.n
            ttft_ms = self.slow * self.profile.fixed_ttft_ms
            if self.slow_prefill != 1.0:
                ttft_ms *= self.slow_prefill
            req.modeled_ms = ttft_ms
            return 0.0, cached, self._settle_load(req, hit, loaded, req.arrival + ttft_ms / 1000.0)
        assert self._queue is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiting += 1
        self._queue.put_nowait((req, fut))
        queue_ms, cached, deadline = await fut
        return queue_ms, cached, deadline

    def _itl_s(self, req: _Request | None = None) -> float:
        itl = self.slow * self.profile.itl_ms(self.decoding) / 1000.0
        if self._step_prefill_s:
            # batched scheduler: a decode step shares the GPU with the prefill chunks of
            # the step in progress (chunked prefill), so it lasts that much longer
            itl += self._step_prefill_s
        if self.slow_decode != 1.0:
            itl *= self.slow_decode
        if self.jitter and req is not None:
            itl *= self._jitter(req)
        return itl

    # -- request parsing ------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict:
        s = self.s
        if hdrs.CONTENT_TYPE in request.headers and not is_json_type(request.content_type):
            raise BadRequest(f"Content-Type {request.headers[hdrs.CONTENT_TYPE][:100]!r} is not supported: "
                             "send application/json", 415)
        too_large = BadRequest(f"request body is over the limit of {s.max_body_bytes} bytes (--max-body-bytes)", 413)
        if (request.content_length or 0) > s.max_body_bytes:
            raise too_large  # before reading any of it
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:  # a body without Content-Length, counted as it came
            raise too_large from None
        except Exception as exc:  # noqa: BLE001 - a body cut short or badly chunked is the client's fault
            raise BadRequest(f"request body could not be read: {exc}") from None
        return json_body(raw, s.max_json_depth)

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest(f"'model' must be a string, got {type(model).__name__}")
        if model is not None and model != self.s.model:
            raise BadRequest(f"The model `{model[:200]}` does not exist.", 404)

    def _check_chars(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise BadRequest(f"the prompt is {chars} characters long, over the limit of {self.max_prompt_chars} "
                             "(--max-prompt-chars); it was not tokenized")

    def _encode(self, text: str) -> Sequence[int]:
        try:
            return self.tok.encode(text)
        except UnicodeEncodeError:  # an unknown word is hashed as UTF-8, which a lone surrogate is not
            raise BadRequest("the prompt is not valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)") from None

    def _check_prompt_size(self, prompt: Any) -> None:
        """Refuse a prompt too long to serve before it is tokenized (that would hold the loop)."""
        if isinstance(prompt, str):
            self._check_chars(len(prompt))
        elif isinstance(prompt, list) and prompt and type(prompt[0]) is int and len(prompt) > self.s.max_model_len:
            raise BadRequest(too_long(self.s.max_model_len, len(prompt)))

    def _check_chat(self, messages: Any) -> None:
        self._check_chars(chat_chars(messages, self.s.max_model_len))

    def _remembered(self, prompt: str, salt: str | None) -> _Prompt | None:
        """A long prompt seen before with this salt (None: not seen, or short)."""
        if len(prompt) < _MEMO_MIN_CHARS:
            return None
        key = (len(prompt), hash(prompt), salt)
        found = self._prompts.get(key)
        if found is not None:
            self._prompts.move_to_end(key)
        return found

    def _remember(self, prompt: str, salt: str | None, served: _Prompt) -> None:
        if len(prompt) < _MEMO_MIN_CHARS:
            return
        self._prompts[(len(prompt), hash(prompt), salt)] = served
        self._prompt_tokens += len(served.ids)
        while self._prompt_tokens > _MEMO_MAX_TOKENS and self._prompts:
            _, old = self._prompts.popitem(last=False)
            self._prompt_tokens -= len(old.ids)

    def _serve_as(self, ids: Sequence[int], salt: str | None) -> _Prompt:
        """``ids`` with their chunk keys and digest (one blake2b pass: ~0.5 ms per 100k tokens)."""
        arr = ids if isinstance(ids, array) else array("I", ids)
        keys = self.cache.keys(arr, salt) if self.cache.enabled else []
        return _Prompt(arr, keys, hashlib.blake2b(arr, digest_size=16).digest())

    def _ids_from_prompt(self, prompt: Any) -> Sequence[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode(prompt)
        if isinstance(prompt, list):
            if not prompt:
                return []
            v = self.s.vocab_size
            try:
                arr = array("I", prompt)  # C speed: rejects non-ints and negatives
            except OverflowError:
                raise BadRequest(f"token id out of vocabulary range [0, {v})") from None
            except TypeError:
                if all(isinstance(p, (str, list)) for p in prompt):
                    raise BadRequest("the emulator serves one prompt per request") from None
                raise BadRequest("'prompt' must be a string, a list of token ids, "
                                 "or a one-element list of either") from None
            # max() of the list reuses its ints (twice as fast as the array's); the array
            # is returned because hashing the chunk keys copies it at C speed
            if max(prompt) >= v:
                raise BadRequest(f"token ids must be integers in [0, {v})")
            return arr
        raise BadRequest("'prompt' must be a string or a list of token ids")

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        self._check_chat(messages)
        try:
            return self.tok.apply_chat_template(messages, flag(body, "add_generation_prompt", True))
        except ValueError as exc:
            raise BadRequest(str(exc))

    def _max_tokens(self, body: dict, n: int, chat: bool) -> int:
        mt = body.get("max_tokens")
        if chat and body.get("max_completion_tokens") is not None:
            mt = body.get("max_completion_tokens")
        if mt is None:
            mt = self.s.default_max_tokens
        if type(mt) is not int or mt < 1:
            raise BadRequest("max_tokens must be a positive integer")
        m = self.s.max_model_len
        if n > m:
            raise BadRequest(too_long(m, n))
        if n + mt > m:
            raise BadRequest(
                f"This model's maximum context length is {m} tokens. However, you requested "
                f"{n + mt} tokens ({n} in the messages, {mt} in the completion). Please reduce "
                "the length of the messages or completion.")
        return mt

    # -- handlers -------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        # kvcache_backend: the offload tier it runs, so that --kv-server external knows which items it serves
        return web.json_response({"version": self.s.served_version, "kvcache_backend": self.s.backend})

    async def models(self, request: web.Request) -> web.Response:
        m = self.s.model
        body = {"object": "list", "data": [{
            "id": m, "object": "model", "created": self.created, "owned_by": "vllm",
            "root": m, "parent": None, "max_model_len": self.s.max_model_len,
            "permission": []}]}
        return web.json_response(body)

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            self._check_model(body)
            if "messages" in body:
                ids = self._chat_ids(body)
            elif isinstance(body.get("prompt"), str):
                self._check_chars(len(body["prompt"]))
                ids = self._encode(body["prompt"])
            else:
                raise BadRequest("'prompt' (a string) or 'messages' is required")
        except BadRequest as exc:
            return _error(str(exc), exc.code)
        return web.json_response({"count": len(ids), "max_model_len": self.s.max_model_len,
                                  "tokens": ids, "token_strs": None})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            self._check_model(body)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids):
                raise BadRequest("'tokens' must be a list of integers")
            try:
                text = self.tok.decode(ids)
            except ValueError as exc:
                raise BadRequest(str(exc))
        except BadRequest as exc:
            return _error(str(exc), exc.code)
        return web.json_response({"prompt": text})

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=30)
        await self._write(self.cache.clear)
        log.info("prefix cache reset")
        return web.Response(status=200)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = perf()
        # Let every request that arrived in the same burst stamp its arrival before any
        # of them parses its body: otherwise the 16th of 16 simultaneous requests is
        # stamped only after the other 15 were parsed (~0.3 ms each).
        await asyncio.sleep(0)
        try:
            body = await self._body(request)
            self._check_model(body)
            salt = _cache_salt(body)
            memo = prompt = None
            if chat:
                ids = self._chat_ids(body)
            else:
                if "prompt" not in body:
                    raise BadRequest("'prompt' is required")
                prompt = body["prompt"]
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                self._check_prompt_size(prompt)
                memo = self._remembered(prompt, salt) if isinstance(prompt, str) else None
                ids = memo.ids if memo else self._ids_from_prompt(prompt)
            n = len(ids)
            if n == 0:
                raise BadRequest("The prompt is empty: at least one token is required")
            max_tokens = self._max_tokens(body, n, chat)
            stream = flag(body, "stream")
            so = body.get("stream_options")
            if so is None:
                so = {}
            if not isinstance(so, dict):
                raise BadRequest("stream_options must be an object")
            include_usage = flag(so, "include_usage") and stream
            continuous = flag(so, "continuous_usage_stats") and stream
        except BadRequest as exc:
            return _error(str(exc), exc.code)

        rid, seq = self._next_rid("chatcmpl" if chat else "cmpl")
        s = self.s
        if s.crash_after and seq > s.crash_after:
            log.error("fault injection: crashing after %d requests", s.crash_after)
            sys.stderr.flush()
            os._exit(3)
        if s.error_rate and self._fault_rng.random() < s.error_rate:
            self.stats.failed += 1
            return _error("fault injection: internal server error", 500)

        served = memo or self._serve_as(ids, salt)
        if memo is None and isinstance(prompt, str):
            self._remember(prompt, salt, served)
        req = _Request(rid, seq, served.ids, arrival, max_tokens, served.digest)
        req.keys = served.keys
        resp: web.StreamResponse | None = None
        if stream:
            cls = web.StreamResponse if s.send_headers_early else _EventStream
            resp = cls(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
        started = False
        me = asyncio.current_task()
        if me is not None:
            self._active.add(me)
        try:
            queue_ms, cached, deadline = await self._first_token(req)
            started = True
            if s.stall_every and s.stall_ms and seq % s.stall_every == 0:
                deadline += self.slow * s.stall_ms / 1000.0
            return await self._emit(request, resp, req, chat, body, queue_ms, cached,
                                    deadline, include_usage, continuous)
        except ConnectionResetError:
            # the client went away mid-stream (a load generator's timeout, a test)
            log.debug("request %s: client disconnected", rid)
            self.stats.aborted += 1
            return resp if resp is not None else web.Response(status=499)
        except asyncio.CancelledError:
            self.stats.aborted += 1
            raise
        finally:
            if me is not None:
                self._active.discard(me)
            if started:
                self.running -= 1
                self.context_tokens -= req.n
                self._slot_freed.set()
            if self.fixed:  # its new chunks are offloaded after the response (no timing effect)
                self._store_background(req, 0)

    async def _emit(self, request, resp, req: _Request, chat: bool, body: dict,
                    queue_ms: float, cached: int, deadline: float,
                    include_usage: bool, continuous: bool) -> web.StreamResponse:
        tok = self.tok
        model = self.s.model
        created = int(time.time())
        n = req.n
        rng = self._answer_rng(req)
        lo, hi = tok.num_special, tok.vocab_size
        words = [" " + tok.id_to_word(i) for i in
                 (lo + int(rng.random() * (hi - lo)) for _ in range(req.max_tokens))]
        fixed = self.fixed
        itl_fixed = self.slow * self.profile.fixed_itl_ms / 1000.0
        if self.slow_decode != 1.0:
            itl_fixed *= self.slow_decode
        first_deadline = deadline
        stamps: list[float] = []
        try:
            if resp is None:  # non-streaming: wait through all the token deadlines
                for k in range(req.max_tokens):
                    if k:
                        deadline = (first_deadline + k * itl_fixed) if fixed else deadline + self._itl_s(req)
                    # the first token's stamp is the TTFT, the last one's the response's end
                    await sleep_until(deadline, self.spin if k in (0, req.max_tokens - 1) else 0.0)
                    stamps.append(perf())
                    if not k:
                        self.decoding += 1  # past its first token
                    self.stats.generation_tokens += 1
                timing = self._timing(req, queue_ms, cached, stamps)
                self._finish(req, stamps)
                text = "".join(words)
                usage = {"prompt_tokens": n, "total_tokens": n + req.max_tokens,
                         "completion_tokens": req.max_tokens, "prompt_tokens_details": None}
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text,
                                                      "tool_calls": []},
                              "logprobs": None, "finish_reason": "length", "stop_reason": None}
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": "length", "stop_reason": None,
                              "prompt_logprobs": None}
                    obj = "text_completion"
                out = {"id": req.rid, "object": obj, "created": created, "model": model,
                       "choices": [choice], "usage": usage, "emulator_timing": timing}
                return web.json_response(out)

            obj = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": req.rid, "object": obj, "created": created, "model": model}
            dumps = json.dumps
            mt = req.max_tokens
            for k in range(mt):
                # build the chunk first, then sleep to its deadline, stamp and write, so
                # that the bytes leave as close to the deadline as the loop allows
                last = k == mt - 1
                finish = "length" if last else None
                if chat:
                    choice = {"index": 0, "delta": {"content": words[k]}, "logprobs": None,
                              "finish_reason": finish, "stop_reason": None}
                else:
                    choice = {"index": 0, "text": words[k], "logprobs": None,
                              "finish_reason": finish, "stop_reason": None}
                chunk = dict(head, choices=[choice])
                if continuous:
                    chunk["usage"] = {"prompt_tokens": n, "total_tokens": n + k + 1,
                                      "completion_tokens": k + 1}
                payload = b""
                if k == 0 and chat:
                    role = dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}])
                    if continuous:
                        role["usage"] = {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}
                    payload = b"data: " + dumps(role).encode() + b"\n\n"
                timed = last and not include_usage
                if not timed:
                    payload += b"data: " + dumps(chunk).encode() + b"\n\n"
                if k:
                    deadline = (first_deadline + k * itl_fixed) if fixed else deadline + self._itl_s(req)
                await sleep_until(deadline, self.spin)
                # stamps are taken just before each write (the write hands the bytes to
                # the socket at once; aiohttp sets TCP_NODELAY)
                stamps.append(perf())
                if not k:
                    self.decoding += 1  # past its first token
                if timed:
                    chunk["emulator_timing"] = self._timing(req, queue_ms, cached, stamps)
                    payload += b"data: " + dumps(chunk).encode() + b"\n\n"
                await resp.write(payload)
                self.stats.generation_tokens += 1
            tail = b""
            if include_usage:
                final = dict(head, choices=[], usage={"prompt_tokens": n, "total_tokens": n + mt,
                                                      "completion_tokens": mt})
                final["emulator_timing"] = self._timing(req, queue_ms, cached, stamps)
                tail = b"data: " + dumps(final).encode() + b"\n\n"
            await resp.write(tail + b"data: [DONE]\n\n")
            self._finish(req, stamps)
            await resp.write_eof()
            return resp
        finally:
            if stamps:
                self.decoding -= 1

    def _answer_rng(self, req: _Request) -> random.Random:
        """The generator of ``req``'s (greedy) answer: seeded by its prompt's digest and
        ``--seed``, and by the digests of any loaded chunks that were not their true KV
        (so wrong KV changes the answer, as it would a real model's)."""
        h = hashlib.blake2b(req.digest, digest_size=16)
        h.update(b"|%d|" % self.s.seed)
        for d in req.wrong:
            h.update(d)
        return random.Random(int.from_bytes(h.digest(), "little"))

    def _timing(self, req: _Request, queue_ms: float, cached: int, stamps: list[float]) -> dict:
        t0 = req.arrival
        ttft = (stamps[0] - t0) * 1000.0 if stamps else None
        itl = [round((b - a) * 1000.0, 4) for a, b in pairwise(stamps)]
        return {"queue_ms": round(queue_ms, 4), "ttft_ms": None if ttft is None else round(ttft, 4),
                "itl_ms": itl, "cached_tokens": cached, "computed_tokens": req.n - cached,
                "modeled_ms": round(req.modeled_ms, 4), "tier_io_ms": round(req.io_ms, 4),
                "tier_io_overrun_ms": round(req.io_overrun_ms, 4),
                "arrival_perf_s": t0}

    def _finish(self, req: _Request, stamps: list[float]) -> None:
        st = self.stats
        st.success += 1
        if stamps:
            st.ttft.observe(stamps[0] - req.arrival)
            for a, b in pairwise(stamps):
                st.itl.observe(b - a)

    # -- metrics --------------------------------------------------------------------
    async def metrics(self, request: web.Request) -> web.Response:
        st = self.stats
        lab = f'model_name="{self.s.model}"'
        out: list[str] = []

        def metric(name: str, kind: str, value: float, labels: str = lab) -> None:
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name}{{{labels}}} {value}")

        metric("vllm:num_requests_running", "gauge", self.running)
        metric("vllm:num_requests_waiting", "gauge", self.waiting)
        cap = self.profile.gpu_kv_capacity_tokens
        metric("vllm:kv_cache_usage_perc", "gauge", min(1.0, self.context_tokens / cap) if cap else 0.0)
        metric("vllm:prompt_tokens_total", "counter", st.prompt_tokens)
        metric("vllm:generation_tokens_total", "counter", st.generation_tokens)
        metric("vllm:request_success_total", "counter", st.success, lab + ',finished_reason="length"')
        metric("emulator:requests_aborted_total", "counter", st.aborted)
        metric("emulator:requests_failed_total", "counter", st.failed)
        # the host's time for real tier reads, beside the modeled times (not in them)
        metric("emulator:tier_io_seconds_total", "counter", st.io_seconds)
        metric("emulator:tier_io_overrun_seconds_total", "counter", st.io_overrun_seconds)
        metric("emulator:tier_io_overruns_total", "counter", st.io_overruns)
        # chunks the corrupt_rate fault stored with altered bytes
        metric("emulator:corrupted_chunks_total", "counter", self.cache.corrupted_chunks)
        metric("vllm:prefix_cache_queries_total", "counter", st.queries)
        metric("vllm:prefix_cache_hits_total", "counter", 0)
        metric("vllm:external_prefix_cache_queries_total", "counter", st.ext_queries)
        metric("vllm:external_prefix_cache_hits_total", "counter", st.ext_hits)
        out.append("# TYPE vllm:prompt_tokens_by_source_total counter")
        for src, v in (("local_compute", st.local_compute), ("local_cache_hit", 0),
                       ("external_kv_transfer", st.ext_hits)):
            out.append(f'vllm:prompt_tokens_by_source_total{{{lab},source="{src}"}} {v}')
        out.extend(st.ttft.lines("vllm:time_to_first_token_seconds", lab))
        out.extend(st.itl.lines("vllm:inter_token_latency_seconds", lab))
        if self.cache.enabled:
            metric("lmcache:num_requested_tokens_total", "counter", st.lm_requested)
            metric("lmcache:num_hit_tokens_total", "counter", st.lm_hit)
            metric("lmcache:num_stored_tokens_total", "counter", st.lm_stored)
            rate = st.lm_hit / st.lm_requested if st.lm_requested else 0.0
            metric("lmcache:retrieve_hit_rate", "gauge", rate)
            usage = self.cache.modeled_usage()
            if self.tier_name == "cpu":
                metric("lmcache:local_cpu_usage", "gauge", usage)
            elif self.tier_name == "waterfall":
                tier = self.cache.tier
                metric("lmcache:local_cpu_usage", "gauge", round(tier.upper.usage() / self.cache.payload_scale))
                metric("lmcache:local_disk_usage", "gauge", round(tier.lower.usage() / self.cache.payload_scale))
            elif self.tier_name == "redis":
                metric("lmcache:local_cpu_usage", "gauge", 0)
                metric("lmcache:remote_storage_usage", "gauge", usage)
            else:
                metric("lmcache:local_cpu_usage", "gauge", 0)
                metric("lmcache:local_disk_usage", "gauge", usage)
            out.append("# TYPE emulator:tier_hit_tokens_total counter")
            out.extend(f'emulator:tier_hit_tokens_total{{{lab},tier="{tier}"}} {n}'
                       for tier, n in sorted(st.tier_hits.items()))
            metric("emulator:tier_stored_bytes", "gauge", self.cache.usage())
            metric("emulator:tier_chunks", "gauge", len(self.cache.tier))
        return web.Response(text="\n".join(out) + "\n",
                            content_type="text/plain", charset="utf-8")


def create_app(settings: Settings) -> web.Application:
    """The aiohttp application serving one emulated model."""
    emu = Emulator(settings)
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[_limits(settings.max_header_bytes)])
    app["emulator"] = emu
    app.on_startup.append(emu.startup)
    app.on_shutdown.append(emu.shutdown)
    r = app.router
    r.add_get("/health", emu.health)
    r.add_get("/version", emu.version)
    r.add_get("/v1/models", emu.models)
    r.add_post("/tokenize", emu.tokenize)
    r.add_post("/detokenize", emu.detokenize)
    r.add_post("/v1/completions", emu.completions)
    r.add_post("/v1/chat/completions", emu.chat_completions)
    r.add_get("/metrics", emu.metrics)
    r.add_post("/reset_prefix_cache", emu.reset_prefix_cache)
    return app
