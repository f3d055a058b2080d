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
deadline does the first token wait for it (an *overrun*).  So modeled times do not depend on
the host: its I/O time is reported beside the model (``emulator:tier_io_seconds_total``,
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
step (see :class:`.scheduler.BatchedScheduler`).  In the ``fixed`` profile every request is
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
``cache_salt`` (as vLLM's: a non-empty string; here at most :data:`.prompts.MAX_CACHE_SALT_CHARS`, else
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

The parts, one concern each (this module composes them): :mod:`.settings` (what the
emulator is configured with), :mod:`.http` (the aiohttp handlers, request limits, the
token stream), :mod:`.prompts` (a request's prompt and options, checked), :mod:`.scheduler`
(fixed, FIFO and batched scheduling on the virtual clock), :mod:`.offload` (the tier's real
I/O around the prefix cache), :mod:`.answer` (the answer's words and JSON shapes),
:mod:`.faults` (the request faults), :mod:`.metrics` (the counters and ``GET /metrics``),
and below them :mod:`.prefix_cache`, :mod:`.tiers` (its Redis client in
:mod:`pytest_kvcache._resp`), :mod:`.costmodel`,
:mod:`.tokenizer`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web

from .faults import Faults
from .http import OpenAIRoutes, limits_middleware
from .metrics import Stats
from .offload import Offload
from .prefix_cache import PrefixCache
from .prompts import PromptReader
from .scheduler import make_scheduler
from .settings import Settings
from .tiers import make_tier
from .tokenizer import get_tokenizer

__all__ = ["Emulator", "create_app"]

log = logging.getLogger("pytest_kvcache.emulator")


def _make_cache(settings: Settings) -> PrefixCache:
    """The prefix cache over the tier of ``--backend``, sized in GB of the real model's KV."""
    s = settings
    gb = {"cpu": s.cpu_size_gb, "waterfall": s.cpu_size_gb, "redis": s.redis_size_gb}.get(s.backend, s.disk_size_gb)
    tier = make_tier(s.backend, capacity_bytes=int(gb * 1e9 * s.payload_scale), disk_path=s.disk_path,
                     use_odirect=s.use_odirect, redis_url=s.redis_url,
                     redis_prefix=f"kvem@{s.model}@{s.chunk_size}@",
                     lower_capacity_bytes=int(s.disk_size_gb * 1e9 * s.payload_scale))
    return PrefixCache(tier, chunk_size=s.chunk_size, kv_bytes_per_token=s.profile.kv_bytes_per_token,
                       payload_scale=s.payload_scale, namespace=s.model, read_delay_s=s.read_delay_ms / 1000.0,
                       corrupt_rate=s.corrupt_rate, seed=s.seed)


class Emulator:
    """One emulated server: its tokenizer, prefix cache and offload, scheduler, faults and counters."""

    def __init__(self, settings: Settings) -> None:
        settings.check()
        self.s = settings
        self.tok = get_tokenizer(settings.vocab_size)
        self.tok.enable_fast()
        self.cache = _make_cache(settings)
        self.stats = Stats()
        self.offload = Offload(self.cache, settings.backend, settings.offload_disabled, self.stats)
        self.scheduler = make_scheduler(settings, self.offload, self.stats)
        self.prompts = PromptReader(settings, self.tok, self.cache)
        self.faults = Faults(settings, self.stats)
        self.active: set[asyncio.Task] = set()  # handlers generating tokens
        self._seq = 0
        self._rid_prefix = os.urandom(4).hex()

    def next_rid(self, prefix: str) -> tuple[str, int]:
        """A new request's id and number (from 1, in order of arrival)."""
        self._seq += 1
        return f"{prefix}-{self._rid_prefix}{self._seq:08x}", self._seq

    def abort_requests(self) -> int:
        """Cancel every request in flight (used on SIGTERM); return how many."""
        tasks = [t for t in self.active if not t.done()]
        for t in tasks:
            t.cancel()
        return len(tasks)

    async def startup(self, app: web.Application) -> None:
        if self.s.corrupt_rate and self.cache.enabled:
            log.warning("fault injection: %g of offloaded chunks are stored with altered bytes under a valid CRC "
                        "(--corrupt-rate); warm answers that load them differ from the cold ones",
                        self.s.corrupt_rate)
        self.scheduler.start()

    async def shutdown(self, app: web.Application) -> None:
        await self.scheduler.stop()
        await self.offload.close()


def create_app(settings: Settings) -> web.Application:
    """The aiohttp application serving one emulated model."""
    emu = Emulator(settings)
    app = web.Application(client_max_size=settings.limits.max_body_bytes,
                          middlewares=[limits_middleware(settings.limits.max_header_bytes)])
    app["emulator"] = emu
    app.on_startup.append(emu.startup)
    app.on_shutdown.append(emu.shutdown)
    OpenAIRoutes(emu).add_to(app)
    return app
