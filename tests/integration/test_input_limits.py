"""Issue 13, "Nothing bad gets in": each input a hostile user found to cause a traceback, a
hang or a memory blow-up is one clear error at parse time (or, for the server's
max_model_len, before any prompt is built). One regression test per defect; the fuzz
suite (test_fuzz_inputs.py) covers the space around them."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from pytest_kvcache.errors import WorkloadError
from pytest_kvcache.scenarios import parse_scenario
from helpers.scenario_files import refused

pytest_plugins = ("pytester",)

VALID = "name: s\nphase: prefill\nmatrix:\n  backend: [cpu]\n  input_len: [1k]\n"


# -- 1. YAML and number bombs -------------------------------------------------------------


def test_huge_values_are_shown_short_in_messages(tmp_path):
    error = refused(tmp_path, VALID + "api: [" + ", ".join(["x"] * 20_000) + "]\n", "api")
    assert "characters)" in str(error) and len(str(error)) < 300
    refused(tmp_path, VALID + "? " + "k" * 10_000 + "\n: 1\n", "k" * 60 + "...", "unknown key")


# -- 1b. the server's max_model_len, before any prompt is built -------------------------------

MODEL = "limit-test-model"


@pytest.fixture(scope="module")
def short_server(tmp_path_factory):
    """The reference server with a max_model_len of 4,096 tokens."""
    from pytest_kvcache.testing import start_reference_server

    server = start_reference_server(tmp_path_factory.mktemp("ref"), "--ttft-ms", "1", "--itl-ms", "1",
                                    "--max-model-len", "4096", model=MODEL)
    yield server.url
    server.stop()


def _case(**data):
    return parse_scenario({"name": "s", "phase": "prefill", "matrix": {"backend": ["none"]}, "concurrency": 2,
                           "num_prompts": 2, "trials": 1, "rounds": ["cold"], **data}, "s.yaml").cases[0]


@pytest.mark.parametrize("data,length", [
    ({"input_len": 5000}, "5,001"),
    ({"input_len": 4000, "output_len": 200}, "4,200"),
    ({"input_len": 100, "dataset": "multiturn", "num_prompts": 1,
      "dataset_options": {"num_turns": 21, "num_tokens": 150, "output_num_tokens": 50}}, "4,200"),
])
def test_an_item_longer_than_the_servers_max_model_len_fails_before_any_prompt(short_server, monkeypatch, data,
                                                                                length):
    from pytest_kvcache import runner as runner_mod
    from pytest_kvcache.runner import CaseRunner
    from pytest_kvcache.telemetry import TelemetrySource

    built = []

    async def never(*args, **kwargs):
        built.append(kwargs)
        raise AssertionError("a prompt was built")

    monkeypatch.setattr(runner_mod, "build_prompts", never)
    case = _case(**data)
    start = time.perf_counter()
    with pytest.raises(WorkloadError) as info:
        CaseRunner().run(case, short_server, MODEL, [0], telemetry=TelemetrySource(metrics_urls=()))
    assert time.perf_counter() - start < 5 and not built
    message = str(info.value)
    assert message.startswith(f"{case.name}: requests of up to {length} tokens"), message
    assert "max_model_len of 4,096" in message


def test_an_item_within_max_model_len_runs_and_gets_the_request_timeout(short_server, monkeypatch):
    from pytest_kvcache import runner as runner_mod
    from pytest_kvcache.runner import CaseRunner
    from pytest_kvcache.telemetry import TelemetrySource

    specs = []
    real = runner_mod.run_round

    async def spy(pool, spec, prompts, round_name, *args, **kw):
        specs.append(spec)
        return await real(pool, spec, prompts, round_name, *args, **kw)

    monkeypatch.setattr(runner_mod, "run_round", spy)
    trials = CaseRunner(request_timeout=7.5).run(_case(input_len=4000, output_len=96), short_server, MODEL, [0],
                                                 telemetry=TelemetrySource(metrics_urls=()))
    assert trials[0].rounds[0].failed == 0 and [s.timeout_s for s in specs] == [7.5]


# -- 2. collisions: one baseline and result file per item, one results folder per run ----------


def test_same_named_scenario_files_in_two_folders_are_refused_naming_both(pytester):
    for folder in ("a", "b"):
        pytester.mkdir(folder)
        pytester.mkdir(f"{folder}/scenarios")
        pytester.path.joinpath(folder, "scenarios", "prefill.yaml").write_text(VALID)
    result = pytester.runpytest("--collect-only", "a", "b")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*b/scenarios/prefill.yaml: scenario files a/scenarios/prefill.yaml and "
                                 "b/scenarios/prefill.yaml share the name 'prefill'*baselines/prefill/*rename one*"])
    assert "Traceback" not in result.stdout.str()
    # each alone keeps its key: a key never depends on which files a run collects
    alone = pytester.runpytest("--collect-only", "-q", "b")
    assert alone.ret == 0


def test_same_stem_yaml_and_yml_in_one_folder_are_refused(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "s.yaml").write_text(VALID)
    pytester.path.joinpath("scenarios", "s.yml").write_text(VALID)
    result = pytester.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*share the name 's'*"])


PRINT_DIRS = """
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    s = kv_session(session.config).settings
    print("DIRS", s.results_dir, s.baseline_dir, s.request_timeout)
"""


def _dirs(result: pytest.RunResult) -> list[str]:
    (line,) = [line for line in result.outlines if line.startswith("DIRS ")]
    return line.split()[1:]


def test_every_run_gets_its_own_results_folder_sortable_by_time(pytester):
    """Runs started in the same second shared run-<seconds>; now microseconds and a random part."""
    pytester.makeconftest(PRINT_DIRS)
    folders = [Path(_dirs(pytester.runpytest("--collect-only", "-q", "-s"))[0]) for _ in range(3)]
    assert len(set(folders)) == 3
    for folder in folders:
        assert folder.parent == pytester.path / "kvcache-results"
        assert re.fullmatch(r"run-\d{8}-\d{6}-\d{6}-[0-9a-f]{4}", folder.name), folder.name
    assert sorted(folders, key=lambda f: f.name[:-5]) == folders  # by time, the random part aside


# -- 3. options ---------------------------------------------------------------------------------


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "s.yaml").write_text(VALID)
    pytester.path.joinpath("a-file").write_text("not a folder")
    return pytester


def usage_error(project: pytest.Pytester, *args: str, ini: str = "") -> str:
    if ini:
        project.makeini(f"[pytest]\n{ini}\n")
    result = project.runpytest("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text
    return result.stderr.str()


@pytest.mark.parametrize("args,ini,message", [
    (["--kv-results-dir=a-file/out"], "", "--kv-results-dir / kvcache_results_dir = 'a-file/out': *a-file is not a "
                                          "folder; pass a folder this user can write"),
    ([], "kvcache_results_dir = a-file", "--kv-results-dir / kvcache_results_dir = 'a-file': *a-file is not a folder*"),
    (["--baseline-dir=a-file/bl"], "", "--baseline-dir / kvcache_baseline_dir = 'a-file/bl': *is not a folder*"),
    (["--update-baselines"], "kvcache_baseline_dir = a-file/x", "--baseline-dir / kvcache_baseline_dir*a-file*"),
])
def test_folders_that_cannot_be_written_are_one_usage_error_at_start(project, args, ini, message):
    stderr = usage_error(project, *args, ini=ini)
    assert re.search(message.replace("*", ".*").replace("(", r"\(").replace(")", r"\)"), stderr), stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_read_only_results_folder_is_a_usage_error(project):
    locked = project.mkdir("locked")
    locked.chmod(0o500)
    try:
        assert "is not writable by this user" in usage_error(project, "--kv-results-dir=locked/out")
    finally:
        locked.chmod(0o700)


def test_tilde_in_folders_is_the_home_folder(project, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    project.makeconftest(PRINT_DIRS)
    result = project.runpytest("--collect-only", "-q", "-s", "--baseline-dir=~/bl", "--kv-results-dir=~/out")
    assert result.ret == 0, result.stderr.str()
    assert _dirs(result)[:2] == [str(tmp_path / "out"), str(tmp_path / "bl")]
    project.makeini("[pytest]\nkvcache_baseline_dir = ~/ini-bl\n")
    assert _dirs(project.runpytest("--collect-only", "-q", "-s"))[1] == str(tmp_path / "ini-bl")
    assert not (project.path / "~").exists()


@pytest.mark.parametrize("args,ini", [(["-o", "kvcache_strict_baselines=maybe"], ""),
                                      ([], "kvcache_strict_baselines = maybe")])
def test_strict_baselines_ini_that_is_no_boolean_names_the_key(project, args, ini):
    stderr = usage_error(project, *args, ini=ini)
    assert "--strict-baselines / kvcache_strict_baselines: invalid truth value 'maybe'; use true or false" in stderr


def test_update_and_reset_baselines_together_are_refused(project):
    stderr = usage_error(project, "--update-baselines", "--reset-baselines")
    assert "--update-baselines and --reset-baselines exclude each other" in stderr


@pytest.mark.parametrize("args,ini", [(["--percentiles", "50,50"], ""), (["--percentiles", "90,99,90.0"], ""),
                                      ([], "kvcache_percentiles = 99,99")])
def test_repeated_percentiles_are_refused(project, args, ini):
    assert re.search(r"--percentiles / kvcache_percentiles: '.*' names percentile \d+ more than once",
                     usage_error(project, *args, ini=ini))


def test_request_timeout_option_help_good_bad_and_ini(project):
    text = project.runpytest("--help").stdout.str()
    assert "--kv-request-timeout" in text and "kvcache_request_timeout" in text
    project.makeconftest(PRINT_DIRS)
    assert _dirs(project.runpytest("--collect-only", "-q", "-s"))[2] == "600.0"
    assert _dirs(project.runpytest("--collect-only", "-q", "-s", "--kv-request-timeout", "30"))[2] == "30.0"
    for bad in ("0", "-5", "soon", "nan", "inf", "86401"):
        stderr = usage_error(project, f"--kv-request-timeout={bad}")
        assert f"--kv-request-timeout / kvcache_request_timeout = '{bad}': use seconds above 0" in stderr
    project.makeini("[pytest]\nkvcache_request_timeout = 45\n")
    assert _dirs(project.runpytest("--collect-only", "-q", "-s"))[2] == "45.0"
    assert "kvcache_request_timeout = 'never'" in usage_error(project, ini="kvcache_request_timeout = never")


@pytest.mark.parametrize("args,message", [
    (["--trials", "1000000000"], "argument --trials: '1000000000': use a positive integer up to 100"),
    (["--kv-client-processes", "100000"], "argument --kv-client-processes: '100000': use a positive integer up to 256"),
    (["--input-len", "1000m"], "argument --input-len: '1000m': *at most 10m"),
    (["--kv-endpoint", "http://127.0.0.1:99999"], "--kv-endpoint / kvcache_endpoint = 'http://127.0.0.1:99999'"),
    (["--kv-endpoint", "http://user:s3cret@:8000"], "--kv-endpoint / kvcache_endpoint = 'http://user:***@:8000'"),
])
def test_out_of_range_option_values_are_usage_errors(project, args, message):
    stderr = usage_error(project, *args)
    assert re.search(re.escape(message).replace(r"\*", ".*"), stderr), stderr
    assert "s3cret" not in stderr


# -- 3b. credentials in --kv-endpoint are never shown or stored -------------------------------------


def test_credentials_in_the_endpoint_reach_no_report_run_file_or_terminal(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "s.yaml").write_text(
        "name: s\nphase: prefill\nmatrix:\n  backend: [none]\n  input_len: [100]\n  concurrency: [1]\n"
        "num_prompts: 2\ntrials: 2\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--emulator-profile", "fixed",
                                           "--kv-endpoint", "http://ci-user:s3cretT0ken@10.0.0.9:8000",
                                           "--update-baselines", "--baseline-dir", "bl", "--kv-results-dir", "out",
                                           "--kv-history", "none", timeout=120)
    assert result.ret == 0, result.stdout.str()
    out = pytester.path / "out"
    assert (out / "report.html").is_file() and (out / "run.json").is_file() and (out / "summary.md").is_file()
    assert "ci-user:***@10.0.0.9:8000" in (out / "run.json").read_text()
    assert "ci-user:***@10.0.0.9:8000" in result.stdout.str()
    for path in [p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".html", ".md", ".csv")]:
        assert "s3cretT0ken" not in path.read_text(errors="replace"), path
    assert "s3cretT0ken" not in result.stdout.str() + result.stderr.str()
    assert json.loads((out / "run.json").read_text())["settings"]["endpoint"] == "http://ci-user:***@10.0.0.9:8000"
