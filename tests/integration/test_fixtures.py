"""Benchmarks written as Python tests with the kv_* fixtures, on the scenario items' engine:
parametrization and selection, skips, server reuse, the load and the gate, xdist, and a
scenario and its hand-written twin judged side by side in one session."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(pytester: pytest.Pytester, *args: str, timeout: float = 300) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--kv-results-dir={pytester.path / 'out'}",
                                         *args, timeout=timeout)


def collected(pytester: pytest.Pytester, *args: str) -> list[str]:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only", "-q", *args)
    assert result.ret in (0, pytest.ExitCode.NO_TESTS_COLLECTED), result.stdout.str()
    return [line.split("::", 1)[1] for line in result.outlines if "::" in line]


GRID = """
import pytest

@pytest.mark.kvcache(backend=["none", "cpu"], input_len=["1k", "10k"], concurrency=16)
def test_grid(kv_load):
    pass

@pytest.mark.kvcache(backend="cpu", phase="multiturn")
def test_chat(kv_load):
    pass

def test_default(kv_params):
    assert kv_params.backend == "none"

def test_unrelated():
    pass
"""


def test_parametrization_markers_and_filters(pytester):
    pytester.makepyfile(test_grid=GRID)
    # one test per combination, named by the marker's lists, grouped by backend (one server each)
    assert collected(pytester) == ["test_grid[none-1k-c16]", "test_grid[none-10k-c16]", "test_default[none]",
                                   "test_grid[cpu-1k-c16]", "test_grid[cpu-10k-c16]", "test_chat[cpu]",
                                   "test_unrelated"]
    # -m on the backend and phase markers, and the filters, as for scenario items; a filter on
    # a list the marker does not give deselects the test
    assert collected(pytester, "-m", "cpu", "--input-len", "1k") == ["test_grid[cpu-1k-c16]"]
    assert collected(pytester, "-m", "multiturn") == ["test_chat[cpu]"]
    assert collected(pytester, "-m", "kvcache", "--backend", "none") == ["test_grid[none-1k-c16]",
                                                                         "test_grid[none-10k-c16]",
                                                                         "test_default[none]"]
    assert collected(pytester, "--concurrency", "16", "--input-len", "10k") == [
        "test_grid[none-10k-c16]", "test_grid[cpu-10k-c16]", "test_unrelated"]


def test_the_examples_select_as_the_readme_says(pytester):
    shutil.copytree(EXAMPLES, pytester.path / "examples")
    assert collected(pytester, "examples", "-m", "cpu", "--input-len", "1k") == ["test_warm_ttft[cpu-1k]"]
    assert collected(pytester, "examples", "-m", "waterfall") == [
        "test_disk_serves_what_ram_cannot_hold[waterfall-10k]"]


@pytest.mark.parametrize("marker,message", [
    ('backend=["xpu"]', "unknown backend 'xpu'"),
    ("input_lens=[1]", "kvcache(input_lens=...): unknown"),
    ('input_len="lots"', "input_len='lots': 'lots' is not a token count"),
    ('thresholds={"median_ttft_ms": "-3%"}', "the threshold must be a percentage above 0"),
])
def test_a_bad_marker_is_one_clear_collection_error(pytester, marker, message):
    pytester.makepyfile(test_bad=f"import pytest\n\n@pytest.mark.kvcache({marker})\ndef test_x(kv_load):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*test_bad.py::test_x: *{message}*"])
    assert "Traceback" not in result.stdout.str()


MISUSE = """
import pytest

@pytest.mark.kvcache(backend="mooncake")
def test_unavailable(kv_load):
    pass

def test_bad_length(kv_load):
    kv_load.run(input_len="lots")

def test_unknown_keyword(kv_load):
    kv_load.run(input_len=100, colour="red")

def test_foreign_result(kv_gate):
    kv_gate.check(object())
"""


def test_skips_and_misuse_are_clear_and_reported(pytester):
    pytester.makepyfile(test_misuse=MISUSE)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1, failed=3)
    result.stdout.fnmatch_lines_random([
        "SKIPPED*backend 'mooncake' is not emulated yet*",
        "*kv_load.run: input_len: 'lots' is not a token count*",
        "*kv_load.run: unknown keyword 'colour'*",
        "*kv_gate.check: pass a kv_load.run result of this test*"])
    assert "Traceback" not in result.stdout.str()
    # each is an item of the session: a summary row and a JSON file with its status
    docs = {p.name: json.loads(p.read_text()) for p in (pytester.path / "out" / "test_misuse").glob("*.json")}
    assert {name: doc["status"] for name, doc in docs.items()} == {
        "test_unavailable[mooncake].json": "skipped", "test_bad_length[none].json": "failed",
        "test_unknown_keyword[none].json": "failed", "test_foreign_result[none].json": "failed"}
    result.stdout.fnmatch_lines(["test_unavailable?mooncake? *SKIPPED: backend 'mooncake' is not emulated*"])


SERVERS = """
import json
from pathlib import Path

import pytest

SEEN = Path(__file__).parent / "seen.jsonl"


def note(**facts):
    with SEEN.open("a") as f:
        f.write(json.dumps(facts) + "\\n")


@pytest.mark.kvcache(backend=["none", "cpu"])
def test_server_and_send(kv_server, kv_load, kv_params):
    text = kv_server.detokenize([100, 200, 300])
    ids = kv_server.tokenize(text)
    assert ids == [100, 200, 300]
    assert kv_server.kind == "emulator" and kv_server.backend == kv_params.backend
    # text and token ids given as they are; each answer's text comes back
    answers = kv_load.send(["alpha beta gamma " * 100, ids * 50], output_len=4, concurrency=2)
    assert answers.complete and [r.prompt_len for r in answers.records] == [300, 150]
    assert all(len(text.split()) == 4 for text in answers.texts)
    assert kv_server.metrics()["vllm:prompt_tokens_total"] >= 450
    note(test="send", backend=kv_params.backend, url=kv_server.base_url)


@pytest.mark.kvcache(backend=["none", "cpu"])
def test_run(kv_server, kv_load, kv_params):
    result = kv_load.run(input_len=600, num_prompts=4, concurrency=4, output_len=2, trials=[1, 4])
    assert [t.index for t in result.trials] == [1, 4] and result.case.dataset == "random"
    assert all(t.measured.summary["completed"] == 4 for t in result.trials)
    assert result.server["server"] == "emulator" and result.case.name == f"test_run[{kv_params.backend}]"
    note(test="run", backend=kv_params.backend, url=kv_server.base_url)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.kvcache(backend="cpu")
async def test_async(kv_server, kv_load):
    result = await kv_load.arun(prompts=["delta " * 700, "epsilon " * 600], trials=1)
    warm = result.trials[0].measured
    assert result.case.dataset == "prompts" and result.case.input_len == 700 and result.case.num_prompts == 2
    assert warm.telemetry["external_hit_tokens"] >= 512 + 512  # the same prompts again: from the tier
    note(test="async", backend="cpu", url=kv_server.base_url)
"""


def test_one_server_per_configuration_and_the_load_api(pytester):
    pytester.makepyfile(test_servers=SERVERS)
    result = run(pytester, "-rA")
    # no gate in these tests: measured, and in the summary as such
    result.assert_outcomes(passed=5)
    seen = [json.loads(line) for line in (pytester.path / "seen.jsonl").read_text().splitlines()]
    assert [(s["test"], s["backend"]) for s in seen] == [("send", "none"), ("run", "none"), ("send", "cpu"),
                                                         ("run", "cpu"), ("async", "cpu")]
    assert len({s["url"] for s in seen if s["backend"] == "none"}) == 1
    assert len({s["url"] for s in seen if s["backend"] == "cpu"}) == 1
    logs = sorted(p.name for p in (pytester.path / "out" / "logs").glob("emulator-*.log"))
    assert logs == ["emulator-cpu-1.log", "emulator-none-0.log"]  # one emulator per configuration
    # a test that only sent rounds leaves no item; one that measured a result is MEASURED
    rows = summary_rows(result.outlines)
    assert [(r[0], r[-1]) for r in rows] == [("test_run[none]", "MEASURED"), ("test_run[cpu]", "MEASURED"),
                                            ("test_async[cpu]", "MEASURED")]


def summary_rows(lines: list[str]) -> list[list[str]]:
    """The rows of the summary table (item first, verdict last)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("item ") and "verdict" in line)
    rows = []
    for line in lines[start + 2:]:
        cells = line.split()
        if len(cells) < 3 or "[" not in cells[0] or cells[1].endswith(":"):
            break  # the notes under the table start here
        rows.append(cells)
    return rows


TWIN_YAML = """
name: prefill
phase: prefill
matrix:
  backend: [none]
  input_len: [1k]
  concurrency: [16]
  output_len: [4]
num_prompts: 48
rounds: [cold]
trials: 3
thresholds:
  median_ttft_ms: {direction: lower, threshold: 10%}
"""
TWIN_PY = """
import pytest


@pytest.mark.kvcache(backend="none", input_len="1k", concurrency=16, output_len=4,
                     thresholds={"median_ttft_ms": {"direction": "lower", "threshold": "10%"}})
def test_prefill(kv_load, kv_gate):
    kv_gate.check(kv_load.run(num_prompts=48, rounds=["cold"], trials=3))
"""
YAML_ITEM, PY_ITEM = "prefill[none-1k-c16]", "test_prefill[none-1k-c16-o4]"


def twin_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return run(pytester, "--emulator-profile=fixed", "--kv-server-args=--fixed-ttft-ms 200 --fixed-itl-ms 8",
               "scenarios", "test_twin.py", *args)


def test_a_scenario_and_its_python_twin_are_one_engine(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "twin.yaml").write_text(TWIN_YAML)
    pytester.makepyfile(test_twin=TWIN_PY)
    for _ in range(3):
        twin_run(pytester, "--update-baselines").assert_outcomes(passed=2)
    baselines = pytester.path / "baselines"
    stored = {key: json.loads((baselines / f"{key}.json").read_text())
              for key in (f"twin/{YAML_ITEM}", f"test_twin/{PY_ITEM}")}
    assert all(len(doc["runs"]) == 3 for doc in stored.values())
    yaml_testbed, py_testbed = (doc["testbed"] for doc in stored.values())
    assert yaml_testbed == py_testbed  # same workload, backend and server: the same testbed

    unchanged = twin_run(pytester)
    unchanged.assert_outcomes(passed=2)
    out = pytester.path / "out"
    docs = {"yaml": json.loads((out / "twin" / f"{YAML_ITEM}.json").read_text()),
            "py": json.loads((out / "test_twin" / f"{PY_ITEM}.json").read_text())}
    # the same numbers (within the fixed server's noise), the same JSON, the same verdict
    assert docs["py"]["median_ttft_ms"] == pytest.approx(docs["yaml"]["median_ttft_ms"], rel=0.03)
    assert set(docs["py"]) == set(docs["yaml"]) and docs["py"]["completed"] == docs["yaml"]["completed"] == 144
    scenario = {k: v for k, v in docs["yaml"]["scenario"].items() if k not in ("name", "file")}
    assert {k: v for k, v in docs["py"]["scenario"].items() if k not in ("name", "file")} == scenario
    for doc in docs.values():
        assert doc["verdict"]["zone"] == "PASS" and doc["verdict"]["comparisons"][0]["runs_baseline"] == 3
    # one row each in every report, both in the gate
    rows = summary_rows(unchanged.outlines)
    assert [(r[0], r[1], r[-1]) for r in rows] == [(YAML_ITEM, "median_ttft_ms", "PASS"),
                                                   (PY_ITEM, "median_ttft_ms", "PASS")]
    unchanged.stdout.fnmatch_lines(["regression gate: passed (2 comparisons, Holm at alpha 0.05)*"])
    session = json.loads((out / "run.json").read_text())
    assert [r[0] for r in session["summary"]["rows"]] == [YAML_ITEM, PY_ITEM]
    assert [item.split("::")[-1] for item in session["items"]] == [YAML_ITEM, PY_ITEM]
    with (out / "results.csv").open() as f:
        items = [row["item"] for row in csv.DictReader(f)]
    assert items == [YAML_ITEM] * 3 + [PY_ITEM] * 3  # a row per trial
    for name in ("summary.md", "report.html"):
        text = (out / name).read_text()
        assert YAML_ITEM in text and PY_ITEM in text, name

    # 30% slower: both fail, with the same message, and the session fails
    slower = twin_run(pytester, "--emulator-slowdown=1.3")
    assert slower.ret == pytest.ExitCode.TESTS_FAILED
    slower.assert_outcomes(failed=2)
    lines = [line.strip() for line in slower.outlines if line.strip().startswith("median_ttft_ms: baseline")]
    masked = {re.sub(r"[0-9.e+-]+", "N", line) for line in lines}
    assert len(lines) >= 2 and len(masked) == 1, lines
    assert "(Bonferroni over 2 planned comparisons)" in lines[0]  # the Python test is in the plan
    assert slower.stdout.str().count("performance regression:") >= 2
    slower.stdout.fnmatch_lines([("regression gate: FAILED after Holm correction*prefill?none-1k-c16?: "
                                  "median_ttft_ms, test_prefill?none-1k-c16-o4?: median_ttft_ms*")])
    for doc in (out / "twin" / f"{YAML_ITEM}.json", out / "test_twin" / f"{PY_ITEM}.json"):
        comparison = json.loads(doc.read_text())["verdict"]["comparisons"][0]
        assert comparison["verdict"]["zone"] == "FAIL" and comparison["test"] == "run-level, confirmed"

    # a rehearsal is never stored, for either
    before = {p: p.read_bytes() for p in baselines.rglob("*.json")}
    refused = twin_run(pytester, "--update-baselines", "--emulator-slowdown=1.3")
    refused.assert_outcomes(failed=2)
    assert refused.stdout.str().count("baseline NOT updated: --emulator-slowdown 1.3 rehearses a regression") >= 2
    assert {p: p.read_bytes() for p in baselines.rglob("*.json")} == before


ONE_RUN = """
import pytest


@pytest.mark.kvcache(backend="none", input_len="1k", output_len=4)
def test_prefill(kv_load, kv_gate):
    verdict = kv_gate.check(kv_load.run(num_prompts=32, rounds=["cold"], trials=3), ["median_ttft_ms"])
    print("VERDICT", verdict.status, verdict.zone.value if verdict.zone else None)
"""


def test_one_baseline_run_and_the_run_noise(pytester):
    pytester.makepyfile(test_one=ONE_RUN)
    args = ("--emulator-profile=fixed", "--kv-server-args=--fixed-ttft-ms 200 --fixed-itl-ms 8", "-s")
    missing = run(pytester, *args, "-rs")
    missing.assert_outcomes(skipped=1)
    missing.stdout.fnmatch_lines(["*no baseline for test_one/test_prefill?none-1k-o4? in*--update-baselines*"])
    stored = run(pytester, *args, "--update-baselines")
    stored.assert_outcomes(passed=1)
    stored.stdout.fnmatch_lines(["*VERDICT baseline-updated None*"])
    # one stored run: not judged (WARN, no failure) unless the run-to-run noise is given
    unjudged = run(pytester, *args, "--emulator-slowdown=1.3")
    assert unjudged.ret == 0
    unjudged.stdout.fnmatch_lines(["*VERDICT compared WARN*", "*not judged*--kv-run-noise*"])
    judged = run(pytester, *args, "--emulator-slowdown=1.3", "--kv-run-noise=2%")
    assert judged.ret == pytest.ExitCode.TESTS_FAILED
    judged.stdout.fnmatch_lines(["*performance regression:*",
                                 "*median_ttft_ms: baseline * ms (1 runs), current * ms*"
                                 "change +*% (threshold 10%), p=*"])


MIXED_PY = """
import pytest


@pytest.mark.kvcache(backend=["none", "cpu"], input_len="600")
def test_small(kv_load):
    result = kv_load.run(num_prompts=4, concurrency=4, trials=1)  # no request waits: the guard has nothing to judge
    assert result.trials[0].usable
    assert result.case.backend != "cpu", "a failure of the test's own assertion"
"""
MIXED_YAML = """
name: small
phase: prefill
matrix:
  backend: [none]
  input_len: [600]
  concurrency: [4]
  output_len: [1]
num_prompts: 4
trials: 1
"""


def test_xdist_gathers_fixture_tests_with_scenario_items(pytester):
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e '.[test]')")
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "small.yaml").write_text(MIXED_YAML)
    pytester.makepyfile(test_mixed=MIXED_PY)
    result = run(pytester, "-n", "2", "scenarios", "test_mixed.py")
    assert "2 workers [3 items]" in result.stdout.str()
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    rows = {r[0]: r for r in summary_rows(result.outlines)}
    assert list(rows) == ["small[none-600-c4]", "test_small[none-600]", "test_small[cpu-600]"]  # collection order
    assert rows["test_small[none-600]"][-1] == "MEASURED"
    assert re.search(r"test_small\[cpu-600\] .*FAILED: AssertionError: a failure", result.stdout.str())
    session = json.loads((pytester.path / "out" / "run.json").read_text())
    assert len(session["items"]) == 3
    assert set(p.name for p in (pytester.path / "out" / "logs").iterdir()) <= {"gw0", "gw1"}  # a folder per worker


def test_the_examples_pass_on_the_emulator(pytester):
    shutil.copytree(EXAMPLES, pytester.path / "examples", ignore=shutil.ignore_patterns("scenarios", "*.yml"))
    result = run(pytester, "examples/test_backends_ttft.py::test_warm_ttft[cpu-1k]", "examples/test_conversation.py",
                 "examples/test_second_tier.py", "examples/test_paired_backends.py", "-rs", timeout=600)
    # the TTFT example has no stored baseline here: measured, then skipped with the reason
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(["*no baseline for test_backends_ttft/test_warm_ttft?cpu-1k? in*"])
    rows = {r[0]: r[-1] for r in summary_rows(result.outlines)}
    assert rows["test_cpu_offload_beats_recompute[cpu-10k]"] == "PASS"  # the paired comparison, in the gate
