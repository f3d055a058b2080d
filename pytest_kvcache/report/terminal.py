"""The terminal summary: the header, the verdict table, its notes and the gate's last line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..decision import Gate, Zone
from .redact import redact_url

__all__ = ["SUMMARY_HEADER", "ZONE_COLOURS", "detect_gpus", "gate_line", "header_lines", "render_summary",
           "summary_rows", "unjudged_count"]

#: Terminal colour of each zone (pytest's TerminalWriter markup names).
ZONE_COLOURS: dict[str, str] = {Zone.FAIL.value: "red", Zone.WARN.value: "yellow", Zone.IMPROVED.value: "cyan",
                                Zone.PASS.value: "green"}


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


SUMMARY_HEADER: tuple[str, ...] = ("item", "metric", "baseline", "current", "change", "95% CI of ratio",
                                    "run noise", "p", "p(Holm)", "q(BH)", "MDE", "verdict")


def summary_rows(outcomes: Sequence, gate: Gate | None) -> tuple[list[tuple[str, ...]], list[str]]:
    """The summary table's rows (cells as text, in :data:`SUMMARY_HEADER` order) and the
    notes under it; the terminal, the markdown summary and the HTML report share them.

    Only comparisons made against a baseline or a reference are in the gate (an update
    of the baselines compares too, to refuse a sick run, but decides nothing else)."""
    rows = []
    gated = [o for o in outcomes if o.status != "baseline-updated"]
    pairs = [c for o in gated for c in o.comparisons]
    holm_p = gate.holm if gate and len(gate.holm) == len(pairs) else [None] * len(pairs)
    bh_q = gate.bh if gate and len(gate.bh) == len(pairs) else [None] * len(pairs)
    index = {id(c): i for i, c in enumerate(pairs)}
    notes = []
    for o in outcomes:
        if not o.verdicts:
            measured = o.result.usable_trials if o.result is not None else ()
            ttft = sorted(v for v in (t.measured.summary.get("median_ttft_ms") for t in measured) if v is not None)
            current = f"{ttft[len(ttft) // 2]:.4g} ms" if ttft else "-"
            rows.append((o.case.name, "median_ttft_ms", "-", current, "-", "-", "-", "-", "-", "-", "-",
                         _status_cell(o)))
            continue
        for c, v in zip(o.comparisons, o.verdicts):
            unit = " ms" if c.metric.endswith("_ms") else ""
            i = index.get(id(c))
            hp, q = (holm_p[i], bh_q[i]) if i is not None else (None, None)
            ci = "-" if c.ci_low is None else f"[{c.ci_low:.3f}, {c.ci_high:.3f}]"
            runs_b = f" ({c.runs_baseline}r)" if c.test != "paired-t" else ""
            runs_c = f" ({c.runs_current}r)" if c.runs_current > 1 else ""
            noise = "-" if c.between_sd is None else f"{c.between_sd * 100:.1f}%"
            rows.append((o.case.name, c.metric, _fmt(c.baseline_value, unit) + runs_b,
                         _fmt(c.current_value, unit) + runs_c, f"{c.change_pct:+.1f}%", ci, noise,
                         f"{c.p_worse:.2g}", "-" if hp is None else f"{hp:.2g}", "-" if q is None else f"{q:.2g}",
                         "-" if c.mde_pct is None else f"{c.mde_pct:.1f}%", v.zone.value))
            if v.zone is not Zone.PASS:
                notes.append(f"{o.case.name} {v.zone.value}: {v.reason}")
        if o.software_change and any(v.zone is not Zone.PASS for v in o.verdicts):
            notes.append(f"{o.case.name}: software since the baseline: {o.software_change}")
    if gate is not None:
        if gate.testbed_differs:
            notes.append(f"NOT COMPARED: {gate.testbed_differs} item(s) have baselines recorded on another testbed "
                         "(see each item's reason); their regressions cannot be seen")
        if gate.night is not None:
            notes.append(f"SESSION: {gate.night.message}")
    return rows, notes


def gate_line(gate: Gate | None, alpha: float, interrupted: str | None = None, unjudged: int = 0) -> str | None:
    """The last line of the summary: what the regression gate decided (``interrupted``:
    what cut the run short; ``unjudged``: its items cut off or never started)."""
    if interrupted:
        judged = f"{gate.judged} comparison(s) judged" if gate is not None and gate.judged else "nothing judged"
        failing = f"; FAILED: {', '.join(gate.failing)}" if gate is not None and gate.failing else ""
        return (f"regression gate: INCOMPLETE: the run was interrupted ({interrupted}) and did not judge every "
                f"item ({unjudged} cut off or never started); {judged}{failing}")
    if gate is None:
        return None
    unseen = f"; {len(gate.not_compared)} item(s) NOT COMPARED" if gate.not_compared else ""
    if gate.failing:
        return f"regression gate: FAILED after Holm correction at alpha {alpha:g}: " + ", ".join(gate.failing) + unseen
    if gate.judged:
        return f"regression gate: passed ({gate.judged} comparisons, Holm at alpha {alpha:g}){unseen}"
    return f"regression gate: nothing judged{unseen}" if unseen else None


def unjudged_count(outcomes: Sequence, not_run: Sequence[str]) -> int:
    """Items an interrupted run did not judge: those cut off and those never started."""
    return sum(1 for o in outcomes if o.status == "interrupted") + len(not_run)


def header_lines(settings, gpu: str | None = None, versions: dict | None = None) -> list[str]:
    """The session header: server, versions, GPU and labels (``pytest_report_header``)."""
    server = settings.server
    from .. import __version__

    first = f"kvcache: pytest-kvcache {__version__}, server={server.kind}"
    if server.kind == "emulator":
        first += f" (profile {server.emulator_profile}" + (
            f", slowdown {server.emulator_slowdown:g})" if server.emulator_slowdown != 1 else ")")
    if server.endpoint:
        first += f" endpoint={redact_url(server.endpoint)}"
    if server.model:
        first += f" model={server.model}"
    lines = [first]
    if versions:
        lines.append("kvcache: versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if settings.versions:
        lines.append("kvcache: software under test: " + ", ".join(f"{k}={v}" for k, v in settings.versions))
    lines.append(f"kvcache: GPU: {gpu or 'unknown'}")
    labels = getattr(server, "labels", ()) or ()
    lines.append("kvcache: labels: " + (", ".join(f"{k}={v}" for k, v in labels) if labels else "none"))
    lines.append(f"kvcache: results: {settings.results_dir}")
    return lines


def render_summary(outcomes: Sequence, gate: Gate | None, settings,
                   change_points: Sequence[Any] = (), interrupted: str | None = None,
                   not_run: Sequence[str] = ()) -> list[tuple[str, str | None]]:
    """The summary's lines with the colour of each (None: the terminal's own)."""
    server = settings.server
    lines: list[tuple[str, str | None]] = [("", None), (
        f"pytest-kvcache: server={server.kind}" + (f" endpoint={redact_url(server.endpoint)}" if server.endpoint else "")
        + (f" slowdown={server.emulator_slowdown:g}" if server.kind == "emulator" and server.emulator_slowdown != 1
           else "") + f"  results: {settings.results_dir}", None)]
    header = SUMMARY_HEADER
    rows, notes = summary_rows(outcomes, gate)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines.append(("  ".join(h.ljust(w) for h, w in zip(header, widths)), None))
    lines.append(("  ".join("-" * w for w in widths), None))
    for row in rows:
        lines.append(("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip(),
                      ZONE_COLOURS.get(row[-1])))
    for note in notes:
        zone = note.split(": ", 1)[0].rsplit(" ", 1)[-1]
        lines.append((note, ZONE_COLOURS.get(zone, "yellow" if note.startswith(("NOT COMPARED", "SESSION")) else None)))
    for cp in change_points:
        lines.append((f"WARN change point: {cp.describe()}", "yellow"))
    if not_run:
        lines.append((f"NOT RUN: {len(not_run)} item(s) never started: " + ", ".join(not_run[:5])
                      + (" ..." if len(not_run) > 5 else ""), "yellow"))
    last = gate_line(gate, settings.alpha, interrupted, unjudged_count(outcomes, not_run))
    if last:
        lines.append((last, "red" if interrupted or (gate is not None and gate.failed) else "green"))
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
