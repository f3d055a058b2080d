"""One table of the tiers, the storage view and the inference view side by side (seed 002).

A storage item's tiers (its :class:`~pytest_kvcache.storage.results.StorageResult`, means
over the complete trials) and an inference item's tiers as its server counted them in the
measured round (telemetry's ``tier_<figure>:<tier>``, means over the usable trials):
LMCache's multi-process server per tier (its L1 ``cpu``, each L2 adapter) and the built-in
emulator's hit tokens per tier. The figures share columns where they mean the same thing;
a view that has no figure for a column shows ``-``. Units: reads, writes, hits, misses and
evictions count blocks (storage) or chunks (LMCache); read and write GB/s are the tier's
bytes over its transfer time (storage) or the mean of LMCache's per-transfer throughput.
Nothing here imports pytest.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from ..telemetry import tier_figures

__all__ = ["TIER_DROP_ORDER", "TIER_HEADER", "TIER_NOTE", "tier_lines", "tier_rows"]

TIER_HEADER: tuple[str, ...] = ("item", "view", "tier", "reads", "writes", "hits", "hit tokens", "misses",
                                "evictions", "MiB read/written", "read p95 ms", "write p95 ms", "read GB/s",
                                "write GB/s", "trials used")
#: Columns of the tier table left out, in this order, to fit a terminal (the files keep all).
TIER_DROP_ORDER: tuple[str, ...] = ("trials used", "write GB/s", "write p95 ms", "MiB read/written", "misses",
                                    "read GB/s", "hits")
TIER_NOTE = ("reads, writes, hits, misses, evictions: blocks (storage) or chunks (LMCache); GB/s: bytes over "
             "transfer time (storage) or the mean transfer's (LMCache); storage: mean of the complete trials, "
             "servers: the measured round, mean of the usable trials")
_MIB = float(1 << 20)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _cell(value: float | None, digits: str = "") -> str:
    if value is None:
        return "-"
    if digits:
        return format(value, digits)
    return f"{value:.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:.1f}"


def _gbps(nbytes: int, latency) -> float | None:
    """A storage tier's bytes over the summed time of its operations (count x mean)."""
    seconds = latency.count * (latency.mean_ms or 0.0) / 1000
    return nbytes / seconds / 1e9 if seconds > 0 and nbytes else None


def _storage_rows(outcome) -> list[tuple[str, ...]]:
    """A row per tier of a storage item's hierarchy."""
    result = outcome.storage
    summary = result.summary
    used = [t for t in result.trials if t.complete]
    block_tokens = (result.config.get("trace") or {}).get("block_tokens")
    rows: list[tuple[str, ...]] = []
    for i, tier in enumerate(summary.tier_read_p95_ms):
        figures = [t.tiers[i] for t in used if i < len(t.tiers)]
        reads, writes, hits, misses, evictions, read, written = (
            _mean([getattr(f, name) for f in figures])
            for name in ("reads", "writes", "hits", "misses", "evictions", "read_bytes", "write_bytes"))
        tokens = hits * block_tokens if hits is not None and isinstance(block_tokens, int) else None
        moved = "-" if read is None or written is None else f"{read / _MIB:.3g}/{written / _MIB:.3g}"
        rows.append((outcome.case.name, "storage", tier, _cell(reads), _cell(writes), _cell(hits), _cell(tokens),
                     _cell(misses), _cell(evictions), moved, _cell(summary.tier_read_p95_ms.get(tier), ".3g"),
                     _cell(summary.tier_write_p95_ms.get(tier), ".3g"),
                     _cell(_mean([_gbps(f.read_bytes, f.read_latency) for f in figures]), ".3g"),
                     _cell(_mean([_gbps(f.write_bytes, f.write_latency) for f in figures]), ".3g"),
                     f"{summary.trials_used}/{len(result.trials)}"))
    return rows


def _measured_telemetry(result) -> list[Mapping[str, float]]:
    """The measured round's telemetry of every usable trial (a trial without that round: none)."""
    found = []
    for trial in result.usable_trials:
        found += [r.telemetry for r in trial.rounds if r.round == trial.measure_round]
    return found


def _server_rows(outcome) -> list[tuple[str, ...]]:
    """A row per tier an inference item's server counted in its measured round."""
    rounds = _measured_telemetry(outcome.result)
    per_round = [tier_figures(t) for t in rounds]
    # LMCache's multi-process server names its tiers' hits apart (telemetry's lmcache_l1_hit_tokens)
    server = "LMCache" if any("lmcache_l1_hit_tokens" in t for t in rounds) else "emulator"
    view = f"{server} ({outcome.case.measure_round})"
    rows: list[tuple[str, ...]] = []
    for tier in dict.fromkeys(tier for figures in per_round for tier in figures):
        reads, writes, hits, tokens, evictions, read_gbps, write_gbps = (
            _mean([figures.get(tier, {}).get(name) for figures in per_round])
            for name in ("reads", "writes", "hits", "hit_tokens", "evictions", "read_gbps", "write_gbps"))
        rows.append((outcome.case.name, view, tier, _cell(reads), _cell(writes), _cell(hits), _cell(tokens), "-",
                     _cell(evictions), "-", "-", "-", _cell(read_gbps, ".3g"), _cell(write_gbps, ".3g"),
                     f"{len(rounds)}/{len(outcome.result.trials)}"))
    return rows


def tier_rows(outcomes: Sequence) -> list[tuple[str, ...]]:
    """The tier table's rows in :data:`TIER_HEADER` order, in the items' order: a storage
    item's tiers from its storage figures (never from its ``result``), an inference item's
    from its server's telemetry. Items without figures per tier have no row."""
    rows: list[tuple[str, ...]] = []
    for o in outcomes:
        if getattr(o, "storage", None) is not None:
            rows += _storage_rows(o)
        elif not hasattr(o, "storage") and getattr(o, "result", None) is not None:
            rows += _server_rows(o)
    return rows


def tier_lines(outcomes: Sequence, width: int | None) -> list[str]:
    """The tier table for the terminal within ``width`` columns; none without figures per tier."""
    from .terminal import fit_table
    from .text import fit_lines

    rows = tier_rows(outcomes)
    if not rows:
        return []
    table, dropped = fit_table(TIER_HEADER, rows, width, drop=TIER_DROP_ORDER)
    lines = ["", *fit_lines(["tiers, the storage phase and the servers side by side:"], width)]
    lines += [text for text, _ in table]
    lines += fit_lines([f"({TIER_NOTE})"], width)
    if dropped:
        lines += fit_lines([f"(columns left out to fit {width} columns: {', '.join(dropped)}; report.html, "
                            "summary.md and run.json have them)"], width)
    return lines
