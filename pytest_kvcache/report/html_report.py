"""``report.html``: the summary table, the plots and links to every file of the run folder.

One static page with relative links and no scripts: it opens from a downloaded CI
artifact (``file://``) with no server.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from ..decision import Zone
from .headline import GateState, gate_state

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1280px;
     padding:0 1em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0} th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;white-space:nowrap} th{background:#f2f2f2;white-space:normal;vertical-align:bottom}
tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.name{white-space:normal;overflow-wrap:anywhere;
min-width:9em}
.banner{padding:.6em 1em;border-radius:4px;font-weight:600;margin:.8em 0}
.fail{background:#fde2e1;color:#8b1a12} .pass{background:#e3f5e1;color:#1d5e17} .info{background:#eef2f7}
.warn{background:#fff1dc;color:#7a4500}
.PASS{color:#1d7a13;font-weight:600} .WARN{color:#a65c00;font-weight:600} .FAIL{color:#b3150b;font-weight:700}
.IMPROVED{color:#0b6e8a;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0;border:1px solid #ddd;padding:.5em;background:#fff}
figure img{max-width:600px;width:100%;height:auto;display:block} figcaption{font-size:.8em;color:#555;max-width:600px}
figure.wide{flex-basis:100%} figure.wide img{max-width:100%} figure.wide figcaption{max-width:none}
ul.header{font-family:ui-monospace,monospace;font-size:.85em;list-style:none;padding-left:0}
.notes{font-size:.85em;color:#444;white-space:pre-wrap} .wrap{overflow-x:auto;max-width:100%}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _href(rel: str) -> str:
    return quote(rel, safe="/")


def _num(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], table_id: str, names: int = 0) -> str:
    """An HTML table; the first ``names`` columns hold names that may wrap (the others do not)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            text = str(cell)
            zone = Zone.named(text.split(":")[0])
            cls = zone.value if zone else ""
            if not cls and text[:1] in "-+0123456789[" and text not in ("-",):
                cls = "num"
            if index < names:
                cls = "name"
            cells.append(f'<td class="{cls}">{cell if isinstance(cell, _Raw) else _e(cell)}</td>' if cls
                         else f"<td>{cell if isinstance(cell, _Raw) else _e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wrap"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


class _Raw(str):
    """Already escaped HTML for a table cell."""


#: The banner's class for each state of the gate (a colour of _CSS).
_BANNER_CLASS = {GateState.INTERRUPTED: "fail", GateState.FAILED: "fail", GateState.PASSED: "pass",
                 GateState.NOT_COMPARED: "warn", GateState.NO_COMPARISON: "info"}


def _banner(session: Mapping[str, Any]) -> str:
    gate = session.get("gate") or {}
    state = gate_state(session)
    text = {GateState.FAILED: f"Regression gate FAILED: {', '.join(gate.get('failing', []))}",
            GateState.PASSED: gate.get("line") or "Regression gate passed",
            GateState.NO_COMPARISON: "No comparison with a baseline in this run."}.get(state, gate.get("line"))
    return f'<div class="banner {_BANNER_CLASS[state]}">{_e(text)}</div>'


def _verdicts(session: Mapping[str, Any]) -> list[str]:
    summary = session.get("summary") or {}
    parts = ["<h2>Verdicts</h2>"]
    if summary.get("rows"):
        parts.append(_table(summary["header"], summary["rows"], "summary", names=1))
    else:
        parts.append("<p>No items ran.</p>")
    if summary.get("notes"):
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in summary["notes"]) + "</ul>")
    return parts


def _tiers(session: Mapping[str, Any]) -> list[str]:
    """The tier table: the storage phase's tiers and the servers' side by side (none without)."""
    tiers = session.get("tiers") or {}
    if not tiers.get("rows"):
        return []
    return ["<h2>Tiers: the storage phase and the servers side by side</h2>",
            _table(tiers["header"], tiers["rows"], "tiers", names=1), f'<p class="notes">{_e(tiers.get("note"))}</p>']


def _items(run: Any) -> list[str]:
    from .rows import item_rows

    rows = []
    for r in item_rows(run, per_trial=False):
        # the item names its file: the link's text need not repeat it (the table fits the page)
        link = _Raw(f'<a href="{_href(r["file"])}" title="{_e(r["file"])}">JSON</a>')
        backend = r["kvcache"] if str(r["modality"]).lower() == str(r["kvcache"]).lower() \
            else f'{r["kvcache"]} ({r["modality"]})'
        rows.append((r["item"], backend, r["input_len"], r["concurrency"], _num(r["mean_ttft_ms"]),
                     _num(r["median_ttft_ms"]), _num(r["p99_ttft_ms"]), _num(r["total_token_throughput"]),
                     f"{r['usable']}/{r['trials']}", r["verdict"] or r["status"].upper(), link))
    return ["<h2>Items</h2>", _table(("item", "backend (medium)", "input len", "concurrency", "mean TTFT (ms)",
                                      "median TTFT (ms)", "p99 TTFT (ms)", "total throughput (tok/s)",
                                      "usable trials", "verdict", "file"), rows, "items", names=2)]


def _plots(plots: Sequence[str], captions: Mapping[str, str]) -> list[str]:
    parts = ["<h2>Plots</h2><div class=\"plots\">"]
    for rel in plots:
        name = rel.split("/")[-1]
        # a panel per compared metric, an item per column: shown at the page's width, never as a thumbnail
        wide = ' class="wide"' if name == "baseline_vs_current.png" else ""
        parts.append(f'<figure{wide}><a href="{_href(rel)}"><img src="{_href(rel)}" alt="{_e(name)}"></a>'
                     f"<figcaption>{_e(captions.get(name, name))}</figcaption></figure>")
    parts.append("</div>")
    return parts


def _history(history: Mapping[str, Any]) -> list[str]:
    parts = [f"<h2>History</h2><p>Every run is recorded in <code>{_e(history['store'])}</code>; "
             "<code>python -m pytest_kvcache history</code> shows every series.</p>"]
    if history["lines"]:
        parts.append('<ul class="notes">' + "".join(f'<li class="{Zone.WARN.value}">change point: {_e(line)}</li>'
                                                    for line in history["lines"]) + "</ul>")
    else:
        parts.append(f"<p>No change point among the last runs of this session's "
                     f"{len(history['series'])} series.</p>")
    parts.append('<div class="plots">' + "".join(
        f'<figure><a href="{_href(rel)}"><img src="{_href(rel)}" alt="{_e(rel)}"></a>'
        f"<figcaption>{_e(rel.split('/')[-1])}</figcaption></figure>" for rel in history["plots"]) + "</div>")
    parts.append(_table(("item", "metric", "runs recorded", "latest"),
                        [(s["item"], s["metric"], s["runs"], _num(s["latest"])) for s in history["series"]],
                        "history"))
    return parts


def render_html(session: Mapping[str, Any], run: Any, trial_rows: Sequence[Mapping[str, Any]],
                frontier: Sequence[Mapping[str, Any]], plots: Sequence[str],
                captions: Mapping[str, str] | None = None) -> str:
    from .run_files import PLOT_FILES

    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>pytest-kvcache run {_e(run.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>pytest-kvcache run <code>{_e(run.name)}</code></h1>",
        f"<div>finished {_e(session.get('finished'))}</div>",
        _banner(session),
    ]
    if session.get("header"):
        parts.append('<ul class="header">' + "".join(f"<li>{_e(h)}</li>" for h in session["header"]) + "</ul>")
    parts += _verdicts(session)
    parts += _items(run)
    parts += _tiers(session)
    parts += _plots(plots, captions or PLOT_FILES)
    if session.get("history"):
        parts += _history(session["history"])
    parts.append("<h2>Pareto frontier of each phase (mean TTFT vs total token throughput, per trial)</h2>")
    parts.append(_table(("item", "trial", "mean TTFT (ms)", "total throughput (tok/s)"),
                        [(r["item"], r["iteration"], _num(r["mean_ttft_ms"]), _num(r["total_token_throughput"]))
                         for r in frontier], "pareto", names=1))
    links = ["results.csv", "pareto_frontier.csv", "summary.md", "run.json", "logs/"]
    parts.append("<h2>Files</h2><ul>" + "".join(f'<li><a href="{_href(f)}">{_e(f)}</a></li>' for f in links)
                 + f"<li>{len(trial_rows)} CSV rows (one per item and trial)</li></ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
