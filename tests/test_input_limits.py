"""Issue 13, "Nothing bad gets in": each input a hostile user found to cause a traceback, a
hang or a memory blow-up is one clear error at parse time (or, for the server's
max_model_len, before any prompt is built). One regression test per defect; the fuzz
suite (test_fuzz_inputs.py) covers the space around them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest

from pytest_kvcache.errors import ScenarioError, WorkloadError
from pytest_kvcache.scenarios import MAX_FILE_BYTES, load_scenario, parse_scenario

pytest_plugins = ("pytester",)

VALID = "name: s\nphase: prefill\nmatrix:\n  backend: [cpu]\n  input_len: [1k]\n"
TOP_LEN = "name: s\nphase: prefill\nmatrix:\n  backend: [cpu]\n"  # input_len free to set at top level


def refused(tmp_path: Path, text: str | bytes, key: str, *words: str, seconds: float = 10.0) -> ScenarioError:
    """Load ``text`` as a scenario file: a ScenarioError naming the file, ``key`` and ``words``, in bounded time
    (a bomb takes minutes; 10 s holds on a busy shared runner)."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert time.perf_counter() - start < seconds
    message = str(info.value)
    assert info.value.key == key, message
    assert message.startswith(f"{path}: key '{key}': "), message
    for word in words:
        assert word in message, message
    assert "\n" not in message
    return info.value


# -- 1. YAML and number bombs -------------------------------------------------------------


def test_alias_bomb_in_description_is_refused_before_it_expands(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    text = VALID + "description: &bomb\n" + "".join(f"  {line}\n" for line in lines)
    refused(tmp_path, text, "<yaml>", "more than 100,000 nodes", "aliases expanded")


def test_recursive_alias_is_refused(tmp_path):
    refused(tmp_path, VALID + "description: &loop [*loop]\n", "<yaml>", "recursive")


def test_shared_anchor_within_the_limits_still_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID + "slo: &slo {ttft: 500}\nthresholds:\n  median_ttft_ms: &t {threshold: 10%}\n"
                    "  p99_ttft_ms: *t\n")
    assert load_scenario(path).cases[0].slos == (("ttft", 500.0),)


def test_matrix_of_64_million_items_is_refused_before_expansion(tmp_path):
    def values(n: int, unit: str = "") -> str:
        return "[" + ", ".join(f"{i + 1}{unit}" for i in range(n)) + "]"

    text = ("name: s\nphase: prefill\nmatrix:\n  backend: [none, cpu, disk, gds, redis, lmcache_server, mooncake, "
            f"native]\n  input_len: {values(200)}\n  concurrency: {values(200)}\n  output_len: {values(200)}\n")
    refused(tmp_path, text, "matrix", "64,000,000 items", "8 x 200 x 200 x 200", "1,000")


@pytest.mark.parametrize("line,key,words", [
    ("input_len: 1000m", "input_len", ("10m tokens",)),
    ("num_prompts: 1000000000000", "num_prompts", ("100,000",)),
    ("trials: 1000000000", "trials", ("up to 100",)),
    ("warmup_requests: 1000000000", "warmup_requests", ("10,000",)),
    ("concurrency: 1000000000", "concurrency", ("4,096",)),
    ("output_len: 100000000", "output_len", ("10,000,000",)),
    ("seed: 100000000000000000000", "seed", ("2**63",)),
])
def test_huge_numbers_are_refused_with_the_limit(tmp_path, line, key, words):
    refused(tmp_path, TOP_LEN + ("" if line.startswith("input_len") else "input_len: 1k\n") + line + "\n", key, *words)


def test_huge_kv_target_is_refused(tmp_path):
    config = '{num_hidden_layers: 2, num_attention_heads: 2, hidden_size: 4}'
    refused(tmp_path, VALID + f"kv_target_gb: 1.0e+300\nmodel_config: {config}\n", "kv_target_gb", "1,000,000")
    # within the GB limit, the prompts it would take are still bounded
    refused(tmp_path, VALID + f"kv_target_gb: 1000000\nmodel_config: {config}\n", "kv_target_gb", "100,000")


def test_round_tokens_are_bounded(tmp_path):
    refused(tmp_path, VALID.replace("[1k]", "[10m]") + "num_prompts: 11\n", "num_prompts",
            "110,000,011 tokens", "100,000,000")
    refused(tmp_path, VALID.replace("[1k]", "[1m]") + "num_prompts: 50\nwarmup_requests: 60\n", "warmup_requests",
            "100,000,000")


def test_request_rate_too_low_to_finish_a_round_is_refused(tmp_path):
    refused(tmp_path, VALID + "request_rate: 0.000001\n", "request_rate", "50 requests", "3,600 s",
            "at least 0.0139")
    path = tmp_path / "ok.yaml"
    path.write_text(VALID + "request_rate: 0.02\n")  # 50 requests in 2,500 s
    assert load_scenario(path).cases[0].request_rate == 0.02


@pytest.mark.parametrize("value", [".nan", ".NaN", "-.inf", "0", "-1", "'fast'", "true"])
def test_request_rate_nan_and_other_non_rates_are_refused(tmp_path, value):
    refused(tmp_path, VALID + f"request_rate: {value}\n", "request_rate", "requests per second")


def test_many_turns_are_refused(tmp_path):
    text = VALID + "dataset: multiturn\ndataset_options: {num_turns: 1000000000}\n"
    refused(tmp_path, text, "dataset_options.num_turns", "1,000")
    # within the turn limit, a conversation whose last prompt would exceed 10m tokens
    text = VALID + "dataset: multiturn\ndataset_options: {num_turns: 1000, num_tokens: 20000}\nnum_prompts: 1\n"
    refused(tmp_path, text, "dataset_options", "last prompt", "10,000,000")


def test_many_shared_prefixes_are_refused_and_unused_ones_never_built(tmp_path):
    text = VALID + "dataset: shared_prefix\ndataset_options: {num_prefixes: 1000000000}\n"
    refused(tmp_path, text, "dataset_options.num_prefixes", "100,000")
    from pytest_kvcache.workloads import build_prompts

    class Codec:
        vocab_size = None
        decoded = 0

        async def encode(self, text):
            return text.split()

        async def decode(self, ids):
            return " ".join(map(str, ids))

    start = time.perf_counter()
    prompts = asyncio.run(build_prompts(Codec(), dataset="shared_prefix", input_len=1000, output_len=1, num_prompts=2,
                                        seed=0, trial=0, options={"num_prefixes": 100_000, "hit_ratio": 0.9}))
    assert len(prompts) == 2 and time.perf_counter() - start < 2


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    refused(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "<file>", "not UTF-8", "0x89 at offset 0")
    refused(tmp_path, VALID.encode() + b"description: caf\xe9\n", "<file>", "not UTF-8", "0xe9")
    refused(tmp_path, VALID.encode() + b"description: a\x00b\n", "<yaml>", "not valid YAML")


def test_deeply_nested_yaml_is_refused(tmp_path):
    refused(tmp_path, VALID + "description: " + "[" * 100_000 + "]" * 100_000 + "\n", "<yaml>", "32 levels")
    refused(tmp_path, VALID + "description:\n" + "".join(f"{'  ' * (i + 1)}k{i}:\n" for i in range(200)) + "\n",
            "<yaml>", "32 levels")


def test_oversized_file_is_refused_without_reading_it_all(tmp_path):
    refused(tmp_path, VALID + "#" * MAX_FILE_BYTES + "\n", "<file>", "256 KiB")


@pytest.mark.parametrize("value,words", [("1" * 5000, ("4300 digits",)), ("2024-13-45", ("month",))])
def test_values_yaml_cannot_hold_are_refused(tmp_path, value, words):
    refused(tmp_path, VALID + f"seed: {value}\n", "<yaml>", "a value cannot be read", *words)


@pytest.mark.parametrize("config,words", [
    ({"num_hidden_layers": 2, "num_attention_heads": 0, "hidden_size": 64}, ("num_attention_heads = 0",)),
    ({"num_hidden_layers": -2, "num_attention_heads": 2, "hidden_size": 64}, ("num_hidden_layers = -2",)),
    ({"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 4}, ("hidden_size is smaller",)),
    ({"num_hidden_layers": float("inf"), "num_attention_heads": 2, "hidden_size": 64}, ("num_hidden_layers = inf",)),
    ({"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64, "num_key_value_heads": "x"},
     ("num_key_value_heads",)),
    ({"num_hidden_layers": 10**400, "num_attention_heads": 2, "hidden_size": 64}, ("1,000,000",)),
])
def test_model_config_with_zero_or_absurd_sizes_is_refused(config, words):
    with pytest.raises(ScenarioError) as info:
        parse_scenario({"name": "s", "phase": "kv_size", "matrix": {"backend": ["cpu"], "input_len": [1000]},
                        "kv_target_gb": 1, "model_config": config}, "x.yaml")
    assert info.value.key == "model_config"
    for word in words:
        assert word in str(info.value)


def test_model_config_files_that_are_not_configs_are_refused(tmp_path):
    base = {"name": "s", "phase": "kv_size", "matrix": {"backend": ["cpu"], "input_len": [1000]}, "kv_target_gb": 1}
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "big.json").write_text(" " * (5 * 2**20))
    os.mkfifo(tmp_path / "fifo.json")  # would block a plain read forever
    for name, words in (("deep.json", "as JSON"), ("big.json", "4 MiB"), ("fifo.json", "no such file"),
                        ("x" * 300, "File name too long")):
        with pytest.raises(ScenarioError) as info:
            parse_scenario({**base, "model_config": name}, tmp_path / "s.yaml")
        assert info.value.key == "model_config" and words in str(info.value)


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
from pytest_kvcache.plugin import SESSION_KEY

def pytest_collection_finish(session):
    s = session.config.stash[SESSION_KEY].settings
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


def test_redact_url_and_scrub():
    from pytest_kvcache.report.redact import redact_url, scrub

    assert redact_url("http://user:token@host:8000/v1") == "http://user:***@host:8000/v1"
    assert redact_url("https://tok3n@host") == "https://***@host"
    assert redact_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert redact_url("not a url") == "not a url"
    url = "http://user:token@host:8000"
    assert scrub("GET user:token@host:8000/v1/models failed", url) == "GET user:***@host:8000/v1/models failed"
    assert scrub({"a": ["x user:token@h"]}, url) == {"a": ["x user:***@h"]}
    assert scrub("unchanged", None) == "unchanged"


def test_server_records_and_failure_messages_hide_credentials():
    from pytest_kvcache.session import _server_record

    class Handle:
        info = {"server": "external", "endpoint": "http://user:token@host:8000", "gpu": "unknown"}

    class Backend:
        recorded = {}

    assert _server_record(Handle(), Backend())["endpoint"] == "http://user:***@host:8000"


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
