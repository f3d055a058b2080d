"""The emulator's counters and their ``GET /metrics`` text (Prometheus, vLLM's and LMCache's names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING

from .tiers import WaterfallTier

if TYPE_CHECKING:
    from .prefix_cache import PrefixCache
    from .scheduler import EngineLoad, Request

__all__ = ["Histogram", "Stats", "render"]

lmlog = logging.getLogger("pytest_kvcache.emulator.lmcache")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
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


@dataclass
class Stats:
    """What the emulator counted since it started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: int = 0
    failed: int = 0
    aborted: int = 0
    queries: int = 0
    ext_queries: int = 0
    ext_hits: int = 0
    local_compute: int = 0
    lm_requested: int = 0
    lm_hit: int = 0
    lm_stored: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    # the host's time for real tier reads, reported beside the model (not in it)
    io_seconds: float = 0.0
    io_overrun_seconds: float = 0.0
    io_overruns: int = 0
    # hit tokens per tier that served them (waterfall: cpu and disk)
    tier_hits: dict[str, int] = field(default_factory=dict)

    def account_prefill(self, req: Request, cached: int, offloading: bool, tier_name: str) -> None:
        """Count ``req``'s prompt, ``cached`` tokens of it loaded from the tier (``offloading``:
        the emulator has one), with LMCache's log lines."""
        self.prompt_tokens += req.n
        self.queries += req.n
        self.local_compute += req.n - cached
        if not offloading:
            return
        self.ext_queries += req.n
        self.ext_hits += cached
        self.lm_requested += req.n
        self.lm_hit += cached
        left = cached  # the tiers in lookup order; a chunk that failed verification ended the load
        for tier, tokens in (req.split or {tier_name: cached}).items():
            self.tier_hits[tier] = self.tier_hits.get(tier, 0) + min(tokens, left)
            left -= min(tokens, left)
        lmlog.info("Reqid: %s, Total tokens %d, LMCache hit tokens: %d, need to load: %d",
                   req.rid, req.n, cached, cached)
        if cached:
            lmlog.info("Retrieved %d out of total %d tokens", cached, req.n)

    def finish(self, req: Request, stamps: list[float]) -> None:
        """Count a request served, its token stamps (``perf_counter``) in the latency histograms."""
        self.success += 1
        if stamps:
            self.ttft.observe(stamps[0] - req.arrival)
            for a, b in pairwise(stamps):
                self.itl.observe(b - a)


class _Lines:
    """Prometheus text lines, each sample labelled with the served model."""

    def __init__(self, model: str) -> None:
        self.lab = f'model_name="{model}"'
        self.out: list[str] = []

    def metric(self, name: str, kind: str, value: float, labels: str = "") -> None:
        self.out.append(f"# TYPE {name} {kind}")
        self.out.append(f"{name}{{{labels or self.lab}}} {value}")


def render(model: str, st: Stats, load: EngineLoad, kv_capacity_tokens: int, cache: PrefixCache,
           tier_name: str) -> str:
    """The ``GET /metrics`` text."""
    m = _Lines(model)
    _engine_lines(m, st, load, kv_capacity_tokens, cache)
    if cache.enabled:
        _lmcache_lines(m, st, cache, tier_name)
    return "\n".join(m.out) + "\n"


def _engine_lines(m: _Lines, st: Stats, load: EngineLoad, cap: int, cache: PrefixCache) -> None:
    lab = m.lab
    m.metric("vllm:num_requests_running", "gauge", load.running)
    m.metric("vllm:num_requests_waiting", "gauge", load.waiting)
    m.metric("vllm:kv_cache_usage_perc", "gauge", min(1.0, load.context_tokens / cap) if cap else 0.0)
    m.metric("vllm:prompt_tokens_total", "counter", st.prompt_tokens)
    m.metric("vllm:generation_tokens_total", "counter", st.generation_tokens)
    m.metric("vllm:request_success_total", "counter", st.success, lab + ',finished_reason="length"')
    m.metric("emulator:requests_aborted_total", "counter", st.aborted)
    m.metric("emulator:requests_failed_total", "counter", st.failed)
    # the host's time for real tier reads, beside the modeled times (not in them)
    m.metric("emulator:tier_io_seconds_total", "counter", st.io_seconds)
    m.metric("emulator:tier_io_overrun_seconds_total", "counter", st.io_overrun_seconds)
    m.metric("emulator:tier_io_overruns_total", "counter", st.io_overruns)
    # chunks the corrupt_rate fault stored with altered bytes
    m.metric("emulator:corrupted_chunks_total", "counter", cache.corrupted_chunks)
    m.metric("vllm:prefix_cache_queries_total", "counter", st.queries)
    m.metric("vllm:prefix_cache_hits_total", "counter", 0)
    m.metric("vllm:external_prefix_cache_queries_total", "counter", st.ext_queries)
    m.metric("vllm:external_prefix_cache_hits_total", "counter", st.ext_hits)
    m.out.append("# TYPE vllm:prompt_tokens_by_source_total counter")
    for src, v in (("local_compute", st.local_compute), ("local_cache_hit", 0),
                   ("external_kv_transfer", st.ext_hits)):
        m.out.append(f'vllm:prompt_tokens_by_source_total{{{lab},source="{src}"}} {v}')
    m.out.extend(st.ttft.lines("vllm:time_to_first_token_seconds", lab))
    m.out.extend(st.itl.lines("vllm:inter_token_latency_seconds", lab))


def _lmcache_lines(m: _Lines, st: Stats, cache: PrefixCache, tier_name: str) -> None:
    m.metric("lmcache:num_requested_tokens_total", "counter", st.lm_requested)
    m.metric("lmcache:num_hit_tokens_total", "counter", st.lm_hit)
    m.metric("lmcache:num_stored_tokens_total", "counter", st.lm_stored)
    rate = st.lm_hit / st.lm_requested if st.lm_requested else 0.0
    m.metric("lmcache:retrieve_hit_rate", "gauge", rate)
    _usage_lines(m, cache, tier_name)
    m.out.append("# TYPE emulator:tier_hit_tokens_total counter")
    m.out.extend(f'emulator:tier_hit_tokens_total{{{m.lab},tier="{tier}"}} {n}'
                 for tier, n in sorted(st.tier_hits.items()))
    m.metric("emulator:tier_stored_bytes", "gauge", cache.usage())
    m.metric("emulator:tier_chunks", "gauge", len(cache.tier))


def _usage_lines(m: _Lines, cache: PrefixCache, tier_name: str) -> None:
    """LMCache's usage gauges (bytes of the real model's KV) of the tiers it would report."""
    usage = cache.modeled_usage()
    tier = cache.tier
    if tier_name == "cpu":
        m.metric("lmcache:local_cpu_usage", "gauge", usage)
    elif isinstance(tier, WaterfallTier):
        m.metric("lmcache:local_cpu_usage", "gauge", round(tier.upper.usage() / cache.payload_scale))
        m.metric("lmcache:local_disk_usage", "gauge", round(tier.lower.usage() / cache.payload_scale))
    elif tier_name == "redis":
        m.metric("lmcache:local_cpu_usage", "gauge", 0)
        m.metric("lmcache:remote_storage_usage", "gauge", usage)
    else:
        m.metric("lmcache:local_cpu_usage", "gauge", 0)
        m.metric("lmcache:local_disk_usage", "gauge", usage)
