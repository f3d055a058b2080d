"""Runs one scenario case against a server: trials of cold and warm rounds.

Each trial sends its own prompts (seeded by the trial index, the same in every run),
first in the cold round that fills the offload tier, then in the warm round that
should hit it. Server counters are scraped around every round (telemetry).

A case with ``warmup_requests`` sends that many other prompts before each round and
records nothing of them. Multi-turn prompts (``Prompt.turn``) are sent turn by turn
within a round: turn k of every conversation, then turn k+1, and the round's records
and summary cover all turns (its client guard figures are each the worst turn's).
Summaries carry the requested percentiles and, with SLOs, ``request_goodput``.
With ``client_processes`` above 1 every round, warm-ups included, is sent from that
many client processes (:mod:`~pytest_kvcache.spread`).

A case with given ``prompts`` (a benchmark written in Python) sends them in every trial:
text as it is, token ids as ids. :meth:`CaseRunner.send` sends one round of given
prompts through the same client and telemetry, for tests that build each round from
the last one's answers (``RoundResult.texts``).
"""

from __future__ import annotations

import asyncio
import math
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace

from ._http import StreamPool
from .loadgen import LoadSpec, open_client, open_pool, run_round
from .metrics import DEFAULT_PERCENTILES
from .metrics import summarize as summarize_records
from .models import DEFAULT_CLIENT_FLOOR, RequestRecord, RoundResult, ScenarioCase, TrialResult
from .outputs import CONTROL_ROUND
from .spread import ClientProcesses
from .telemetry import Snapshot, TelemetrySource, summarize
from .workloads import LocalTokenizer, Prompt, ServerTokenizer, build_prompts, build_random_prompts, check_model_len

__all__ = ["CaseRunner", "Progress", "parse_prometheus"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfaINFA]+)")

Progress = Callable[[str], None]


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of samples per metric name (labels folded), from Prometheus text format."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return totals


class CaseRunner:
    """Holds what survives between cases: the tokenizer choice and built prompts."""

    def __init__(self, tokenizer_path: str | None = None, prompt_cache_items: int = 64,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, client_processes: int = 1,
                 request_timeout: float = 600.0, client_floor: float = DEFAULT_CLIENT_FLOOR) -> None:
        self._percentiles = tuple(percentiles)
        self._request_timeout = request_timeout
        self._client_floor = client_floor
        self._client_processes = client_processes
        self._local = LocalTokenizer(tokenizer_path) if tokenizer_path else None
        self._tokenizer_source = tokenizer_path
        self._prompts: dict[tuple, list[Prompt]] = {}
        self._cache_items = prompt_cache_items

    def run(self, case: ScenarioCase, base_url: str, model: str, trials: Sequence[int],
            progress: Progress | None = None, telemetry: TelemetrySource | None = None,
            control_salt: Callable[[int], str] | None = None,
            after_round: Callable[[int, str], None] | None = None) -> tuple[TrialResult, ...]:
        """Run the trials with these indices (each index fixes its prompts).

        ``telemetry`` says where the server's metrics and logs are (default: its /metrics).
        With ``control_salt`` (trial index -> a salt), each trial ends with a control round:
        its prompts once more with that ``cache_salt``, recomputed (outputs.py).
        ``after_round(trial, round name)`` is called after every round, outside any measurement."""
        source = telemetry or TelemetrySource(metrics_urls=(f"{base_url.rstrip('/')}/metrics",))
        return _run_async(self._run(case, base_url, model, trials, progress or (lambda _: None), source,
                                     control_salt, after_round or (lambda trial, name: None)))

    async def _run(self, case: ScenarioCase, base_url: str, model: str, trials: Sequence[int],
                   progress: Progress, source: TelemetrySource,
                   control_salt: Callable[[int], str] | None,
                   after_round: Callable[[int, str], None]) -> tuple[TrialResult, ...]:
        spec = LoadSpec(model=model, api=case.api, max_concurrency=case.concurrency,
                        request_rate=case.request_rate, burstiness=case.burstiness, seed=case.seed,
                        timeout_s=self._request_timeout, min_concurrency_ratio=self._client_floor,
                        min_rate_ratio=self._client_floor)
        results = []
        pool = (open_pool(base_url, case.concurrency) if self._client_processes <= 1
                else ClientProcesses(base_url, case.concurrency, self._client_processes))
        try:
            async with open_client(base_url) as client:
                codec = self._local or ServerTokenizer(client, model)
                await check_model_len(client, model, case.name, dataset=case.dataset, input_len=case.input_len,
                                      output_len=case.output_len, num_prompts=case.num_prompts, options=case.options,
                                      warmup=bool(case.warmup_requests))
                for trial in trials:
                    prompts = await self._prompts_for(codec, case, trial, model)
                    warmup = await self._warmup_for(codec, case, trial, model)
                    rounds = []
                    for round_name in case.rounds:
                        tick = _Ticks(progress, f"trial {trial + 1} {round_name}", len(prompts))
                        if warmup:
                            progress(f"trial {trial + 1} {round_name}: {len(warmup)} warm-up requests")
                            await _send(pool, spec, warmup, "warmup")
                        before = await _snapshot(client, source)
                        result = await self._round(pool, spec, prompts, round_name, tick, case)
                        after = await _snapshot(client, source)
                        rounds.append(replace(result, telemetry=summarize(source, before, after)))
                        after_round(trial, round_name)
                    control = None
                    if control_salt is not None:
                        progress(f"trial {trial + 1} control: {len(prompts)} prompts recomputed (cache_salt)")
                        control = await self._round(pool, replace(spec, cache_salt=control_salt(trial)), prompts,
                                                    CONTROL_ROUND, lambda: None, case)
                        after_round(trial, CONTROL_ROUND)
                    results.append(TrialResult(index=trial, rounds=tuple(rounds), measure_round=case.measure_round,
                                               control=control))
        finally:
            pool.close()
        return tuple(results)

    def send(self, base_url: str, model: str, prompts: Sequence[str | Sequence[int]], *, output_len: int,
             concurrency: int, api: str = "completions", request_rate: float = math.inf, burstiness: float = 1.0,
             seed: int = 0, round_name: str = "custom", telemetry: TelemetrySource | None = None,
             progress: Progress | None = None) -> RoundResult:
        """One round of these prompts (text, or token ids sent as ids), measured as a case's
        rounds are, with the server's counters over it in ``telemetry``; no warm-ups, no
        hit check."""
        source = telemetry or TelemetrySource(metrics_urls=(f"{base_url.rstrip('/')}/metrics",))
        spec = LoadSpec(model=model, api=api, max_concurrency=concurrency, request_rate=request_rate,
                        burstiness=burstiness, seed=seed, timeout_s=self._request_timeout,
                        min_concurrency_ratio=self._client_floor, min_rate_ratio=self._client_floor)
        tick = _Ticks(progress or (lambda _: None), round_name, len(prompts))

        async def one_round() -> RoundResult:
            pool = (open_pool(base_url, concurrency) if self._client_processes <= 1
                    else ClientProcesses(base_url, concurrency, self._client_processes))
            try:
                async with open_client(base_url) as client:
                    given = await _given(self._local or ServerTokenizer(client, model), prompts, output_len)
                    before = await _snapshot(client, source)
                    result = await _send(pool, spec, given, round_name, tick)
                    after = await _snapshot(client, source)
            finally:
                pool.close()
            result = self._resummarize(result, [result], None)
            return replace(result, telemetry=summarize(source, before, after))

        return _run_async(one_round())

    def prompt_lengths(self, base_url: str, model: str, prompts: Sequence[str | Sequence[int]]) -> tuple[int, ...]:
        """Each prompt's tokens as the server counts them (token ids: their number)."""
        async def lengths() -> tuple[int, ...]:
            async with open_client(base_url) as client:
                given = await _given(self._local or ServerTokenizer(client, model), prompts, 1)
            return tuple(p.input_len for p in given)

        return _run_async(lengths())

    def tokenize(self, base_url: str, model: str, text: str) -> list[int]:
        """``text``'s token ids: the local ``--tokenizer``'s, else the server's /tokenize."""
        async def encode() -> list[int]:
            async with open_client(base_url) as client:
                return await (self._local or ServerTokenizer(client, model)).encode(text)

        return _run_async(encode())

    def detokenize(self, base_url: str, model: str, ids: Sequence[int]) -> str:
        async def decode() -> str:
            async with open_client(base_url) as client:
                return await (self._local or ServerTokenizer(client, model)).decode(ids)

        return _run_async(decode())

    async def _round(self, pool, spec: LoadSpec, prompts: Sequence[Prompt], round_name: str,
                     tick: Callable[[], None], case: ScenarioCase) -> RoundResult:
        """One round; multi-turn prompts go turn by turn; summary with our percentiles and SLOs."""
        turns = sorted({p.turn for p in prompts})
        if len(turns) <= 1:
            result = await _send(pool, spec, prompts, round_name, tick)
            return self._resummarize(result, [result], case)
        parts = []
        for turn in turns:
            group = [p for p in prompts if p.turn == turn]
            parts.append(await _send(pool, spec, group, round_name, tick))
        records: list[RequestRecord] = []
        offset = 0
        for part in parts:
            records.extend(replace(r, index=r.index + offset) for r in part.records)
            offset += len(part.records)
        reasons = [f"turn {t}: {p.invalid_reason}" for t, p in zip(turns, parts) if p.invalid_reason]
        merged = RoundResult(round=round_name, records=tuple(records), duration=sum(p.duration for p in parts),
                             summary={}, max_loop_lag_ms=max(p.max_loop_lag_ms for p in parts),
                             invalid_reason="; ".join(reasons) or None, client_stamps=RoundResult.stamps_of(parts))
        return self._resummarize(merged, parts, case)

    def _resummarize(self, result: RoundResult, parts: Sequence[RoundResult],
                     case: ScenarioCase | None) -> RoundResult:
        guard = _guard_figures(parts)
        wanted = list(self._percentiles)
        for t in case.thresholds if case else ():  # a threshold on pNN needs pNN, whatever was asked for
            m = re.match(r"^p([0-9.]+)_", t.metric)
            if m and float(m.group(1)) not in wanted:
                wanted.append(float(m.group(1)))
        summary = summarize_records(result.records, result.duration, wanted, dict(case.slos) if case else {})
        summary.update({k: v for k, v in guard.items() if k not in summary})  # the client's guard figures
        if len(parts) > 1:
            summary["turns"] = len(parts)
        return replace(result, summary=summary)

    async def _warmup_for(self, codec, case: ScenarioCase, trial: int, model: str) -> list[Prompt]:
        """Warm-up prompts: random, of the case's lengths, unlike any measured prompt."""
        if not case.warmup_requests:
            return []
        key = (self._tokenizer_source or model, "warmup", case.input_len, case.output_len,
               case.warmup_requests, case.seed, trial)
        if key not in self._prompts:
            self._prompts[key] = await build_random_prompts(
                codec, input_len=case.input_len, output_len=case.output_len, num_prompts=case.warmup_requests,
                seed=case.seed, trial=-1 - trial)
        return self._prompts[key]

    async def _prompts_for(self, codec, case: ScenarioCase, trial: int, model: str) -> list[Prompt]:
        key: tuple
        if case.prompts:  # the same in every trial
            key = (self._tokenizer_source or model, "prompts", case.prompts, case.output_len)
        else:
            key = (self._tokenizer_source or model, case.dataset, case.input_len, case.output_len,
                   case.num_prompts, case.seed, trial, case.dataset_options)
        if key not in self._prompts:
            if len(self._prompts) >= self._cache_items:
                self._prompts.pop(next(iter(self._prompts)))
            self._prompts[key] = await (_given(codec, case.prompts, case.output_len) if case.prompts else build_prompts(
                codec, dataset=case.dataset, input_len=case.input_len, output_len=case.output_len,
                num_prompts=case.num_prompts, seed=case.seed, trial=trial, options=case.options))
        return self._prompts[key]


def _run_async(coro):
    """``asyncio.run``, made safe for a Ctrl-C or SIGTERM (a KeyboardInterrupt) at any moment.

    One that lands while the loop is being built would leave a loop built half-way, whose
    finalizer prints a traceback at exit ("no attribute '_signal_handlers'"), and the
    coroutine never awaited: the loop is built with those signals blocked in this thread
    (delivered as soon as it exists; another thread of the process could still take
    them), and a coroutine that never started is closed. One that lands
    while asyncio shuts the loop down can end in "RuntimeError: Event loop stopped before
    Future completed", which would fail the item instead of ending the run as interrupted:
    it stays the interrupt it is.
    """
    import inspect

    runner = asyncio.Runner()
    try:
        try:
            blocked = {signal.SIGINT, signal.SIGTERM}
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if hasattr(signal, "pthread_sigmask") else None
            try:
                runner.get_loop()
            finally:
                if mask is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return runner.run(coro)
        finally:
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()
            runner.close()
    except RuntimeError as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise exc.__context__ from None
        raise


async def _given(codec, prompts: Sequence[str | Sequence[int]], output_len: int) -> list[Prompt]:
    """Prompts given as they are: text counted with the server's tokenizer, ids sent as ids."""
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            out.append(Prompt(text=prompt, input_len=len(await codec.encode(prompt)), output_len=output_len))
        else:
            ids = tuple(prompt)
            out.append(Prompt(text="", input_len=len(ids), output_len=output_len, token_ids=ids))
    return out


class _Ticks:
    """A round's progress: called once a request is done, it says so every quarter of them."""

    def __init__(self, progress: Callable[[str], None], label: str, total: int) -> None:
        self.progress, self.label, self.total, self.done = progress, label, total, 0

    def __call__(self) -> None:
        self.done += 1
        if self.done == self.total or self.done % max(1, self.total // 4) == 0:
            self.progress(f"{self.label}: {self.done}/{self.total} requests")


async def _send(pool: StreamPool | ClientProcesses, spec: LoadSpec, prompts: Sequence[Prompt], round_name: str,
                tick: Callable[[], None] | None = None) -> RoundResult:
    """One round from this process's connection pool, or spread over client processes."""
    if isinstance(pool, ClientProcesses):
        return await pool.run_round(spec, prompts, round_name, tick)
    return await run_round(pool, spec, prompts, round_name, on_request_done=tick)


#: How the client's guard figures (``loadgen.run_round``) of a round sent in turns
#: combine: each comes from the worst turn, never an average over turns.  A round is
#: invalid when any of its turns is (``invalid_reason`` names it), so its figures must
#: show that turn; a mean weighted by duration would let the good turns hide it.
_LOWEST_RATIO_TURN = {  # ratio -> the figures it is made of, taken from the same turn
    "concurrency_ratio": ("delivered_concurrency",),
    "request_rate_ratio": ("delivered_request_rate", "scheduled_request_rate"),
}
_HIGHEST_OVER_TURNS = ("loop_lag_p99_ms", "p99_arrival_lateness_ms")


def _guard_figures(parts: Sequence[RoundResult]) -> dict[str, float | int | None]:
    """The client's guard figures of a round sent in ``parts`` (one, or one per turn)."""
    # the configured figures are the same in every turn; the pNN latencies are recomputed
    guard = {k: v for k, v in parts[-1].summary.items() if not re.match(r"^p[0-9.]+_", k)}
    for ratio, components in _LOWEST_RATIO_TURN.items():
        measured = [(value, p.summary) for p in parts if (value := p.summary.get(ratio)) is not None]
        if measured:
            _, worst = min(measured, key=lambda pair: pair[0])
            guard.update({k: worst.get(k) for k in (ratio, *components)})
    for name in _HIGHEST_OVER_TURNS:
        values = [v for p in parts if (v := p.summary.get(name)) is not None]
        if values:
            guard[name] = max(values)
    return guard


async def _snapshot(client, source: TelemetrySource) -> Snapshot:
    """Metrics and log offsets now; the server's own page through the client."""
    own = {}
    for url in source.metrics_urls:
        if url.startswith(str(client.base_url).rstrip("/")):
            text = None
            try:
                response = await client.get(url, timeout=10)
                if response.status_code == 200:
                    text = response.text
            except Exception:  # noqa: BLE001 - telemetry is best effort
                text = None
            own[url] = text
    return await asyncio.to_thread(source.snapshot, own)
