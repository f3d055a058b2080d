"""Telemetry around each round, and the proof that a warm round hit the offload tier.

Sources, scraped before and after every round (differences are per round):

* vLLM's ``/metrics``: ``vllm:prompt_tokens_total``,
  ``vllm:prompt_tokens_by_source_total{source=local_compute|local_cache_hit|external_kv_transfer}``,
  ``vllm:prefix_cache_{queries,hits}_total``, ``vllm:external_prefix_cache_{queries,hits}_total``;
* LMCache's metrics, in-process (``lmcache:*``, e.g. ``num_hit_tokens``,
  ``num_requested_tokens``, ``num_stored_tokens``) or multi-process (``lmcache_mp_*``),
  on the server's ``/metrics`` or on LMCache's own metrics URL;
* the built-in emulator's ``emulator:tier_io_*`` counters: the host's time for its real
  tier reads, and how often and how long a response waited for them past its modeled
  deadline;
* the log files of the server and of the services of its backend (LMCache's server):
  the lines LMCache writes in every known version, parsed tolerantly
  ("LMCache hit tokens: N", "Retrieved N out of total M tokens", "Retrieved N out of N
  required tokens", "Stored N out of total M tokens", MP "Retrieved N tokens in ...",
  with the optional "size: X gb, cost Y ms, throughput: Z GB/s").

Per round, :func:`summarize` gives prompt tokens, computed tokens, tokens loaded from the
external tier, the hit ratio, bytes and load bandwidth where a source has them, and figures
per tier named as the storage phase names its own (``tier_<figure>:<tier>``, see
:data:`TIER_FIGURES`): the emulator's hit tokens per tier that served them
(``tier_hit_tokens:cpu``, ``tier_hit_tokens:disk`` of the ``waterfall`` tier), and LMCache's
multi-process server's reads, writes, evictions, hits and transfer throughput of its L1
(``cpu``) and of each L2 adapter (``disk``, ``redis``, ...).
:func:`check_hits` turns a warm round that missed the tier into a message naming the
likely cause. No pytest import here.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CHUNK_SIZE",
    "TIER_FIGURES",
    "LogCounts",
    "Snapshot",
    "TelemetrySource",
    "check_hits",
    "expected_hit_tokens",
    "parse_log",
    "parse_metrics",
    "summarize",
    "tier_figures",
]

#: LMCache's default chunk size; only whole chunks are stored (save_unfull_chunk false).
CHUNK_SIZE = 256

# -- Prometheus text --------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text page: ``(name, sorted labels) -> value``."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        key = (m.group(1), labels)
        samples[key] = samples.get(key, 0.0) + value
    return samples


def metric_sum(samples: Samples, *names: str, **labels: str) -> float | None:
    """Sum over samples of the first of ``names`` present (labels filtered), else None.

    A name is also tried with and without the ``_total`` suffix of counters, since
    prometheus_client versions differ."""
    for name in names:
        variants = (name, name[:-6]) if name.endswith("_total") else (name, name + "_total")
        for variant in variants:
            found = [v for (n, ls), v in samples.items() if n == variant
                     and all(dict(ls).get(k) == want for k, want in labels.items())]
            if found:
                return float(sum(found))
    return None


# -- LMCache log lines -------------------------------------------------------------------------

_NUM = r"(\d[\d,]*)"
_LOG_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # in-process, 0.2-0.3: "Reqid: x, Total tokens 1000, LMCache hit tokens: 768, need to load: 768"
    ("hit", re.compile(r"LMCache hit tokens:\s*" + _NUM, re.IGNORECASE)),
    # "Retrieved 768 out of total 1000 tokens" / "Retrieved 768 out of 768 required tokens (from 1000 total tokens)"
    ("retrieved", re.compile(r"Retrieved\s+" + _NUM + r"\s+out of\s+(?:total\s+)?" + _NUM, re.IGNORECASE)),
    # multi-process server: "Retrieved 768 tokens in 3.2 ms"
    ("retrieved", re.compile(r"Retrieved\s+" + _NUM + r"\s+tokens\s+in\b", re.IGNORECASE)),
    # "Stored 768 out of total 1000 tokens"
    ("stored", re.compile(r"Stored\s+" + _NUM + r"\s+out of\s+(?:total\s+)?" + _NUM, re.IGNORECASE)),
    # multi-process server: "Stored 768 tokens in 3.2 ms"
    ("stored", re.compile(r"Stored\s+" + _NUM + r"\s+tokens\s+in\b", re.IGNORECASE)),
)
_SIZE = re.compile(r"size:\s*([\d.]+)\s*(gb|mb|kb|b)\b", re.IGNORECASE)
_COST = re.compile(r"(?:cost|in)\s*:?\s*([\d.]+)\s*(ms|s)\b", re.IGNORECASE)
_UNITS = {"gb": 1e9, "mb": 1e6, "kb": 1e3, "b": 1.0}

#: Known log lines that explain a miss: an id (kept in the round's telemetry as
#: ``log_cause:<id>``, a count of lines), the pattern and the cause it points to.
KNOWN_CAUSES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("no_cpu_connector", re.compile(r"No supported cpu connector found", re.IGNORECASE),
     ("LMCache's in-process connector has no CPU connector in this build, so it stores nothing and every "
      "request recomputes (use the multi-process mode, --kv-lmcache-mode mp, on a CPU machine)")),
    ("connection_refused",
     re.compile(r"(Connection refused|ConnectionError|Failed to connect|Error connecting)", re.IGNORECASE),
     "a remote tier refused the connection (is the Redis / LMCache / Mooncake server up?)"),
    ("eviction", re.compile(r"(\bevicted\b|out of memory|no space left on device)", re.IGNORECASE),
     "the tier ran out of room and evicted chunks (raise its size)"),
)


@dataclass
class LogCounts:
    hit_lines: int = 0
    hit_tokens: int = 0
    retrieved_lines: int = 0
    retrieved_tokens: int = 0
    stored_lines: int = 0
    stored_tokens: int = 0
    retrieved_bytes: float = 0.0
    retrieve_seconds: float = 0.0
    causes: dict[str, int] = field(default_factory=dict)  # KNOWN_CAUSES id -> lines

    def add(self, other: LogCounts) -> None:
        for name in ("hit_lines", "hit_tokens", "retrieved_lines", "retrieved_tokens", "stored_lines",
                     "stored_tokens", "retrieved_bytes", "retrieve_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for cause, n in other.causes.items():
            self.causes[cause] = self.causes.get(cause, 0) + n


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def parse_log(text: str) -> LogCounts:
    """Count LMCache's hit, retrieve and store lines (any known version's wording)."""
    counts = LogCounts()
    for line in text.splitlines():
        for cause, pattern, _ in KNOWN_CAUSES:
            if pattern.search(line):
                counts.causes[cause] = counts.causes.get(cause, 0) + 1
        for kind, pattern in _LOG_PATTERNS:
            m = pattern.search(line)
            if not m:
                continue
            n = _int(m.group(1))
            if kind == "hit":
                counts.hit_lines += 1
                counts.hit_tokens += n
            elif kind == "retrieved":
                counts.retrieved_lines += 1
                counts.retrieved_tokens += n
                size, cost = _SIZE.search(line), _COST.search(line[m.end():])
                if size and cost:
                    seconds = float(cost.group(1)) / (1000.0 if cost.group(2).lower() == "ms" else 1.0)
                    counts.retrieved_bytes += float(size.group(1)) * _UNITS[size.group(2).lower()]
                    counts.retrieve_seconds += seconds
            else:
                counts.stored_lines += 1
                counts.stored_tokens += n
            break
    return counts


# -- snapshots around a round ---------------------------------------------------------------------


@dataclass
class Snapshot:
    """What the sources said at one moment: metric samples per URL, log sizes per file."""

    metrics: dict[str, Samples] = field(default_factory=dict)
    log_offsets: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TelemetrySource:
    """Where a server's telemetry is: its metrics URLs and its log files (and its services')."""

    metrics_urls: tuple[str, ...] = ()
    log_paths: tuple[str, ...] = ()

    def snapshot(self, fetched: Mapping[str, str | None] | None = None) -> Snapshot:
        """Read the sources now. ``fetched`` gives metrics pages already fetched (by URL),
        so an async caller can fetch the server's own page with its client."""
        snap = Snapshot()
        for url in self.metrics_urls:
            text = fetched.get(url) if fetched and url in fetched else _get(url)
            if text is not None:
                snap.metrics[url] = parse_metrics(text)
        for path in self.log_paths:
            try:
                snap.log_offsets[path] = Path(path).stat().st_size
            except OSError:
                snap.log_offsets[path] = 0
        return snap

    def logs_since(self, before: Snapshot) -> LogCounts:
        counts = LogCounts()
        for path in self.log_paths:
            start = before.log_offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    text = f.read(64 * 1024 * 1024).decode("utf-8", errors="replace")
            except OSError:
                continue
            counts.add(parse_log(text))
        return counts


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status != 200:
                return None
            return response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _merged(snap: Snapshot) -> Samples:
    merged: Samples = {}
    for samples in snap.metrics.values():
        for key, value in samples.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def _delta(before: Samples, after: Samples, *names: str, **labels: str) -> float | None:
    a = metric_sum(after, *names, **labels)
    if a is None:
        return None
    b = metric_sum(before, *names, **labels) or 0.0
    return a - b


#: Raw counters kept per round (differences), under their own names.
RAW_COUNTERS: tuple[str, ...] = (
    "vllm:prompt_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total",
    "lmcache:num_requested_tokens_total",
    "lmcache:num_hit_tokens_total",
    "lmcache:num_stored_tokens_total",
    # the built-in emulator's real tier I/O beside its modeled times (seconds; a count)
    "emulator:tier_io_seconds_total",
    "emulator:tier_io_overrun_seconds_total",
    "emulator:tier_io_overruns_total",
)

#: LMCache multi-process counters (names vary by version: matched by substring). The
#: per-tier splits (``lmcache_mp_lookup_hit_l1_tokens_total``, ``..._l2_...``) are parts of
#: the total, not more hits: counted apart (:data:`_MP_TIER_HIT`), never in the sum.
#: A histogram's or a counter's parts that are not its count (matched by substring: excluded).
_NOT_A_COUNT = r"(?!.*_(?:bucket|created|sum|count)$)"
_MP_HIT = re.compile(rf"^{_NOT_A_COUNT}lmcache_mp_(?!.*_l[12]_).*(hit|retriev|load)\w*token", re.IGNORECASE)
_MP_TIER_HIT = re.compile(r"^lmcache_mp_lookup_hit_(l[12])_tokens", re.IGNORECASE)
_MP_STORE = re.compile(rf"^{_NOT_A_COUNT}lmcache_mp_.*(stor|sav)\w*token", re.IGNORECASE)


def _mp_sum(samples: Samples, pattern: re.Pattern[str], **labels: str) -> float | None:
    """The sum of the samples whose name ``pattern`` finds and whose labels are ``labels``, else None."""
    values = [v for (n, ls), v in samples.items()
              if pattern.search(n) and all(dict(ls).get(k) == want for k, want in labels.items())]
    return float(sum(values)) if values else None


def summarize(source: TelemetrySource, before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Per-round telemetry (differences over the round); keys absent where no source has them.

    ``external_hit_tokens`` comes from the best source available, named by
    ``external_hit_source`` (1 vLLM by-source, 2 vLLM external counters, 3 LMCache metrics,
    4 LMCache multi-process metrics, 5 LMCache log lines)."""
    b, a = _merged(before), _merged(after)
    out: dict[str, float] = {}
    for name in RAW_COUNTERS:
        d = _delta(b, a, name)
        if d is not None:
            out[name] = d
    logs = source.logs_since(before)
    log_hits = max(logs.retrieved_tokens, logs.hit_tokens) if (logs.retrieved_lines or logs.hit_lines) else None
    _add_token_counts(out, b, a, log_hits)
    _add_log_figures(out, logs, log_hits)
    _add_tier_figures(out, b, a)
    for cause, n in logs.causes.items():
        out[f"log_cause:{cause}"] = float(n)
    return out


def _mp_delta(before: Samples, after: Samples, pattern: re.Pattern[str], **labels: str) -> float | None:
    """The round's difference of LMCache's multi-process counters that ``pattern`` finds."""
    total_after = _mp_sum(after, pattern, **labels)
    return None if total_after is None else total_after - (_mp_sum(before, pattern, **labels) or 0.0)


def _external_hits(b: Samples, a: Samples, log_hits: int | None) -> tuple[float | None, float]:
    """The round's tokens loaded from the tier, from the best source that counts them, and
    the source's rank (see :func:`summarize`; 0 where none does)."""
    by_rank = (_delta(b, a, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
               _delta(b, a, "vllm:external_prefix_cache_hits_total"),
               _delta(b, a, "lmcache:num_hit_tokens_total"),
               _mp_delta(b, a, _MP_HIT))
    for rank, value in enumerate(by_rank, start=1):
        if value is not None:
            return value, float(rank)
    if log_hits is not None:
        return float(log_hits), 5.0
    return None, 0.0


def _add_token_counts(out: dict[str, float], b: Samples, a: Samples, log_hits: int | None) -> None:
    """The prompt's tokens by what served them: computed, local prefix cache, the tier."""
    prompt = _delta(b, a, "vllm:prompt_tokens_total")
    by_compute = _delta(b, a, "vllm:prompt_tokens_by_source_total", source="local_compute")
    by_local = _delta(b, a, "vllm:prompt_tokens_by_source_total", source="local_cache_hit")
    ext_queries = _delta(b, a, "vllm:external_prefix_cache_queries_total")
    local_hits = by_local if by_local is not None else _delta(b, a, "vllm:prefix_cache_hits_total")
    external, how = _external_hits(b, a, log_hits)
    if prompt is not None:
        out["prompt_tokens"] = prompt
    if by_compute is not None:
        out["computed_tokens"] = by_compute
    elif prompt is not None:
        out["computed_tokens"] = prompt - (local_hits or 0.0) - (external or 0.0)
    if local_hits is not None:
        out["local_hit_tokens"] = local_hits
    if ext_queries is not None:
        out["external_query_tokens"] = ext_queries
    if external is not None:
        out["external_hit_tokens"] = external
        out["external_hit_source"] = how
        if prompt:
            out["hit_ratio"] = external / prompt
    stored = _delta(b, a, "lmcache:num_stored_tokens_total")
    if stored is None:
        stored = _mp_delta(b, a, _MP_STORE)
    if stored is not None:
        out["stored_tokens"] = stored


def _add_log_figures(out: dict[str, float], logs: LogCounts, log_hits: int | None) -> None:
    """What LMCache's log lines say it loaded and stored, and how fast it loaded."""
    if logs.hit_lines or logs.retrieved_lines:
        out["log_hit_tokens"] = float(log_hits or 0)
    if logs.stored_lines:
        out["log_stored_tokens"] = float(logs.stored_tokens)
    if logs.retrieved_bytes:
        out["loaded_bytes"] = logs.retrieved_bytes
        if logs.retrieve_seconds > 0:
            out["load_bandwidth_gbps"] = logs.retrieved_bytes / logs.retrieve_seconds / 1e9


def _add_tier_figures(out: dict[str, float], b: Samples, a: Samples) -> None:
    """What the tiers hold at the end of the round, and the round's hits by tier."""
    # gauges at the end of the round: what the LMCache tiers hold (multi-process server)
    for key, name in (("l1_usage_bytes", "lmcache_mp_l1_memory_usage_bytes"),
                      ("l2_usage_bytes", "lmcache_mp_l2_usage_bytes")):
        value = metric_sum(a, name)
        if value is not None:
            out[key] = value
    for (name, labels), value in a.items():  # LMCache's hits by the tier that held them (L1 DRAM, L2)
        level = _MP_TIER_HIT.match(name)
        if level and not name.endswith(("_created", "_bucket", "_sum", "_count")):
            key = f"lmcache_{level.group(1).lower()}_hit_tokens"
            out[key] = out.get(key, 0.0) + value - b.get((name, labels), 0.0)
    for (name, labels), value in a.items():  # the emulator's hits per tier that served them
        tier = dict(labels).get("tier") if name == "emulator:tier_hit_tokens_total" else None
        if tier:
            out[f"tier_hit_tokens:{tier}"] = value - b.get((name, labels), 0.0)
    _add_lmcache_tiers(out, b, a)


#: Figures per tier in a round's telemetry, as ``tier_<figure>:<tier>``: the storage phase's
#: names (storage/results.py TierFigures: reads, writes, hits, evictions), in LMCache's unit
#: (chunks), plus the tokens of the hits and the mean throughput of the tier's transfers.
TIER_FIGURES: tuple[str, ...] = ("reads", "writes", "hits", "hit_tokens", "evictions", "read_gbps", "write_gbps")

#: LMCache multi-process counters per tier (0.5.6, checked on its /metrics: OpenTelemetry
#: instruments as its Prometheus exporter writes them, the unit before ``_total``):
#: (figure, level, instrument, unit). L1 reads count the chunks L1 hands out (to vLLM and to
#: the L2 store), L2 reads the chunks prefetched back into L1; hits are lookup keys (chunks).
_MP_TIER_COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("reads", "l1", "l1_read", "chunks"),
    ("writes", "l1", "l1_write", "chunks"),
    ("evictions", "l1", "l1_evicted", "chunks"),
    ("hits", "l1", "lookup_hit_l1_keys", ""),
    ("hit_tokens", "l1", "lookup_hit_l1_tokens", ""),
    ("reads", "l2", "l2_prefetch_load_completed", "chunks"),
    ("writes", "l2", "l2_store_completed_objects", "chunks"),
    ("evictions", "l2", "l2_evicted_objects", "chunks"),
    ("hits", "l2", "lookup_hit_l2_keys", ""),
    ("hit_tokens", "l2", "lookup_hit_l2_tokens", ""),
)
#: LMCache's throughput histograms (GB/s per transfer): (figure, level, instrument). The L0-L1
#: pair is timed on the GPU's stream (absent on a CPU build); the L2 pair carries ``l2_name``.
_MP_TIER_THROUGHPUTS: tuple[tuple[str, str, str], ...] = (
    ("read_gbps", "l1", "l0_l1_load_throughput"),
    ("write_gbps", "l1", "l0_l1_store_throughput"),
    ("read_gbps", "l2", "l2_load_throughput"),
    ("write_gbps", "l2", "l2_store_throughput"),
)
#: LMCache's names of its tiers -> the tier kinds of the storage phase and the backends
_MP_TIER_NAMES = {"dram": "cpu", "fs": "disk", "resp": "redis", "mooncake_store": "mooncake"}


def _mp_tiers(a: Samples) -> tuple[str | None, dict[str, str]]:
    """LMCache's L1 tier at the end of the round (None: no multi-process LMCache) and its L2
    adapters (``l2_name`` -> tier)."""
    l1 = [dict(ls).get("backend", "dram") for (n, ls) in a if n == "lmcache_mp_l1_memory_usage_bytes"]
    if not l1 and _mp_sum(a, re.compile(r"^lmcache_mp_lookup_hit_l1_tokens(?:_total)?$")) is None:
        return None, {}
    names = sorted({dict(ls)["l2_name"] for (n, ls) in a if n.startswith("lmcache_mp_") and "l2_name" in dict(ls)})
    return _MP_TIER_NAMES.get(l1[0], l1[0]) if l1 else "cpu", {n: _MP_TIER_NAMES.get(n, n) for n in names}


def _add_lmcache_tiers(out: dict[str, float], b: Samples, a: Samples) -> None:
    """LMCache's multi-process figures per tier (see :data:`TIER_FIGURES`)."""
    l1, l2 = _mp_tiers(a)
    # the L2 counters without an adapter's label belong to every L2 tier together
    tiers = {"l1": l1, "l2": "+".join(sorted(set(l2.values()))) or None}
    for figure, level, instrument, unit in _MP_TIER_COUNTERS:
        tier = tiers[level]
        if tier is not None:
            counter = re.compile(rf"^lmcache_mp_{instrument}" + (rf"(?:_{unit})?" if unit else "") + r"(?:_total)?$")
            # OpenTelemetry exports a counter from its first increment on: absent is none yet
            out[f"tier_{figure}:{tier}"] = _mp_delta(b, a, counter) or 0.0
    for figure, level, instrument in _MP_TIER_THROUGHPUTS:
        by_tier: list[tuple[str | None, dict[str, str]]] = \
            [(l1, {})] if level == "l1" else [(tier, {"l2_name": name}) for name, tier in l2.items()]
        for tier, labels in by_tier:
            pattern = rf"^lmcache_mp_{instrument}(?:_GB_per_second)?_"
            total, count = (_mp_delta(b, a, re.compile(pattern + part + "$"), **labels) for part in ("sum", "count"))
            if tier is not None and total is not None and count:
                out[f"tier_{figure}:{tier}"] = total / count


def tier_figures(telemetry: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """A round's figures per tier: tier -> figure -> value (keys ``tier_<figure>:<tier>``)."""
    tiers: dict[str, dict[str, float]] = {}
    for key, value in telemetry.items():
        figure, _, tier = key.partition(":")
        if tier and figure.startswith("tier_") and figure[5:] in TIER_FIGURES:
            tiers.setdefault(tier, {})[figure[5:]] = value
    return tiers


def causes_of(telemetry: Mapping[str, float]) -> list[str]:
    """The causes named by known log lines seen during the round (see KNOWN_CAUSES)."""
    return [text for cause, _, text in KNOWN_CAUSES if telemetry.get(f"log_cause:{cause}")]


# -- the check ---------------------------------------------------------------------------------


def expected_hit_tokens(prompt_lens: Iterable[int], chunk_size: int = CHUNK_SIZE) -> int:
    """Tokens a warm round should load: the whole chunks of each prompt, leaving at
    least one token to compute (vLLM always computes the last one)."""
    return sum(max(0, (n - 1)) // chunk_size * chunk_size for n in prompt_lens)


@dataclass(frozen=True)
class HitCheck:
    """The verdict on one warm round."""

    ok: bool
    message: str = ""


def check_round(backend: str, telemetry: Mapping[str, float], prompt_lens: Sequence[int], *,
                min_ratio: float, chunk_size: int = CHUNK_SIZE, causes: Sequence[str] = (),
                what: str = "warm round", external: str | None = None, rehearsal: str | None = None) -> HitCheck:
    """Did this warm round hit the tier (offload backends), or not at all (``none``)?

    ``external``: the address of a server somebody else runs (``--kv-server external``),
    whose configuration the plugin did not choose: a miss then says which backend the
    server seems to run and how to tell the plugin, not which server flag to fix.
    ``rehearsal``: what in the configuration loses chunks on purpose (the named cause of a miss)."""
    hits = telemetry.get("external_hit_tokens")
    if hits is None:
        return HitCheck(True, "no telemetry of external hits; not checked")
    if backend == "none":
        if hits > 0:
            fix = (f"the external server at {external} runs an offload tier, so it is no 'none' server: "
                   f"say which backend it runs with --kv-external-backend NAME (ini kvcache_external_backend)"
                   if external else "the server runs with a KV connector it should not have (check the server "
                   "arguments: --kv-transfer-config, --kv-offloading-size)")
            return HitCheck(False, f"{what}: backend 'none' loaded {hits:.0f} tokens from an external KV tier; {fix}")
        return HitCheck(True)
    expected = expected_hit_tokens(prompt_lens, chunk_size)
    if expected == 0 or min_ratio <= 0:
        return HitCheck(True, f"prompts shorter than one {chunk_size}-token chunk: no hits expected")
    if hits >= min_ratio * expected:
        return HitCheck(True)
    queried = telemetry.get("external_query_tokens")
    stored = telemetry.get("stored_tokens", telemetry.get("log_stored_tokens"))
    if rehearsal:
        cause = f"{rehearsal} (a partial-loss rehearsal: the shortfall is the one asked for)"
    elif external and (hits == 0 or queried == 0):
        asked = ("its KV connector was never asked (vllm:external_prefix_cache_queries stayed 0)"
                 if queried == 0 else "it found none of the cold round's chunks")
        cause = (f"the external server at {external} runs no working '{backend}' tier: {asked}. The plugin does "
                 f"not configure a server it did not start: say which backend it runs with --kv-external-backend "
                 f"NAME (none for a server without a tier; ini kvcache_external_backend) and only that backend's "
                 f"items run, or restart it with the tier (vLLM: --kv-transfer-config with LMCache's connector; "
                 f"the emulator: --backend {backend})")
    elif queried is not None and queried == 0:
        cause = ("the KV connector was never asked (vllm:external_prefix_cache_queries stayed 0): the server "
                 "runs without the connector; check --kv-transfer-config and the connector's name")
    elif hits == 0:
        cause = ("the connector was asked but found nothing: the cold round's chunks were never stored or "
                 "could not be read back (offload silently disabled or failing, a tier of size 0, a different "
                 "chunk size or hashing seed between store and lookup)")
    else:
        cause = ("part of the prompts came back: the tier is likely too small for the round (evictions) or "
                 "its chunks expired between rounds")
    if stored is not None:
        cause += f"; tokens stored during this round: {stored:.0f}"
    extra = "".join(f"\n  log: {c}" for c in causes)
    return HitCheck(False, (
        f"{what} of backend '{backend}' loaded {hits:.0f} tokens from the offload tier, "
        f"{hits / expected:.0%} of the {expected} expected (whole {chunk_size}-token chunks of "
        f"{len(prompt_lens)} prompts; minimum {min_ratio:.0%}): a warm round without hits is a "
        f"misconfiguration, not a result.\n  likely cause: {cause}{extra}"))


def check_hits(backend: str, phase: str, trials, *, min_ratio: float, chunk_size: int = CHUNK_SIZE,
               external: str | None = None, not_run: int = 0, rehearsal: str | None = None) -> str | None:
    """Check every warm round of ``trials`` (TrialResult); a message if any missed, else None.

    ``external``, ``rehearsal``: see :func:`check_round`; ``not_run``: trials left out once these missed
    (the item stops at the first trial that shows the tier missing)."""
    if phase == "cache_miss":
        return None
    problems = []
    for trial in trials:
        for rnd in trial.rounds:
            if rnd.round != "warm":
                continue
            lens = [r.prompt_tokens_reported or r.prompt_len for r in rnd.records]
            check = check_round(backend, rnd.telemetry, lens, min_ratio=min_ratio, chunk_size=chunk_size,
                                causes=causes_of(rnd.telemetry), what=f"trial {trial.index + 1} warm round",
                                external=external, rehearsal=rehearsal)
            if not check.ok:
                problems.append(check.message)
    if not problems:
        return None
    more = f"\n  ({len(problems) - 1} more warm rounds missed the same way)" if len(problems) > 1 else ""
    if not_run:
        more += f"\n  ({not_run} more trial(s) not run: they would miss the same way)"
    return problems[0] + more
