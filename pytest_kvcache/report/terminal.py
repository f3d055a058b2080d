"""The terminal summary: the header, the verdict table, its notes and the gate's last line."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..decision import Gate, Zone
from ..models import ItemOutcome, Settings
from .redact import redact_url
from .text import fit_lines

__all__ = ["DROP_ORDER", "SUMMARY_HEADER", "ZONE_COLOURS", "fit_table", "gate_line", "header_lines", "render_summary",
           "summary_rows", "unjudged_count"]

#: Terminal colour of each zone (pytest's TerminalWriter markup names).
ZONE_COLOURS: dict[Zone, str] = {Zone.FAIL: "red", Zone.WARN: "yellow", Zone.IMPROVED: "cyan", Zone.PASS: "green"}


def _status_cell(outcome: ItemOutcome) -> str:
    """The status of an item without a verdict; a skip's or failure's reason is a note of
    its own under the table, whole (a cell cut it exactly where the fix was)."""
    return outcome.status.upper()


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{unit}"


SUMMARY_HEADER: tuple[str, ...] = ("item", "metric", "baseline", "current", "change", "95% CI of ratio",
                                    "run noise", "p", "p(Holm)", "q(BH)", "MDE", "verdict")


def summary_rows(outcomes: Sequence[ItemOutcome], gate: Gate | None) -> tuple[list[tuple[str, ...]], list[str]]:
    """The summary table's rows (cells as text, in :data:`SUMMARY_HEADER` order) and the
    notes under it; the terminal, the markdown summary and the HTML report share them.

    Only comparisons made against a baseline or a reference are in the gate (an update
    of the baselines compares too, to refuse a sick run, but decides nothing else)."""
    from .storage import storage_cells

    rows: list[tuple[str, ...]] = []
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
            metric, current = storage_cells(o) if hasattr(o, "storage") else ("median_ttft_ms", current)
            rows.append((o.case.name, metric, "-", current, "-", "-", "-", "-", "-", "-", "-",
                         _status_cell(o)))
            if o.status in ("skipped", "failed") and o.message:
                notes.append(f"{o.case.name} {_status_cell(o)}: {o.message.strip()}")
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
    for o in outcomes:  # a check that could not be made must not read as a pass
        check = getattr(o, "output_check", None)
        if check is not None and check.status == "unchecked":
            notes.append(f"{o.case.name} ANSWERS NOT CHECKED: {check.reason}")
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


def unjudged_count(outcomes: Sequence[ItemOutcome], not_run: Sequence[str]) -> int:
    """Items an interrupted run did not judge: those cut off and those never started."""
    return sum(1 for o in outcomes if o.status == "interrupted") + len(not_run)


def header_lines(settings: Settings, gpu: str | None = None, versions: dict | None = None) -> list[str]:
    """The session header: server, versions, GPU and labels (``pytest_report_header``)."""
    server = settings.server
    from .. import __version__
    from ..models import DEFAULT_CLIENT_FLOOR

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
    if settings.client_floor < DEFAULT_CLIENT_FLOOR:
        lines.append(f"kvcache: client floor {settings.client_floor:.0%} (--kv-client-floor): a round counts while "
                     "the client delivers that share of its concurrency and request rate")
    lines.append(f"kvcache: results: {settings.results_dir}")
    return lines


#: Columns of the verdict table left out, in this order, when it is wider than the terminal;
#: item, metric, change and verdict always stay (run.json, summary.md and report.html keep all).
DROP_ORDER: tuple[str, ...] = ("q(BH)", "MDE", "p", "run noise", "95% CI of ratio", "p(Holm)", "baseline", "current")
#: Colour of an item's status where it has no verdict.
_STATUS_COLOURS = {"FAILED": "red", "SKIPPED": "yellow"}


def _zone_colour(word: str) -> str | None:
    """The colour of a zone's word in a row of the table (None: the word names no zone)."""
    zone = Zone.named(word)
    return ZONE_COLOURS[zone] if zone else None


def _note_colour(note: str) -> str | None:
    """A note's colour, by the word before its first colon (a zone, or an item's status)."""
    word = note.split(": ", 1)[0].rsplit(" ", 1)[-1]
    colour = _zone_colour(word) or _STATUS_COLOURS.get(word)
    return colour or ("yellow" if note.startswith(("NOT COMPARED", "SESSION")) else None)


def _table_lines(header: Sequence[str], rows: Sequence[Sequence[str]], keep: Sequence[int]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in keep]
    lines = ["  ".join(str(header[i]).ljust(w) for i, w in zip(keep, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(row[i]).ljust(w) for i, w in zip(keep, widths)).rstrip() for row in rows]
    return lines


def fit_table(header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None,
              drop: Sequence[str] = DROP_ORDER) -> tuple[list[tuple[str, int | None]], list[str]]:
    """A table as lines within ``width`` columns, each with the index of its row (None for
    the header lines), and the columns it left out, in the order of ``drop`` (the verdict
    table's :data:`DROP_ORDER` unless given).

    When even the narrowest table is too wide (long item names), each item's name stands
    on a line of its own above its rows."""
    keep = list(range(len(header)))
    dropped: list[str] = []
    for name in (None, *drop):
        if name is not None and name in header:
            keep.remove(header.index(name))
            dropped.append(name)
        lines = _table_lines(header, rows, keep)
        if not width or max(map(len, lines)) <= width:
            return [(line, None if i < 2 else i - 2) for i, line in enumerate(lines)], dropped
    keep.remove(0)  # the item: above its rows instead
    table = _table_lines(header, rows, keep)
    out: list[tuple[str, int | None]] = [(line, None) for line in fit_lines(table[:2], width)]
    item = None
    for i, (row, line) in enumerate(zip(rows, table[2:])):
        if row[0] != item:
            item = row[0]
            out += [(text, i) for text in fit_lines([str(item)], width)]
        out += [(text, i) for text in fit_lines(["  " + line], width)]
    return out, dropped


def render_summary(outcomes: Sequence[ItemOutcome], gate: Gate | None, settings: Settings,
                   change_points: Sequence[Any] = (), interrupted: str | None = None,
                   not_run: Sequence[str] = (), width: int | None = None) -> list[tuple[str, str | None]]:
    """The summary's lines with the colour of each (None: the terminal's own), each within
    ``width`` columns when given: columns are left out by priority and notes wrapped."""
    server = settings.server
    top = (f"pytest-kvcache: server={server.kind}"
           + (f" endpoint={redact_url(server.endpoint)}" if server.endpoint else "")
           + (f" slowdown={server.emulator_slowdown:g}" if server.kind == "emulator" and server.emulator_slowdown != 1
              else "") + f"  results: {settings.results_dir}")
    lines: list[tuple[str, str | None]] = [("", None), *((text, None) for text in fit_lines([top], width))]
    rows, notes = summary_rows(outcomes, gate)
    table, dropped = fit_table(SUMMARY_HEADER, rows, width)
    lines += [(text, None if i is None else _zone_colour(rows[i][-1])) for text, i in table]
    if dropped:
        notes.insert(0, f"(columns left out to fit {width} columns: {', '.join(dropped)}; report.html, summary.md "
                        "and run.json have them)")
    for note in notes:
        lines += [(text, _note_colour(note)) for text in fit_lines(note.splitlines(), width)]
    from .storage import storage_lines
    from .tiers import tier_lines

    lines += [(text, None) for text in storage_lines(outcomes, width)]
    lines += [(text, None) for text in tier_lines(outcomes, width)]
    for cp in change_points:
        lines += [(text, ZONE_COLOURS[Zone.WARN])
                  for text in fit_lines([f"{Zone.WARN.value} change point: {cp.describe()}"], width)]
    if not_run:
        lines += [(text, "yellow") for text in fit_lines(
            [f"NOT RUN: {len(not_run)} item(s) never started: " + ", ".join(not_run[:5])
             + (" ..." if len(not_run) > 5 else "")], width)]
    last = gate_line(gate, settings.alpha, interrupted, unjudged_count(outcomes, not_run))
    if last:
        colour = "red" if interrupted or (gate is not None and gate.failed) else "green"
        lines += [(text, colour) for text in fit_lines([last], width)]
    return lines
