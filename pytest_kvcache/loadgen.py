"""The load generator: async streaming requests -> :class:`RequestRecord`.

Measuring rules (docs/measuring.md):

* Request bodies are encoded before the round starts, so JSON encoding is never
  inside a measured interval.
* A request's clock starts (``time.perf_counter()``) after it holds its concurrency
  slot, inside ``StreamConnection.send`` right before its own write; the wait for
  the slot is kept apart as queue time, counted from when the request was due (its
  scheduled arrival), not from when its coroutine got around to it.
* Every network read is stamped with when it reached this host: the kernel's
  receive time on plain HTTP on Linux, else ``perf_counter`` first thing in the read
  callback (see ``_http`` and ``_sockio``; httpx added 1.5-2 ms per read). Every SSE
  event completed by that read gets its stamp, with its token count (from
  ``continuous_usage_stats`` when the server sends them, else one per event). Events
  are decoded once the response is complete, in slices of a few events between the
  loop's reads, so per-chunk work never holds other streams' reads. The round records
  which stamps it used (``RoundResult.client_stamps``).
* The connection pool is opened before the round (one connection per slot), so a
  measured request never pays for a TCP handshake.
* The guard: a round is invalid, with the reason, when (a) its reads were stamped in
  Python (no kernel stamps) and the 99th percentile of the event-loop lag exceeds
  ``max_loop_lag_ms`` or 5% of the median TTFT, whichever is larger (such a stamp can be
  late by the lag at its moment); (b) at a concurrency above 1, while requests waited
  for a slot, the time-weighted number in flight fell below ``min_concurrency_ratio``
  of the cap; (c) with a request rate, the delivered rate fell below
  ``min_rate_ratio`` of the seeded schedule's. Garbage collection is off during a
  round so that its pauses do not land in a stamp.
* Errors (HTTP status, timeouts, broken or malformed streams) become failed records
  with the reason; nothing raises out of a round.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from typing_extensions import Self

from ._http import HTTPStreamError, StreamConnection, StreamPool, split_events
from .metrics import percentile, summarize
from .models import DEFAULT_CLIENT_FLOOR, RequestRecord, RoundResult
from .workloads import Prompt

__all__ = ["LoadSpec", "open_client", "open_pool", "run_round"]

@dataclass(frozen=True)
class LoadSpec:
    """How to send one round of prompts.

    ``burstiness`` shapes request-rate arrivals as in ``vllm bench serve``: 1.0 is a
    Poisson process, other values gamma-distributed gaps with that shape (smaller is
    burstier), mean ``1/request_rate`` either way. ``min_concurrency_ratio`` and
    ``min_rate_ratio`` are the client guard's floors for delivered vs configured
    concurrency (while requests waited for a slot) and delivered vs scheduled rate.
    """

    model: str
    api: str = "completions"
    max_concurrency: int = 16
    request_rate: float = math.inf
    seed: int = 0
    timeout_s: float = 600.0
    max_loop_lag_ms: float = 20.0
    ignore_eos: bool = True
    burstiness: float = 1.0
    min_concurrency_ratio: float = DEFAULT_CLIENT_FLOOR
    min_rate_ratio: float = DEFAULT_CLIENT_FLOOR
    #: vLLM's ``cache_salt`` on every request (the control round's, outputs.py): requests
    #: of another salt share no cached prefix with these
    cache_salt: str | None = None


def open_client(base_url: str, timeout_s: float = 120.0):
    """An httpx client for the control plane (tokenize, metrics, models), not for load."""
    import httpx

    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=10.0))


def open_pool(base_url: str, max_concurrency: int, *, kernel_stamps: bool = True) -> StreamPool:
    """The measured requests' connections: one per concurrency slot (see _http).

    ``kernel_stamps=False`` stamps reads in Python on arrival even where the kernel
    could (to measure what kernel stamps change)."""
    return StreamPool(base_url, max_concurrency, kernel_stamps=kernel_stamps)


def _body(spec: LoadSpec, prompt: Prompt) -> bytes:
    payload: dict = {
        "model": spec.model,
        "max_tokens": prompt.output_len,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": spec.ignore_eos,
        "temperature": 0.0,  # greedy: an answer is a function of the prompt's KV (outputs.py)
        "seed": spec.seed,
    }
    if spec.cache_salt is not None:
        payload["cache_salt"] = spec.cache_salt
    if spec.api == "chat":
        payload["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        payload["prompt"] = prompt.text if prompt.token_ids is None else list(prompt.token_ids)
    return json.dumps(payload).encode()


def _path(api: str) -> str:
    return "/v1/chat/completions" if api == "chat" else "/v1/completions"


class _LagMonitor:
    """Samples how late the event loop runs what became ready; late means late stamps.

    Every ``interval`` it measures two things and keeps the larger: how late its timer
    woke (beyond the millisecond asyncio's ``epoll`` rounds a sleep up to), and how long
    a callback made ready at that moment waited to run (one ``sleep(0)``), which is
    what a socket that became readable then waits before ``data_received`` stamps it.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        perf = time.perf_counter
        while True:
            target = perf() + self.interval
            await asyncio.sleep(self.interval)
            woke = perf()
            await asyncio.sleep(0)
            ready_wait = perf() - woke
            self.lags.append(max(0.0, woke - target - 0.001, ready_wait))

    def percentile_ms(self, q: float) -> float:
        return percentile(sorted(self.lags), q) * 1000.0 if self.lags else 0.0

    def __enter__(self) -> Self:
        self._gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        if self._gc_was_enabled:
            gc.enable()


class _StreamError(Exception):
    pass


def _payloads(events) -> tuple[list[bytes], list[float], bool]:
    """The ``data:`` payloads of SSE events with their stamps, and whether [DONE] came."""
    payloads: list[bytes] = []
    stamps: list[float] = []
    done = False
    for stamp, event in events:
        if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
            payload = event[6:]
            if payload == b"[DONE]":
                done = True
                continue
            payloads.append(payload)
            stamps.append(stamp)
            continue
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            payloads.append(payload)
            stamps.append(stamp)
    return payloads, stamps, done


def _load_all(payloads: list[bytes]) -> list:
    """JSON-decode every payload: one ``json.loads`` over all of them (the per-call
    overhead is most of the cost of a small chunk), one by one where that fails."""
    if not payloads:
        return []
    try:
        objs = json.loads(b"[" + b",".join(payloads) + b"]")
        if len(objs) == len(payloads):
            return objs
    except ValueError:
        pass
    objs = []
    for payload in payloads:
        try:
            objs.append(json.loads(payload))
        except ValueError:
            raise _StreamError(f"malformed SSE event: {payload[:120]!r}") from None
    return objs


#: SSE events (and reads) decoded between two checks of the decoder's time budget:
#: an event takes ~7 us to split and decode
DECODE_SLICE = 16


def _decode(pieces, chunk_times: list[float], chunk_tokens: list[int], usage_seen: dict,
            extras: dict, texts: list[str] | None = None) -> Generator[None, None, tuple[bool, bytes]]:
    """Read a response's ``(stamp, body bytes)`` reads into the lists; returns whether
    ``data: [DONE]`` was seen and the bytes after the last complete SSE event.

    A generator: it yields after every ``DECODE_SLICE`` reads or events so that a long
    response (a thousand tokens take ~7 ms to decode) never holds the event loop
    between other streams' reads. A chunk's token count comes from
    ``continuous_usage_stats`` when the server sends them (a chunk may carry several
    tokens), else 1 per chunk with text. ``texts`` receives each chunk's text.
    """
    seen_completion = 0
    done = False
    rest = b""
    for lo in range(0, len(pieces), DECODE_SLICE):
        events, rest = split_events(pieces[lo:lo + DECODE_SLICE], rest)
        payloads, stamps, saw_done = _payloads(events)
        done = done or saw_done
        for first in range(0, len(payloads), DECODE_SLICE):  # reads that piled up many events
            if first:
                yield
            part = payloads[first:first + DECODE_SLICE]
            for stamp, obj, payload in zip(stamps[first:first + DECODE_SLICE], _load_all(part), part):
                if not isinstance(obj, dict):
                    raise _StreamError(f"malformed SSE event: {payload[:120]!r}")
                if "error" in obj and not obj.get("choices"):
                    raise _StreamError(f"server error in stream: {str(obj['error'])[:200]}")
                usage = obj.get("usage")
                text = ""
                for choice in obj.get("choices") or ():
                    if isinstance(choice, dict):
                        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if usage:
                    usage_seen.update({k: v for k, v in usage.items() if v is not None})
                if "server_timing" in obj:
                    extras["server_timing"] = obj["server_timing"]
                if text:
                    chunk_times.append(stamp)
                    if texts is not None:
                        texts.append(text)
                    completion = (usage or {}).get("completion_tokens")
                    if completion is not None:
                        chunk_tokens.append(max(completion - seen_completion, 1))
                        seen_completion = completion
                    else:
                        chunk_tokens.append(1)
        yield
    return done, rest


class _Decoder:
    """Decodes finished responses in small slices between the event loop's reads.

    asyncio runs every ready callback before it polls the sockets again, so if 128
    streams that finished together each decoded their events in their own coroutine,
    the reads (and stamps) of every other stream would wait for all 128 decodes. Here
    one task runs the decodes, each a generator that yields between slices of a
    response, and after ``budget_s`` of work gives the loop a pass (``sleep(0)``
    queues it behind the reads of the next pass).
    """

    def __init__(self, budget_s: float = 0.0002) -> None:
        self.budget_s = budget_s
        self._queue: list[tuple[Generator[None, None, object], asyncio.Future]] = []
        self._wake: asyncio.Future | None = None
        self._task: asyncio.Task | None = None

    async def run(self, steps: Generator[None, None, object]):
        """The generator's return value once it has run to its end."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((steps, fut))
        if self._task is None:
            self._task = asyncio.ensure_future(self._loop())
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return await fut

    async def _loop(self) -> None:
        perf = time.perf_counter
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not queue:
                self._wake = loop.create_future()
                await self._wake
                continue
            t = perf()
            while queue:
                steps, fut = queue[0]
                try:
                    next(steps)
                except StopIteration as stop:
                    queue.pop(0)
                    if not fut.done():
                        fut.set_result(stop.value)
                except Exception as exc:  # noqa: BLE001 - handed to the request that waits for it
                    queue.pop(0)
                    if not fut.done():
                        fut.set_exception(exc)
                if perf() - t > self.budget_s:
                    break
            await asyncio.sleep(0)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass
class _Answer:
    """What a response's events said, filled in as they are decoded."""

    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


async def _one_request(pool: StreamPool, spec: LoadSpec, index: int, prompt: Prompt, request: bytes,
                       scheduled: float, slots: asyncio.Semaphore, track: _Tracker, decoder: _Decoder,
                       on_done: Callable[[], None] | None) -> RequestRecord:
    error = None
    queued = slots.locked()
    if queued:
        track.waiting(index, time.perf_counter())
    async with slots:
        conn = None
        start = None
        try:
            conn = await pool.acquire()
            start = conn.send(request)  # the stamp is taken right before its own write
            if sys.version_info >= (3, 11):
                async with asyncio.timeout(spec.timeout_s):
                    await conn.wait()
            else:  # asyncio.timeout is 3.11's; wait_for costs a task per request
                await asyncio.wait_for(conn.wait(), spec.timeout_s)
        except HTTPStreamError as exc:
            error = str(exc)
        except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on
            error = f"timeout: no complete response within {spec.timeout_s:g}s"
        except OSError as exc:
            error = f"connection error: {exc}"
        end = time.perf_counter()
        if start is None:
            start = end
        done_at, status, pieces, error = _hand_back(pool, conn, end, error)
    track.ran(index, start, done_at, queued)
    answer, error = await _read_answer(status, pieces, error, decoder)
    if "server_timing" in answer.extras:
        track.server_timing[index] = answer.extras["server_timing"]
    if on_done is not None:
        on_done()
    return RequestRecord(
        index=index,
        prompt_len=prompt.input_len,
        output_len_requested=prompt.output_len,
        scheduled=scheduled,
        start=start,
        end=end,
        chunk_times=tuple(answer.chunk_times),
        chunk_tokens=tuple(answer.chunk_tokens),
        prompt_tokens_reported=answer.usage.get("prompt_tokens"),
        output_tokens_reported=answer.usage.get("completion_tokens"),
        error=error,
        text="".join(answer.texts),
        first_chars=len(answer.texts[0]) if answer.texts else 0,
    )


def _hand_back(pool: StreamPool, conn: StreamConnection | None, end: float, error: str | None
               ) -> tuple[float, int | None, list, str | None]:
    """Return the connection to the pool (before any decoding, so the slot moves on);
    returns when the response's last byte arrived, its status, its reads and the error."""
    if conn is None:
        return end, None, [], error
    pieces = conn.pieces
    done_at = min(end, pieces[-1][0]) if pieces else end
    if error is None and conn.error:
        error = conn.error
    status = conn.status
    pool.release(conn)
    return done_at, status, pieces, error


async def _read_answer(status: int | None, pieces: list, error: str | None, decoder: _Decoder
                       ) -> tuple[_Answer, str | None]:
    """The response's events decoded (a 200) or its body as the error (another status)."""
    answer = _Answer()
    if status is not None and status != 200:
        if error is None or error.startswith("connection closed"):
            body = b"".join(p for _, p in pieces).decode("utf-8", "replace")
            error = f"HTTP {status}: {body[:300]}"
    elif status == 200:
        try:
            await decoder.run(_decode_answer(pieces, answer))
        except _StreamError as exc:
            if error is None:
                error = str(exc)
    return answer, error


def _decode_answer(pieces: list, answer: _Answer) -> Generator[None, None, None]:
    """:func:`_decode` into ``answer``; a stream cut short or without text is an error."""
    finished, rest = yield from _decode(pieces, answer.chunk_times, answer.chunk_tokens, answer.usage,
                                        answer.extras, answer.texts)
    if rest.strip():
        raise _StreamError(f"stream ended inside an SSE event: {rest[:120]!r}")
    if not finished:
        raise _StreamError("stream ended before [DONE]")
    if not answer.chunk_times:
        raise _StreamError("stream finished without any text")


class _Tracker:
    """What the guard needs besides the records: who queued for a slot, and when the
    last byte of each response arrived (the request left the server's hands)."""

    def __init__(self) -> None:
        self.wait_from: dict[int, float] = {}
        self.runs: list[tuple[float, float]] = []
        self.wait_spans: list[tuple[float, float]] = []
        self.issued: dict[int, float] = {}
        self.server_timing: dict[int, dict] = {}

    def waiting(self, index: int, t: float) -> None:
        self.wait_from[index] = t

    def ran(self, index: int, start: float, done_at: float, queued: bool) -> None:
        self.runs.append((start, max(start, done_at)))
        if queued:
            self.wait_spans.append((self.wait_from.get(index, start), start))


def _delivered_concurrency(runs: Sequence[tuple[float, float]], waits: Sequence[tuple[float, float]]
                           ) -> tuple[float | None, float]:
    """Time-weighted requests in flight over the time some request waited for a slot.

    Returns (mean in flight while requests waited, seconds with a request waiting).
    """
    events: list[tuple[float, int, int]] = []
    for a, b in runs:
        events.append((a, 0, 1))
        events.append((b, 0, -1))
    for a, b in waits:
        if b > a:
            events.append((a, 1, 1))
            events.append((b, 1, -1))
    if not any(kind == 1 for _, kind, _ in events):
        return None, 0.0
    events.sort()
    in_flight = waiting = 0
    last = events[0][0]
    area = span = 0.0
    for t, kind, delta in events:
        if waiting > 0:
            dt = t - last
            area += dt * in_flight
            span += dt
        last = t
        if kind == 0:
            in_flight += delta
        else:
            waiting += delta
    if span <= 0:
        return None, 0.0
    return area / span, span


def _arrival_offsets(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Arrival offsets at ``rate`` per second (all at 0 when the rate is infinite).

    Poisson (exponential gaps) for burstiness 1, else gamma gaps with shape
    ``burstiness`` and mean ``1/rate``, as ``vllm bench serve`` draws them; seeded.
    """
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request_rate and burstiness must be positive")
    rng = random.Random(f"arrivals:{seed}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        if burstiness == 1.0:
            t += rng.expovariate(rate)
        else:
            t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


async def run_round(pool: StreamPool, spec: LoadSpec, prompts: Sequence[Prompt], round_name: str,
                    on_request_done: Callable[[], None] | None = None, *,
                    server_timings: dict | None = None, arrival_offsets: Sequence[float] | None = None,
                    start_at: float | None = None) -> RoundResult:
    """Send ``prompts`` with the spec's concurrency cap and rate; never raises for a request.

    ``server_timings``, when given a dict, receives each request's ``server_timing``
    object (sent by the reference server) under the request's index.
    ``arrival_offsets`` replaces the schedule drawn from the spec (one offset per
    prompt, seconds from the start), and ``start_at`` (a ``perf_counter`` time) is
    where the round's clock starts: client processes sharing one round
    (:mod:`~pytest_kvcache.spread`) each send their share of one schedule.
    """
    path = _path(spec.api)
    requests = [pool.request_bytes(path, _body(spec, p)) for p in prompts]
    try:
        await pool.open()
    except OSError:
        pass  # each request tries to connect again and records the error
    slots = asyncio.Semaphore(spec.max_concurrency)
    offsets = (list(arrival_offsets) if arrival_offsets is not None
               else _arrival_offsets(len(prompts), spec.request_rate, spec.seed, spec.burstiness))
    if len(offsets) != len(prompts):
        raise ValueError(f"{len(offsets)} arrival offsets for {len(prompts)} prompts")
    track = _Tracker()
    decoder = _Decoder()
    perf = time.perf_counter

    async def scheduled_request(i: int, t0: float) -> RequestRecord:
        due = t0 + offsets[i]
        delay = due - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        track.issued[i] = perf()
        # the request's clock for queue time starts when it was due, not when the
        # coroutine got around to it
        return await _one_request(pool, spec, i, prompts[i], requests[i], due, slots, track, decoder,
                                  on_request_done)

    if start_at is not None and start_at > perf():
        await _sleep_until(start_at)
    with _LagMonitor() as lag:
        t0 = perf() if start_at is None else start_at
        try:
            records = await asyncio.gather(*(scheduled_request(i, t0) for i in range(len(prompts))))
        finally:
            decoder.close()
        # the round ends with the last byte of its last response: decoding what arrived
        # is the client's work, not the server's, and must not lower the throughputs
        finished = max((done for _, done in track.runs), default=None)
        duration = finished - t0 if finished is not None and finished > t0 else perf() - t0
    summary = summarize(records, duration)
    reasons = [reason for reason in (_lag_check(summary, lag.percentile_ms(99), spec, pool.kernel_stamps),
                                     _concurrency_check(summary, track, spec),
                                     _rate_check(summary, track, offsets, t0, spec))
               if reason is not None]
    if server_timings is not None:
        server_timings.update(track.server_timing)
    return RoundResult(
        round=round_name,
        records=tuple(records),
        duration=duration,
        summary=summary,
        max_loop_lag_ms=lag.percentile_ms(100),
        invalid_reason="; ".join(reasons) or None,
        client_stamps="kernel" if pool.kernel_stamps else "user",
    )


async def _sleep_until(start_at: float) -> None:
    perf = time.perf_counter
    await asyncio.sleep(max(0.0, start_at - perf() - 0.002))
    while perf() < start_at:  # the last 2 ms in small steps: asyncio's sleep is ms-coarse
        await asyncio.sleep(0)


def _lag_check(summary: dict, p99_lag: float, spec: LoadSpec, kernel_stamps: bool) -> str | None:
    """Guard (a): the event loop's lag, where it can make a stamp late."""
    limit = max(spec.max_loop_lag_ms, 0.05 * (summary["median_ttft_ms"] or 0.0))
    summary["loop_lag_p99_ms"] = p99_lag
    # With the kernel's receive stamps a late loop no longer makes a stamp late (a start
    # stamp is taken at the send itself); what lag still costs, fewer requests in flight,
    # the delivered-load checks see.
    if p99_lag > limit and not kernel_stamps:
        return (f"the client's event loop lagged {p99_lag:.1f} ms at the 99th percentile (limit {limit:.1f} ms): "
                "timestamps may be late; reduce concurrency or spread the load over client processes "
                "(--kv-client-processes)")
    return None


def _concurrency_check(summary: dict, track: _Tracker, spec: LoadSpec) -> str | None:
    """Guard (b): the requests in flight while requests waited for a slot."""
    delivered, wait_span = _delivered_concurrency(track.runs, track.wait_spans)
    summary["configured_concurrency"] = spec.max_concurrency
    summary["delivered_concurrency"] = delivered
    summary["concurrency_ratio"] = None if delivered is None else delivered / spec.max_concurrency
    # At concurrency 1 nothing queues on the server: a gap between one request and the
    # next changes no request's latency, so only higher concurrencies are held to the floor.
    if (spec.max_concurrency > 1 and delivered is not None and wait_span > 0.001
            and delivered < spec.min_concurrency_ratio * spec.max_concurrency):
        return (f"the client delivered {delivered:.1f} requests in flight on average while requests waited "
                f"for a slot, configured {spec.max_concurrency} (floor {spec.min_concurrency_ratio:.0%}): "
                "it could not start requests fast enough")
    return None


def _rate_check(summary: dict, track: _Tracker, offsets: Sequence[float], t0: float, spec: LoadSpec
                ) -> str | None:
    """Guard (c): the delivered request rate against the seeded schedule's."""
    if math.isinf(spec.request_rate):
        return None
    summary["configured_request_rate"] = spec.request_rate
    issued = [track.issued[i] for i in range(len(offsets)) if i in track.issued]
    lateness = sorted(track.issued[i] - (t0 + offsets[i]) for i in track.issued)
    summary["p99_arrival_lateness_ms"] = percentile(lateness, 99) * 1000.0 if lateness else None
    planned_span = offsets[-1] - offsets[0] if offsets else 0.0
    actual_span = (max(issued) - min(issued)) if len(issued) > 1 else 0.0
    if len(issued) <= 1 or planned_span <= 0 or actual_span <= 0:
        return None
    intended = (len(issued) - 1) / planned_span
    delivered_rate = (len(issued) - 1) / actual_span
    summary["scheduled_request_rate"] = intended
    summary["delivered_request_rate"] = delivered_rate
    summary["request_rate_ratio"] = delivered_rate / intended
    if delivered_rate < spec.min_rate_ratio * intended:
        return (f"the client issued {delivered_rate:.2f} requests/s against a schedule of "
                f"{intended:.2f}/s (configured {spec.request_rate:g}/s, floor "
                f"{spec.min_rate_ratio:.0%}): it could not keep up with the arrival rate")
    return None
