"""The session gate (Holm over every comparison) and the terminal summary table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Gate", "session_gate", "render_summary"]


@dataclass(frozen=True)
class Gate:
    """Session-level decision: Holm-adjusted p (the gate), BH-adjusted p (the report)."""

    holm: tuple[float, ...]
    bh: tuple[float, ...]
    failing: tuple[str, ...]  # "item: metric" that fail after Holm

    @property
    def failed(self) -> bool:
        return bool(self.failing)


def _pairs(outcomes):
    return [(o, c, v) for o in outcomes for c, v in zip(o.comparisons, o.verdicts)]


def session_gate(outcomes: Sequence, alpha: float) -> Gate:
    from ..stats import benjamini_hochberg, holm, verdict

    pairs = _pairs(outcomes)
    worse = [c.p_worse for _, c, _ in pairs]
    holm_p = holm(worse) if worse else []
    bh_p = benjamini_hochberg(worse) if worse else []
    better_holm = holm([c.p_better for _, c, _ in pairs]) if pairs else []
    failing = []
    for (o, c, _), p_worse, p_better in zip(pairs, holm_p, better_holm):
        if verdict(c, p_worse, p_better, alpha=alpha).zone.value == "FAIL":
            failing.append(f"{o.case.name}: {c.metric}")
    return Gate(holm=tuple(holm_p), bh=tuple(bh_p), failing=tuple(failing))


def _status_cell(outcome) -> str:
    """SKIPPED/FAILED with the start of the reason (the full reason is in pytest's report)."""
    text = outcome.status.upper()
    if outcome.status in ("skipped", "failed") and outcome.message:
        first = outcome.message.splitlines()[0]
        text += ": " + (first if len(first) <= 48 else first[:47] + "…")
    return text


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{unit}"


def render_summary(outcomes: Sequence, gate: Gate | None, settings) -> list[str]:
    server = settings.server
    lines = ["", f"pytest-kvcache: server={server.kind}"
             + (f" endpoint={server.endpoint}" if server.endpoint else "")
             + (f" slowdown={server.emulator_slowdown:g}" if server.kind == "emulator" and server.emulator_slowdown != 1 else "")
             + f"  results: {settings.results_dir}"]
    header = ("item", "metric", "baseline", "current", "change", "95% CI of ratio", "p", "p(Holm)", "MDE", "verdict")
    rows = []
    pairs = _pairs(outcomes)
    holm_p = gate.holm if gate else [None] * len(pairs)
    index = {id(c): i for i, (_, c, _) in enumerate(pairs)}
    for o in outcomes:
        measured = o.result.usable_trials if o.result is not None else ()
        ttft = [t.measured.summary.get("median_ttft_ms") for t in measured]
        ttft = [v for v in ttft if v is not None]
        if not o.comparisons:
            current = f"{sorted(ttft)[len(ttft) // 2]:.4g} ms" if ttft else "-"
            rows.append((o.case.name, "median_ttft_ms", "-", current, "-", "-", "-", "-", "-",
                         _status_cell(o)))
            continue
        for c, v in zip(o.comparisons, o.verdicts):
            unit = " ms" if c.metric.endswith("_ms") else ""
            hp = holm_p[index[id(c)]]
            rows.append((o.case.name, c.metric, _fmt(c.baseline_value, unit), _fmt(c.current_value, unit),
                         f"{c.change_pct:+.1f}%", f"[{c.ci_low:.3f}, {c.ci_high:.3f}]", f"{c.p_worse:.2g}",
                         "-" if hp is None else f"{hp:.2g}", "-" if c.mde_pct is None else f"{c.mde_pct:.1f}%",
                         v.zone.value))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    if gate is not None and gate.failing:
        lines.append(f"regression gate: FAILED after Holm correction at alpha {settings.alpha:g}: "
                     + ", ".join(gate.failing))
    elif gate is not None and gate.holm:
        lines.append(f"regression gate: passed ({len(gate.holm)} comparisons, Holm at alpha {settings.alpha:g})")
    return lines
