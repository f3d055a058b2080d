"""The files of a run folder, written once at the end of the session.

Besides the per-item JSON files (written as each item ends, :mod:`.json_report`):

``run.json``            the session: plugin version, times, server and labels, the summary
                        table, the tier table, the regression gate and the item files of
                        this session
``results.csv``         one row per item and trial (the seed's columns first, :mod:`.rows`)
``pareto_frontier.csv`` the rows on the TTFT / throughput Pareto frontier of their phase
``summary.md``          markdown for ``$GITHUB_STEP_SUMMARY``
``report.html``         table and plots together, links to every file; opens from disk
``plots/*.png``         :mod:`.plots`

Everything is made from the item JSON files on disk plus what only the session knows
(the gate, the baselines' trials), so a run under pytest-xdist, whose items ran in
several processes, gives the same files as a serial one. Nothing here imports pytest.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

from .._atomic import write_json_atomic, write_text_atomic
from ..models import ItemOutcome, Settings
from . import rows as _rows
from .redact import redact_url
from .storage import STORAGE_PLOT, plot_storage_tiers
from .terminal import SUMMARY_HEADER, gate_line, summary_rows, unjudged_count
from .tiers import TIER_HEADER, TIER_NOTE, tier_rows

__all__ = ["PLOT_FILES", "RUN_SCHEMA_VERSION", "comparison_points", "write_plots", "write_run_files"]

RUN_SCHEMA_VERSION = 1

#: The plots of a run folder: file name -> what it shows (the HTML report's captions).
PLOT_FILES: dict[str, str] = {
    "ttft_vs_input_len.png": "Mean TTFT against input length, a line per backend (media comparison), a panel "
                             "per phase",
    "throughput_vs_input_len.png": "Total token throughput against input length, a line per backend, a panel per "
                                   "phase",
    "baseline_vs_current.png": "Baseline against this run per item: trials as points, this run's 95% CI, a panel "
                               "per compared metric",
    "pareto.png": "TTFT against total token throughput, with the Pareto frontier, a panel per phase",
    "network.png": "Network comparison: TTFT by bandwidth and direction (runs with those labels)",
    STORAGE_PLOT[0]: STORAGE_PLOT[1],
}


def comparison_points(outcomes: Sequence[ItemOutcome], results_dir: Path, store=None) -> list:
    """Per item and compared metric: this run's trial values, the baseline's (from the
    store) or the paired reference's, the levels and the CI of this run's level."""
    from .plots import ComparisonPoints

    points = []
    for o in outcomes:
        if o.result is None:
            continue
        metrics = [t.metric for t in o.case.thresholds] or ["median_ttft_ms"]
        by_metric = {c.metric: (c, v) for c, v in zip(o.comparisons, o.verdicts)}
        history = None
        if o.reference is None and store is not None and o.json_path is not None:
            try:
                key = Path(o.json_path).resolve().relative_to(Path(results_dir).resolve()).with_suffix("").as_posix()
                baseline = store.load(key)
                history = baseline.runs if baseline is not None else None
            except Exception:  # a baseline that cannot be read is reported by the item itself
                history = None
        for metric in metrics:
            p = ComparisonPoints(item=o.case.name, metric=metric, current=o.result.metric_values(metric))
            if o.reference is not None:
                p.baseline = o.reference.metric_values(metric)
                p.baseline_label = f"reference ({o.case.reference_backend})"
            elif history:
                p.baseline = [v for run in history for v in run.values(metric)]
            if metric in by_metric:
                c, v = by_metric[metric]
                p.baseline_value, p.current_value, p.zone = c.baseline_value, c.current_value, v.zone
                if c.ci_low is not None and c.ci_high is not None:
                    p.ci_low, p.ci_high = c.baseline_value * c.ci_low, c.baseline_value * c.ci_high
            if p.current or p.baseline:
                points.append(p)
    return points


def write_plots(rows: list[dict], plots_dir: Path, points=None) -> list[Path]:
    """The plots of :data:`PLOT_FILES` that apply (baseline-vs-current needs ``points``,
    the network plot bandwidth or direction labels)."""
    from . import plots

    out = [
        plots.plot_metric_vs_input_len(rows, "mean_ttft_ms", plots_dir / "ttft_vs_input_len.png",
                                       title="Mean TTFT vs input length (line: mean of trials; points: trials)"),
        plots.plot_metric_vs_input_len(rows, "total_token_throughput", plots_dir / "throughput_vs_input_len.png",
                                       title="Total token throughput vs input length (line: mean of trials)"),
    ]
    if points is not None:
        out.append(plots.plot_baseline_vs_current(points, plots_dir / "baseline_vs_current.png"))
    out.append(plots.plot_pareto(rows, plots_dir / "pareto.png"))
    network = plots.plot_network(rows, plots_dir / "network.png")
    if network is not None:
        out.append(network)
    return out


def _server_info(run: _rows.RunFolder) -> dict:
    """The server info of the run's items, merged (the first item's value wins)."""
    info: dict = {}
    for item in run.items:
        for k, v in (item.doc.get("server") or {}).items():
            info.setdefault(k, v)
    return info


def write_run_files(results_dir: Path, outcomes: Sequence[ItemOutcome], gate, settings: Settings, store=None,
                    header: Sequence[str] = (), started: _dt.datetime | None = None,
                    history=None, interrupted: str | None = None, not_run: Sequence[str] = ()) -> dict[str, Path]:
    """Write every run file (see the module docstring); returns name -> path.

    ``interrupted``: what cut the run short (SIGINT, SIGTERM, KeyboardInterrupt), whose
    items ``not_run`` never started: the files then say the gate did not judge every item."""
    from .html_report import render_html
    from .markdown import render_markdown

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    item_files = []
    for o in outcomes:
        if o.json_path is not None and Path(o.json_path).is_file():
            try:
                item_files.append(Path(o.json_path).resolve().relative_to(results_dir.resolve()).as_posix())
            except ValueError:
                pass
    table, notes = summary_rows(outcomes, gate)
    session = {
        "kind": "pytest-kvcache run",
        "schema_version": RUN_SCHEMA_VERSION,
        "started": started.isoformat(timespec="seconds") if started else None,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "interrupted": interrupted is not None,
        "interrupted_by": interrupted,
        "not_run": list(not_run),
        "header": list(header),
        "settings": {"server": settings.server.kind,
                     "endpoint": settings.server.endpoint and redact_url(settings.server.endpoint),
                     "model": settings.server.model, "alpha": settings.alpha,
                     "client_floor": settings.client_floor,
                     # a rehearsal's mark, read back by compare (rows.run_slowdown)
                     "emulator_slowdown": settings.server.emulator_slowdown if settings.server.kind == "emulator"
                     else None,
                     "labels": dict(getattr(settings.server, "labels", ()) or ()),
                     "update_baselines": settings.update_baselines or settings.reset_baselines},
        "gate": {"failed": bool(gate and gate.failed), "failing": list(gate.failing) if gate else [],
                 "comparisons": len(gate.holm) if gate else 0, "judged": gate.judged if gate else 0,
                 "line": gate_line(gate, settings.alpha, interrupted, unjudged_count(outcomes, not_run)),
                 "unjudged": unjudged_count(outcomes, not_run),
                 "not_compared": list(gate.not_compared) if gate else [],
                 "night_shift": gate.night.message if gate and gate.night else None},
        "summary": {"header": list(SUMMARY_HEADER), "rows": [list(r) for r in table], "notes": notes},
        "tiers": {"header": list(TIER_HEADER), "rows": [list(r) for r in tier_rows(outcomes)], "note": TIER_NOTE},
        "history": None if history is None else {
            "store": history.location,
            "series": [{"item": i, "metric": m, "runs": n, "latest": v} for i, m, n, v in history.series],
            "change_points": [c.to_dict() for c in history.change_points],
            "lines": [c.describe() for c in history.change_points],
            "plots": list(history.plots)},
        "items": [o.nodeid for o in outcomes],
        "item_files": item_files,
    }
    session_path = results_dir / _rows.RUN_FILE
    write_json_atomic(session_path, session)
    run = _rows.load_run(results_dir)
    session["server_info"] = _server_info(run)
    write_json_atomic(session_path, session)

    trial_rows = _rows.item_rows(run, per_trial=True)
    usable = [r for r in trial_rows if r.get("usable")]
    frontier = _rows.pareto_frontiers(usable)
    paths = {
        "run.json": session_path,
        "results.csv": _rows.write_csv(trial_rows, results_dir / "results.csv"),
        "pareto_frontier.csv": _rows.write_csv(frontier, results_dir / "pareto_frontier.csv"),
    }
    points = comparison_points(outcomes, results_dir, store)
    for p in write_plots(usable, results_dir / "plots", points):
        paths[f"plots/{p.name}"] = p
    paths.update((f"plots/{p.name}", p) for p in plot_storage_tiers(outcomes, results_dir / "plots"))
    plots = [name for name in paths if name.startswith("plots/")]
    md = render_markdown(session, run, plots, link_base=None)
    paths["summary.md"] = results_dir / "summary.md"
    write_text_atomic(paths["summary.md"], md)
    paths["report.html"] = results_dir / "report.html"
    write_text_atomic(paths["report.html"], render_html(session, run, trial_rows, frontier, plots))
    return paths
