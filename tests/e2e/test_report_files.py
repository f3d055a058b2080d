"""One emulator run writes every run file: JSON, CSV, markdown, HTML, plots, JUnit
properties and pytest-benchmark's JSON; the HTML is opened in a real headless chromium.

The module runs pytest twice in a scratch project (about 10 s): once to store a
baseline, once to compare with it (so the baseline-vs-current plot has both sides),
with runner labels so the network plot is drawn too.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.kvproject import make_project, run_pytest

from pytest_kvcache.report.rows import SEED_COLUMNS

SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none, cpu]
  input_len: [1k]
  concurrency: [8]
  output_len: [1]
num_prompts: 16
rounds: [cold, warm]
trials: 2
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
  total_token_throughput: {direction: higher, threshold: 5%}
"""
ITEMS = ("prefill[none-1k-c8]", "prefill[cpu-1k-c8]")
PLOTS = ("ttft_vs_input_len.png", "throughput_vs_input_len.png", "baseline_vs_current.png", "pareto.png",
         "network.png")





@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    project = make_project(tmp_path_factory.mktemp("report-project"), SCENARIO)
    # a module fixture runs before conftest's autouse one sets PYTEST_ADDOPTS: the test projects'
    # client floor (conftest's TEST_PROJECT_CLIENT_FLOOR) is given here
    labels = ["--kv-label", "bandwidth=400Gbps", "--kv-label", "direction=east-west", "--kv-client-floor=0.5"]
    first = run_pytest(project, "--update-baselines", "--kv-results-dir=first", *labels)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_pytest(project, "-v", "--kv-results-dir=out", "--junitxml=junit.xml", "--benchmark-json=bench.json",
                        "--kv-run-noise=5%", *labels)
    # 0, or 1 if this machine's noise made an item FAIL/WARN: the files must be there either way
    assert second.returncode in (0, 1), second.stdout + second.stderr
    return {"project": project, "out": project / "out", "stdout": second.stdout}


def test_terminal_has_header_progress_and_table(run):
    out = run["stdout"]
    assert "kvcache: pytest-kvcache" in out and "server=emulator" in out
    assert "kvcache: GPU: emulated" in out
    assert "kvcache: labels: bandwidth=400Gbps, direction=east-west" in out
    # progress reaches the terminal through pytest's (default, fd) capture
    assert "kvcache prefill[cpu-1k-c8]: trial 2 warm: 16/16 requests" in out
    assert "regression gate: " in out and "(4 comparisons" in out or "FAILED after Holm" in out
    assert f"report {run['out'] / 'report.html'}" in out


def test_item_json_and_run_json(run):
    out = run["out"]
    for item in ITEMS:
        doc = json.loads((out / "small" / f"{item}.json").read_text())
        assert doc["schema_version"] == 2 and doc["status"] in ("compared", "failed")
        assert doc["server"]["label.bandwidth"] == "400Gbps"
    session = json.loads((out / "run.json").read_text())
    assert session["kind"] == "pytest-kvcache run"
    assert session["items"] == [f"scenarios/small.yaml::{i}" for i in ITEMS]
    assert session["item_files"] == [f"small/{i}.json" for i in ITEMS]
    assert session["gate"]["comparisons"] == 4 and session["gate"]["line"].startswith("regression gate:")
    assert len(session["summary"]["rows"]) == 4
    assert any(line.startswith("kvcache: labels:") for line in session["header"])


def test_csv_has_the_seed_columns_and_a_row_per_item_and_trial(run):
    with (run["out"] / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys())[:len(SEED_COLUMNS)] == SEED_COLUMNS
    assert [(r["item"], r["iteration"]) for r in rows] == [(i, t) for i in ITEMS for t in ("1", "2")]
    for r in rows:
        assert r["folder"] == "out" and r["phase"] == "prefill" and r["input_len"] == "1000"
        assert r["bandwidth"] == "400Gbps" and r["direction"] == "east-west" and r["arcc"] == ""
        assert float(r["mean_ttft_ms"]) > 0 and float(r["total_token_throughput"]) > 0
        assert r["mean_itl_ms"] == ""  # one output token: no inter-token latency, never a fake 0
    assert {r["kvcache"]: r["modality"] for r in rows} == {"none": "HBM", "cpu": "CPU"}
    with (run["out"] / "pareto_frontier.csv").open() as f:
        assert len(list(csv.DictReader(f))) >= 1


def test_markdown_summary(run):
    md = (run["out"] / "summary.md").read_text()
    assert md.startswith("## pytest-kvcache results")
    assert "Regression gate passed (4 comparisons" in md or "Regression gate FAILED" in md
    assert "| item | metric | baseline | current |" in md
    assert "| prefill[cpu-1k-c8] | median_ttft_ms |" in md
    assert "`plots/pareto.png`" in md
    # the emulator's hit tokens per tier, in the tier table
    assert "| prefill[cpu-1k-c8] | emulator (warm) | cpu | - | - | - |" in md


def _png_checks(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        assert width >= 600 and height >= 400, (path.name, im.size)
        gray = im.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 100, f"{path.name} looks blank"
        # not blank: a fair share of the pixels are drawn (not the white background)
        drawn = sum(count for value, count in enumerate(gray.histogram()) if value < 200)
        assert drawn > 0.005 * width * height, f"{path.name}: only {drawn} drawn pixels"


@pytest.mark.parametrize("name", PLOTS)
def test_every_plot_is_a_real_picture(run, name):
    pytest.importorskip("PIL", reason="Pillow (a matplotlib dependency) opens the PNG")
    _png_checks(run["out"] / "plots" / name)


def test_junit_xml_carries_the_figures(run):
    import xml.etree.ElementTree as ET

    tree = ET.parse(run["project"] / "junit.xml")
    cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")} for c in tree.iter("testcase")}
    props = cases["prefill[cpu-1k-c8]"]
    assert props["kvcache.backend"] == "cpu" and props["kvcache.verdict"] in ("PASS", "WARN", "FAIL")
    assert float(props["kvcache.median_ttft_ms"]) > 0
    assert props["kvcache.label.bandwidth"] == "400Gbps"
    assert props["kvcache.json"] == "small/prefill[cpu-1k-c8].json"
    assert "kvcache.median_ttft_ms.change_pct" in props


def test_pytest_benchmark_json_carries_our_trials(run):
    bench = json.loads((run["project"] / "bench.json").read_text())
    entries = {b["name"]: b for b in bench["benchmarks"]}
    assert set(entries) == set(ITEMS)
    entry = entries["prefill[cpu-1k-c8]"]
    assert entry["stats"]["rounds"] == 2  # one round per trial: the trials' median TTFT, in seconds
    ttfts = entry["extra_info"]["trials"]["median_ttft_ms"]
    assert sorted(entry["stats"]["data"]) == pytest.approx(sorted(v / 1000 for v in ttfts))
    assert entry["extra_info"]["kvcache_backend"] == "cpu"
    assert entry["extra_info"]["verdicts"]["median_ttft_ms"]["zone"] in ("PASS", "WARN", "FAIL")
    assert entry["group"] == "kvcache prefill"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_in_headless_chromium(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the HTML report is "
                    "checked in a real headless browser only where one is")
    report = run["out"] / "report.html"
    html = report.read_text()
    for plot in PLOTS:
        assert f'src="plots/{plot}"' in html
    assert 'href="small/prefill%5Bcpu-1k-c8%5D.json"' in html
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files"]
    env = dict(os.environ, HOME=str(tmp_path))
    # The DOM as the browser built it in a 1400-pixel window: the tables are there and fit the
    # page, every image loaded, and the baseline-vs-current plot is shown at the page's width.
    probe = ("<script>window.onload=()=>{document.title=JSON.stringify({"
             "rows:document.querySelectorAll('#summary tbody tr').length,"
             "tables:Object.fromEntries([...document.querySelectorAll('table')].map("
             "t=>[t.id,Math.round(t.getBoundingClientRect().width)])),"
             "imgs:[...document.images].map(i=>[i.getAttribute('src'),i.naturalWidth,"
             "Math.round(i.getBoundingClientRect().width)])})}</script>")
    page = run["out"] / "report-probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    try:
        dom = subprocess.run([*base, "--window-size=1400,1400", "--virtual-time-budget=5000", "--dump-dom",
                              page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    finally:
        page.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    loaded = json.loads(title.replace("&quot;", '"'))
    assert loaded["rows"] == 4
    assert {src for src, _, _ in loaded["imgs"]} == {f"plots/{p}" for p in PLOTS}
    assert all(natural >= 800 for _, natural, _ in loaded["imgs"]), loaded["imgs"]  # all loaded
    shown = {src: width for src, _, width in loaded["imgs"]}
    assert shown["plots/baseline_vs_current.png"] > 1000 >= shown["plots/pareto.png"]  # full width, not a thumbnail
    assert loaded["tables"]["items"] <= 1280 and loaded["tables"]["summary"] <= 1280, loaded["tables"]
    # And a screenshot: the table (top) and the first plot are drawn.
    shot = tmp_path / "report.png"
    result = subprocess.run([*base, "--window-size=1280,1400", "--hide-scrollbars", f"--screenshot={shot}",
                             report.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    shutil.copy(shot, run["out"] / "report-screenshot.png")  # kept with the run, for a person to look at
    from PIL import Image

    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        width, height = rgb.size
        assert (width, height) == (1280, 1400)
        # The table is text at the top (dark pixels above the plots); the plots' points and
        # lines are matplotlib's default colours further down.
        top = rgb.crop((0, 0, width, 500)).convert("L")
        dark = sum(count for value, count in enumerate(top.histogram()) if value < 90)
        colours = ((31, 119, 180), (255, 127, 14))  # matplotlib's C0 and C1: the backends' points and lines
        pixels = getattr(rgb, "get_flattened_data", rgb.getdata)()
        plotted = sum(1 for px in pixels if any(all(abs(a - b) < 30 for a, b in zip(px, c))
                                                                  for c in colours))
        assert dark > 3000, "no table text in the top of the page"
        assert plotted > 100, "no plotted point or line visible: the plots were not drawn"
