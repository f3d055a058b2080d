"""The load generator: async streaming requests -> :class:`RequestRecord`.

Measuring rules (DESIGN.md section 3):

* Request bodies are encoded before the round starts, so JSON encoding is never
  inside a measured interval.
* A request's clock starts (``time.perf_counter()``) after it holds its concurrency
  slot, just before it is sent; the wait for the slot is kept apart as queue time.
* Every network read is stamped on arrival, in the protocol callback (see
  ``_http``: httpx added 1.5-2 ms per read); every SSE event completed by that read
  gets its stamp, with its token count (from ``continuous_usage_stats`` when the
  server sends them, else one per event).
* The connection pool is opened before the round (one connection per slot), so a
  measured request never pays for a TCP handshake.
* An event-loop lag monitor runs during the round. A stamp can be late by the lag at
  its moment, so the round is invalid when the 99th percentile of the lag exceeds
  ``max_loop_lag_ms`` or 5% of the median TTFT, whichever is larger. Garbage
  collection is frozen during a round so that its pauses do not land in a stamp.
* Errors (HTTP status, timeouts, broken or malformed streams) become failed records
  with the reason; nothing raises out of a round.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ._http import HTTPStreamError, StreamPool
from .metrics import percentile, summarize
from .models import RequestRecord, RoundResult
from .workloads import Prompt

__all__ = ["LoadSpec", "open_client", "open_pool", "run_round"]


@dataclass(frozen=True)
class LoadSpec:
    """How to send one round of prompts."""

    model: str
    api: str = "completions"
    max_concurrency: int = 16
    request_rate: float = math.inf
    seed: int = 0
    timeout_s: float = 600.0
    max_loop_lag_ms: float = 20.0
    ignore_eos: bool = True


def open_client(base_url: str, timeout_s: float = 120.0):
    """An httpx client for the control plane (tokenize, metrics, models), not for load."""
    import httpx

    return httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=10.0))


def open_pool(base_url: str, max_concurrency: int) -> StreamPool:
    """The measured requests' connections: one per concurrency slot (see _http)."""
    return StreamPool(base_url, max_concurrency)


def _body(spec: LoadSpec, prompt: Prompt) -> bytes:
    payload: dict = {
        "model": spec.model,
        "max_tokens": prompt.output_len,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": spec.ignore_eos,
        "temperature": 0.0,
    }
    if spec.api == "chat":
        payload["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        payload["prompt"] = prompt.text
    return json.dumps(payload).encode()


def _path(api: str) -> str:
    return "/v1/chat/completions" if api == "chat" else "/v1/completions"


class _LagMonitor:
    """Samples how late the event loop wakes up; late wake-ups mean late stamps."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            target = time.perf_counter() + self.interval
            await asyncio.sleep(self.interval)
            # asyncio rounds sleeps up to the next millisecond; lag beyond that is ours
            self.lags.append(max(0.0, time.perf_counter() - target - 0.001))

    def percentile_ms(self, q: float) -> float:
        return percentile(sorted(self.lags), q) * 1000.0 if self.lags else 0.0

    def __enter__(self) -> "_LagMonitor":
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


async def _one_request(pool: StreamPool, spec: LoadSpec, index: int, prompt: Prompt, request: bytes,
                       scheduled: float, slots: asyncio.Semaphore,
                       on_done: Callable[[], None] | None) -> RequestRecord:
    async with slots:
        chunk_times: list[float] = []
        chunk_tokens: list[int] = []
        usage_seen: dict = {}
        error = None
        conn = await pool.acquire()
        start = time.perf_counter()
        try:
            await asyncio.wait_for(
                _exchange(conn, spec, request, chunk_times, chunk_tokens, usage_seen), spec.timeout_s)
        except (_StreamError, HTTPStreamError) as exc:
            error = str(exc)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            error = f"timeout: {exc or f'request took longer than {spec.timeout_s:g}s'}"
        except OSError as exc:
            error = f"connection error: {exc}"
        end = time.perf_counter()
        pool.release(conn)
    if on_done is not None:
        on_done()
    return RequestRecord(
        index=index,
        prompt_len=prompt.input_len,
        output_len_requested=prompt.output_len,
        scheduled=scheduled,
        start=start,
        end=end,
        chunk_times=tuple(chunk_times),
        chunk_tokens=tuple(chunk_tokens),
        prompt_tokens_reported=usage_seen.get("prompt_tokens"),
        output_tokens_reported=usage_seen.get("completion_tokens"),
        error=error,
    )


async def _exchange(conn, spec: LoadSpec, request: bytes, chunk_times: list[float], chunk_tokens: list[int],
                    usage_seen: dict) -> None:
    """Send one request and read its SSE stream into the lists (stamps from arrival)."""
    conn.send(request)
    status = await conn.status(spec.timeout_s)
    if status != 200:
        body = (await conn.body(spec.timeout_s)).decode("utf-8", "replace")
        raise _StreamError(f"HTTP {status}: {body[:300]}")
    done = False
    seen_completion = 0
    async for stamp, event in conn.events(spec.timeout_s):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                raise _StreamError(f"malformed SSE event: {payload[:120]!r}") from None
            if not isinstance(obj, dict):
                raise _StreamError(f"malformed SSE event: {payload[:120]!r}")
            if "error" in obj and not obj.get("choices"):
                raise _StreamError(f"server error in stream: {str(obj['error'])[:200]}")
            usage = obj.get("usage")
            text = ""
            for choice in obj.get("choices") or ():
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if usage:
                usage_seen.update({k: v for k, v in usage.items() if v is not None})
            if text:
                chunk_times.append(stamp)
                completion = (usage or {}).get("completion_tokens")
                if completion is not None:
                    # continuous_usage_stats: a chunk may carry several tokens
                    chunk_tokens.append(max(completion - seen_completion, 1))
                    seen_completion = completion
                else:
                    chunk_tokens.append(1)
    if not done:
        raise _StreamError("stream ended before [DONE]")
    if not chunk_times:
        raise _StreamError("stream finished without any text")


class _StreamError(Exception):
    pass


def _arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Poisson arrivals at ``rate`` per second (all at 0 when the rate is infinite)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_round(pool: StreamPool, spec: LoadSpec, prompts: Sequence[Prompt], round_name: str,
                    on_request_done: Callable[[], None] | None = None) -> RoundResult:
    """Send ``prompts`` with the spec's concurrency cap and rate; never raises for a request."""
    path = _path(spec.api)
    requests = [pool.request_bytes(path, _body(spec, p)) for p in prompts]
    await pool.open()
    slots = asyncio.Semaphore(spec.max_concurrency)
    offsets = _arrival_offsets(len(prompts), spec.request_rate, spec.seed)

    async def scheduled_request(i: int, t0: float) -> RequestRecord:
        delay = t0 + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return await _one_request(pool, spec, i, prompts[i], requests[i], time.perf_counter(), slots,
                                  on_request_done)

    with _LagMonitor() as lag:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(scheduled_request(i, t0) for i in range(len(prompts))))
        duration = time.perf_counter() - t0
    summary = summarize(records, duration)
    p99_lag = lag.percentile_ms(99)
    limit = max(spec.max_loop_lag_ms, 0.05 * (summary["median_ttft_ms"] or 0.0))
    invalid = None
    if p99_lag > limit:
        invalid = (f"the client's event loop lagged {p99_lag:.1f} ms at the 99th percentile (limit {limit:.1f} ms): "
                   "timestamps may be late; reduce concurrency or spread the load over more client processes")
    return RoundResult(
        round=round_name,
        records=tuple(records),
        duration=duration,
        summary=summary,
        max_loop_lag_ms=lag.percentile_ms(100),
        invalid_reason=invalid,
    )
