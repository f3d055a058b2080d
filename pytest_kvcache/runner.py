"""Runs one scenario case against a server: trials of cold and warm rounds.

Each trial sends its own prompts (seeded by the trial index, the same in every run),
first in the cold round that fills the offload tier, then in the warm round that
should hit it. Server counters are scraped around every round (telemetry).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from .loadgen import LoadSpec, open_client, open_pool, run_round
from .models import ScenarioCase, TrialResult
from .telemetry import Snapshot, TelemetrySource, summarize
from .workloads import LocalTokenizer, Prompt, ServerTokenizer, build_prompts

__all__ = ["CaseRunner", "Progress", "parse_prometheus"]

#: Counters scraped from ``/metrics`` around each round (vLLM's names).
TELEMETRY_COUNTERS: tuple[str, ...] = (
    "vllm:prompt_tokens_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "vllm:prefix_cache_hits_total",
)
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

    def __init__(self, tokenizer_path: str | None = None, prompt_cache_items: int = 64) -> None:
        self._local = LocalTokenizer(tokenizer_path) if tokenizer_path else None
        self._tokenizer_source = tokenizer_path
        self._prompts: dict[tuple, list[Prompt]] = {}
        self._cache_items = prompt_cache_items

    def run(self, case: ScenarioCase, base_url: str, model: str, trials: Sequence[int],
            progress: Progress | None = None, telemetry: TelemetrySource | None = None) -> tuple[TrialResult, ...]:
        """Run the trials with these indices (each index fixes its prompts).

        ``telemetry`` says where the server's metrics and logs are (default: its /metrics)."""
        source = telemetry or TelemetrySource(metrics_urls=(f"{base_url.rstrip('/')}/metrics",))
        return asyncio.run(self._run(case, base_url, model, trials, progress or (lambda _: None), source))

    async def _run(self, case: ScenarioCase, base_url: str, model: str, trials: Sequence[int],
                   progress: Progress, source: TelemetrySource) -> tuple[TrialResult, ...]:
        spec = LoadSpec(model=model, api=case.api, max_concurrency=case.concurrency,
                        request_rate=case.request_rate, burstiness=case.burstiness, seed=case.seed)
        results = []
        pool = open_pool(base_url, case.concurrency)
        try:
            async with open_client(base_url) as client:
                codec = self._local or ServerTokenizer(client, model)
                for trial in trials:
                    prompts = await self._prompts_for(codec, case, trial, model)
                    rounds = []
                    for round_name in case.rounds:
                        done = 0

                        def tick() -> None:
                            nonlocal done
                            done += 1
                            if done == len(prompts) or done % max(1, len(prompts) // 4) == 0:
                                progress(f"trial {trial + 1} {round_name}: {done}/{len(prompts)} requests")

                        before = await _snapshot(client, source)
                        result = await run_round(pool, spec, prompts, round_name, on_request_done=tick)
                        after = await _snapshot(client, source)
                        rounds.append(replace(result, telemetry=summarize(source, before, after)))
                    results.append(TrialResult(index=trial, rounds=tuple(rounds), measure_round=case.measure_round))
        finally:
            pool.close()
        return tuple(results)

    async def _prompts_for(self, codec, case: ScenarioCase, trial: int, model: str) -> list[Prompt]:
        key = (self._tokenizer_source or model, case.dataset, case.input_len, case.output_len,
               case.num_prompts, case.seed, trial)
        if key not in self._prompts:
            if len(self._prompts) >= self._cache_items:
                self._prompts.pop(next(iter(self._prompts)))
            self._prompts[key] = await build_prompts(
                codec, dataset=case.dataset, input_len=case.input_len, output_len=case.output_len,
                num_prompts=case.num_prompts, seed=case.seed, trial=trial)
        return self._prompts[key]


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
