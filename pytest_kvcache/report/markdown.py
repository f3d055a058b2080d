"""The run's markdown summary, for ``$GITHUB_STEP_SUMMARY`` (GitHub-flavoured tables)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .headline import GateState, gate_state

__all__ = ["md_table", "render_markdown"]


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    lines.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)
    return lines


def _fmt(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _headline(session: Mapping[str, Any]) -> str:
    gate = session.get("gate") or {}
    match gate_state(session):
        case GateState.INTERRUPTED:
            failing = ": FAILED " + ", ".join(gate["failing"]) if gate.get("failed") else ""
            return (f"⛔ **Run INTERRUPTED** ({session.get('interrupted_by')}): the regression gate did not judge "
                    f"every item ({gate.get('unjudged', 0)} cut off or never started){failing}")
        case GateState.FAILED:
            return "❌ **Regression gate FAILED**: " + ", ".join(gate.get("failing", []))
        case GateState.PASSED:
            return f"✅ Regression gate passed ({gate['judged']} comparisons, Holm-corrected)"
        case GateState.NOT_COMPARED:
            return f"⚠️ Nothing judged: {len(gate['not_compared'])} item(s) NOT COMPARED"
        case _:
            return "ℹ️ No comparison with a baseline in this run"


def render_markdown(session: dict, run, plots: Sequence[str], link_base: str | None = None) -> str:
    """Headline (gate), set-up, the summary table, per-item figures, the tier table and the file list."""
    gate = session.get("gate") or {}
    out = ["## pytest-kvcache results", "", _headline(session), ""]
    if session.get("not_run"):
        out += [f"⚠️ {len(session['not_run'])} item(s) never started: " + "; ".join(session["not_run"][:5])
                + (" ..." if len(session["not_run"]) > 5 else ""), ""]
    if gate.get("judged") and gate.get("not_compared"):
        out += [f"⚠️ {len(gate['not_compared'])} item(s) NOT COMPARED: "
                + "; ".join(gate["not_compared"][:5]) + (" ..." if len(gate["not_compared"]) > 5 else ""), ""]
    if gate.get("night_shift"):
        out += [f"⚠️ {gate['night_shift']}", ""]
    if session.get("header"):
        out += [f"- {line.removeprefix('kvcache: ')}" for line in session["header"]] + [""]
    summary = session.get("summary") or {}
    if summary.get("rows"):
        out += ["### Verdicts", ""] + md_table(summary["header"], summary["rows"]) + [""]
    if summary.get("notes"):
        # a reason of several lines is one list item (its lines joined)
        out += ["- " + " ".join(part.strip() for part in note.splitlines()) for note in summary["notes"]] + [""]
    from .rows import item_rows

    rows = item_rows(run, per_trial=False)
    if rows:
        out += ["### Figures per item (measured round, usable trials pooled)", ""]
        out += md_table(("item", "backend", "modality", "input len", "mean TTFT (ms)", "std TTFT (ms)",
                         "median TTFT (ms)", "total throughput (tok/s)", "usable trials", "verdict"),
                        [(r["item"], r["kvcache"], r["modality"], r["input_len"], _fmt(r["mean_ttft_ms"]),
                          _fmt(r["std_ttft_ms"]), _fmt(r["median_ttft_ms"]), _fmt(r["total_token_throughput"]),
                          f"{r['usable']}/{r['trials']}", r["verdict"] or r["status"]) for r in rows])
        out.append("")
    tiers = session.get("tiers") or {}
    if tiers.get("rows"):
        out += ["### Tiers: the storage phase and the servers side by side", ""]
        out += md_table(tiers["header"], tiers["rows"]) + ["", f"_{tiers.get('note')}_", ""]
    history = session.get("history") or {}
    if history.get("lines"):
        out += ["### Change points in the history", ""] + [f"- ⚠️ {line}" for line in history["lines"]] + [""]
    base = (link_base.rstrip("/") + "/") if link_base else ""
    files = ["report.html", "results.csv", "pareto_frontier.csv", "run.json", *plots]
    out += ["### Files in the run folder", "", ", ".join(f"`{base}{f}`" for f in files), ""]
    return "\n".join(out)
