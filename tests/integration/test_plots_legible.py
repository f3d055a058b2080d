"""The plots read right: legends beside the data (never over it, the title or off the
figure), a look of its own for every series, log axes where values span decades, a panel
per phase, no empty panel, no point on an edge; and ``compare`` over 2 and over 20 run
folders, with its per-item change table.

Run folders are written here as JSON (what a pytest session writes), so nothing runs a
server; the figures are caught as the plot functions close them.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest

from pytest_kvcache.__main__ import main
from pytest_kvcache.decision import Zone
from pytest_kvcache.models import format_tokens
from pytest_kvcache.report import plots
from pytest_kvcache.report.rows import RESULT_SCHEMA_VERSION, load_run

BACKENDS = ("none", "cpu", "disk", "gds", "redis", "lmcache_server", "native")
LENGTHS = (100, 1000, 10_000, 100_000)


def _item(phase: str, scenario: str, backend: str, n: int, conc: int, out: int, ttft: float, tput: float,
          trials: int = 2) -> tuple[str, dict]:
    name = f"{phase}[{backend}-{format_tokens(n)}-c{conc}]"
    rounds = [{"warm": {"mean_ttft_ms": ttft * (1 + 0.01 * t), "median_ttft_ms": ttft,
                        "total_token_throughput": tput * (1 - 0.01 * t), "mean_tpot_ms": 5.0 if out > 1 else None}}
              for t in range(trials)]
    doc = {"schema_version": RESULT_SCHEMA_VERSION, "item": f"scenarios/{scenario}.yaml::{name}", "status": "compared",
           "mean_ttft_ms": ttft, "median_ttft_ms": ttft, "total_token_throughput": tput, "usable_trials": trials,
           "scenario": {"file": f"/p/scenarios/{scenario}.yaml", "phase": phase, "backend": backend, "input_len": n,
                        "concurrency": conc, "output_len": out, "num_prompts": 8, "measure_round": "warm"},
           "server": {"server": "emulator"},
           "trials": [{"index": t, "usable": True, "rounds": r} for t, r in enumerate(rounds)],
           "verdict": {"zone": "PASS"}}
    return f"{scenario}/{name}.json", doc


def make_run(root: Path, name: str, scale: float = 1.0, slowdown: float | None = None,
             phases: bool = False) -> Path:
    """A run folder: 7 backends x 4 input lengths of the prefill phase (and, with ``phases``,
    a multi-turn and a shared-prefix item)."""
    run = root / name
    files = []
    entries = [_item("prefill", "seed_prefill", b, n, 16, 1, scale * (5 + n / 100) * (1 + i / 10),
                     scale * 1e5 / (1 + i / 10)) for i, b in enumerate(BACKENDS) for n in LENGTHS]
    if phases:
        entries += [_item("multiturn", "multiturn", "cpu", 128, 8, 16, 300 * scale, 4000 / scale),
                    _item("shared_prefix", "shared_prefix", "cpu", 4000, 8, 1, 60 * scale, 9000 / scale)]
    for rel, doc in entries:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(json.dumps(doc))
        files.append(rel)
    settings = {"server": "emulator", "emulator_slowdown": slowdown or 1.0}
    (run / "run.json").write_text(json.dumps({"items": [json.loads((run / f).read_text())["item"] for f in files],
                                              "item_files": files, "settings": settings, "header": []}))
    return run


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every figure the plot functions close, left open to be measured."""
    plt = plots._plt()
    close = plt.close
    caught = []
    monkeypatch.setattr(plt, "close", lambda fig=None: caught.append(fig))
    yield caught
    close("all")


def layout_problems(fig) -> list[str]:
    """Legends over a panel's data area, a panel's title or the figure's title, or off the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    problems = []
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    titles = [ax.title for ax in fig.axes if ax.get_title()] + ([fig._suptitle] if fig._suptitle else [])
    for legend in legends:
        box = legend.get_window_extent(renderer)
        if box.x0 < page.x0 - 1 or box.x1 > page.x1 + 1 or box.y0 < page.y0 - 1 or box.y1 > page.y1 + 1:
            problems.append(f"legend {box} runs off the figure {page}")
        for ax in fig.axes:
            if box.overlaps(ax.get_window_extent(renderer)):
                problems.append(f"legend over the data of panel {ax.get_title()!r}")
        for title in titles:
            if box.overlaps(title.get_window_extent(renderer)):
                problems.append(f"legend over the title {title.get_text()!r}")
    return problems


def line_looks(fig) -> list[tuple]:
    return [(line.get_color(), line.get_marker(), line.get_linestyle()) for ax in fig.axes for line in ax.lines
            if line.get_marker() not in (None, "None", "")]


def _by_name(figures, name: str):
    """The caught figure whose suptitle contains ``name``."""
    return next(f for f in figures if f._suptitle is not None and name in f._suptitle.get_text())


@pytest.mark.parametrize("runs", [2, 20])
def test_compare_plots_are_legible_and_series_distinct(tmp_path, figures, capsys, runs):
    for i in range(runs):
        make_run(tmp_path / "results", f"run-{i:02d}", scale=1 + i / 50, slowdown=1.3 if i == 1 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Tight layout not applied" and its kind fail here
        assert main(["compare", str(tmp_path / "results"), "-o", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert len(figures) == 4  # ttft, throughput, pareto, changes (no network labels)
    for fig in figures:
        assert layout_problems(fig) == [], fig._suptitle.get_text()
    ttft = _by_name(figures, "mean TTFT (ms) vs input length")
    looks = line_looks(ttft)
    assert len(looks) == runs * len(BACKENDS) and len(set(looks)) == len(looks)  # no two series alike
    (ax,) = ttft.axes
    assert ax.get_xscale() == "log"  # 100 to 100k tokens
    # the legend: a colour per backend, a marker per run (not runs x backends entries)
    (legend,) = ttft.legends
    assert len(legend.get_texts()) == len(BACKENDS) + 1 + runs
    assert "run-01 (slowdown x1.3)" in [t.get_text() for t in legend.get_texts()]
    # the per-item change table: every item of every later run against the first
    assert "Per-item change against run-00" in out
    rows = list(csv.DictReader((tmp_path / "cmp" / "changes.csv").open()))
    assert len(rows) == (runs - 1) * len(BACKENDS) * len(LENGTHS)
    first = next(r for r in rows if r["run"].startswith("run-01") and r["item"] == "prefill[cpu-10k-c16]")
    assert first["reference"] == "run-00"
    assert float(first["mean_ttft_ms_change_pct"]) == pytest.approx(2.0, abs=0.2)  # scale 1.02
    printed = [line.split() for line in out.splitlines()]
    if runs == 2:  # item by item
        assert ["prefill[cpu-10k-c16]", "run-01", "(slowdown", "x1.3)", "115.5", "117.8", "+2.0%"] in \
            [cells[:7] for cells in printed]
    else:  # a line per run, every item in changes.csv
        assert ["run-19", "28", "+38.0%", "(+38.0%", "to", "+38.0%)"] in [cells[:6] for cells in printed]
    marked = list(csv.DictReader((tmp_path / "cmp" / "compare.csv").open()))
    assert {r["emulator_slowdown"] for r in marked if r["folder"] == "run-01"} == {"1.3"}
    assert {r["emulator_slowdown"] for r in marked if r["folder"] == "run-00"} == {""}
    assert (tmp_path / "cmp" / "changes.png").stat().st_size > 10_000


def test_series_styles_are_distinct_for_many_series():
    flat = plots.SeriesStyles([(f"s{i}", "") for i in range(150)])
    looks = {flat.style(f"s{i}", "") for i in range(150)}
    assert len(looks) == 150
    factored = plots.SeriesStyles([(b, f"run-{r}") for r in range(20) for b in BACKENDS])
    assert factored.factored
    assert len({factored.style(b, f"run-{r}") for r in range(20) for b in BACKENDS}) == 140
    # two runs of seven backends: the colour tells the backend, never two runs' lines alike
    two = plots.SeriesStyles([(b, run) for run in ("a", "b") for b in BACKENDS])
    assert two.style("cpu", "a").colour == two.style("cpu", "b").colour
    assert two.style("cpu", "a").colour != two.style("none", "b").colour


def test_run_plots_panel_per_phase_log_axes_padding_and_no_empty_panel(tmp_path, figures):
    from pytest_kvcache.report.rows import item_rows, pareto_frontiers
    from pytest_kvcache.report.run_files import write_plots

    run = load_run(make_run(tmp_path, "run", phases=True))
    rows = item_rows(run, per_trial=True)
    points = [plots.ComparisonPoints(item=r["item"], metric="median_ttft_ms", current=[r["median_ttft_ms"]],
                                     baseline=[r["median_ttft_ms"] * 0.98], baseline_value=r["median_ttft_ms"] * 0.98,
                                     current_value=r["median_ttft_ms"], zone=Zone.PASS)
              for r in rows if r["iteration"] == 1]
    points.append(plots.ComparisonPoints(item="multiturn[cpu-128-c8]", metric="mean_tpot_ms", current=[5.0, 5.1],
                                         zone=Zone.PASS))
    points.append(plots.ComparisonPoints(item="prefill[none-1k-c16]", metric="p99_ttft_ms", current=[]))  # nothing
    write_plots(rows, tmp_path / "plots", points)
    for fig in figures:
        assert layout_problems(fig) == [], fig._suptitle.get_text()
    pareto = _by_name(figures, "up and left is better")
    assert [ax.get_title() for ax in pareto.axes] == ["prefill (c16, out1)", "multiturn (c8, out16)",
                                                      "shared_prefix (c8, out1)"]
    labels = [t.get_text() for t in pareto.legends[0].get_texts()]
    assert "cpu" in labels and not any("multiturn multiturn" in label or "(CPU)" in label for label in labels)
    assert len(pareto_frontiers(rows)) >= 3  # a frontier per phase
    baseline = _by_name(figures, "baseline vs this run")
    assert len(baseline.axes) == 2  # median TTFT and TPOT; the metric without points has no panel
    ttft_panel, tpot_panel = baseline.axes
    assert ttft_panel.get_yscale() == "log"  # 6 ms to 1 s
    assert [t.get_text() for t in tpot_panel.get_xticklabels()] == ["multiturn[cpu-128-c8]"]  # its items only
    # the legend stands right of the panels, over none of the data
    (legend,) = baseline.legends
    assert legend.get_window_extent().x0 >= max(ax.get_window_extent().x1 for ax in baseline.axes)


def test_one_item_run_draws_its_point_inside_the_plot(tmp_path, figures):
    rows = [{"folder": "r", "phase": "prefill", "kvcache": "cpu", "modality": "CPU", "input_len": 10_000,
             "mean_ttft_ms": 120.0, "total_token_throughput": 5e4, "item": "prefill[cpu-10k-c16]", "iteration": 1}]
    plots.plot_pareto(rows, tmp_path / "p.png")
    plots.plot_metric_vs_input_len(rows, "mean_ttft_ms", tmp_path / "t.png")
    for fig, (x, y) in zip(figures, [(120.0, 5e4), (10_000.0, 120.0)]):
        ax = fig.axes[0]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert x0 < x < x1 and y0 < y < y1
        assert min(x - x0, x1 - x) > 0.05 * (x1 - x0) and min(y - y0, y1 - y) > 0.05 * (y1 - y0)
