"""The session gate (Holm over every comparison) and the terminal summary table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SUMMARY_HEADER", "Gate", "detect_gpus", "gate_line", "header_lines", "render_summary", "session_gate", "summary_rows"]


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


SUMMARY_HEADER: tuple[str, ...] = ("item", "metric", "baseline", "current", "change", "95% CI of ratio", "p",
                                    "p(Holm)", "q(BH)", "MDE", "verdict")


def summary_rows(outcomes: Sequence, gate: Gate | None) -> tuple[list[tuple[str, ...]], list[str]]:
    """The summary table's rows (cells as text, in :data:`SUMMARY_HEADER` order) and the
    notes under it; the terminal, the markdown summary and the HTML report share them."""
    rows = []
    pairs = _pairs(outcomes)
    holm_p = gate.holm if gate else [None] * len(pairs)
    bh_q = gate.bh if gate else [None] * len(pairs)
    notes = []
    index = {id(c): i for i, (_, c, _) in enumerate(pairs)}
    for o in outcomes:
        measured = o.result.usable_trials if o.result is not None else ()
        ttft = [t.measured.summary.get("median_ttft_ms") for t in measured]
        ttft = [v for v in ttft if v is not None]
        if not o.comparisons:
            current = f"{sorted(ttft)[len(ttft) // 2]:.4g} ms" if ttft else "-"
            rows.append((o.case.name, "median_ttft_ms", "-", current, "-", "-", "-", "-", "-", "-",
                         _status_cell(o)))
            continue
        for c, v in zip(o.comparisons, o.verdicts):
            unit = " ms" if c.metric.endswith("_ms") else ""
            i = index[id(c)]
            hp, q = holm_p[i], bh_q[i]
            ci = "-" if c.ci_low is None else f"[{c.ci_low:.3f}, {c.ci_high:.3f}]"
            rows.append((o.case.name, c.metric, _fmt(c.baseline_value, unit), _fmt(c.current_value, unit),
                         f"{c.change_pct:+.1f}%", ci, f"{c.p_worse:.2g}",
                         "-" if hp is None else f"{hp:.2g}", "-" if q is None else f"{q:.2g}",
                         "-" if c.mde_pct is None else f"{c.mde_pct:.1f}%", v.zone.value))
            if c.trials_needed is not None:
                notes.append(f"{o.case.name} {c.metric}: the smallest change this comparison can detect (80% power) "
                             f"is {c.mde_pct:.1f}%, above the {c.threshold * 100:.0f}% threshold; "
                             f"{c.trials_needed} trials per side would be needed")
            if v.zone.value != "PASS":
                notes.append(f"{o.case.name} {v.zone.value}: {v.reason}")
    return rows, notes


def gate_line(gate: Gate | None, alpha: float) -> str | None:
    """The last line of the summary: what the regression gate decided."""
    if gate is not None and gate.failing:
        return f"regression gate: FAILED after Holm correction at alpha {alpha:g}: " + ", ".join(gate.failing)
    if gate is not None and gate.holm:
        return f"regression gate: passed ({len(gate.holm)} comparisons, Holm at alpha {alpha:g})"
    return None


def header_lines(settings, gpu: str | None = None, versions: dict | None = None) -> list[str]:
    """The session header: server, versions, GPU and labels (``pytest_report_header``)."""
    server = settings.server
    from .. import __version__

    first = f"kvcache: pytest-kvcache {__version__}, server={server.kind}"
    if server.kind == "emulator":
        first += f" (profile {server.emulator_profile}" + (
            f", slowdown {server.emulator_slowdown:g})" if server.emulator_slowdown != 1 else ")")
    if server.endpoint:
        first += f" endpoint={server.endpoint}"
    if server.model:
        first += f" model={server.model}"
    lines = [first]
    if versions:
        lines.append("kvcache: versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append(f"kvcache: GPU: {gpu or 'unknown'}")
    labels = getattr(server, "labels", ()) or ()
    lines.append("kvcache: labels: " + (", ".join(f"{k}={v}" for k, v in labels) if labels else "none"))
    lines.append(f"kvcache: results: {settings.results_dir}")
    return lines


def render_summary(outcomes: Sequence, gate: Gate | None, settings) -> list[str]:
    server = settings.server
    lines = ["", f"pytest-kvcache: server={server.kind}"
             + (f" endpoint={server.endpoint}" if server.endpoint else "")
             + (f" slowdown={server.emulator_slowdown:g}" if server.kind == "emulator" and server.emulator_slowdown != 1 else "")
             + f"  results: {settings.results_dir}"]
    header = SUMMARY_HEADER
    rows, notes = summary_rows(outcomes, gate)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    lines.extend(notes)
    last = gate_line(gate, settings.alpha)
    if last:
        lines.append(last)
    return lines


def detect_gpus() -> list[str]:
    """Names of the NVIDIA GPUs ``nvidia-smi -L`` lists (empty without a GPU or driver)."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    names = []
    for line in out.stdout.splitlines():  # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"
        if line.startswith("GPU ") and ":" in line:
            names.append(line.split(":", 1)[1].split("(UUID")[0].strip())
    return names
