"""Every option, ini key and marker: a good value, a bad value, and --help."""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)

SCENARIO = """
name: prefill
phase: prefill
matrix:
  backend: [none, cpu, disk, gds]
  input_len: [100, 1k, 10k, 50k, 100k]
  concurrency: [16]
  output_len: [1]
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "seed.yaml").write_text(SCENARIO)
    return pytester


def collected(result: pytest.RunResult) -> list[str]:
    return [line.split("::")[1] for line in result.outlines if "::" in line]


def test_help_lists_every_option_and_ini_key(project):
    result = project.runpytest("--help")
    text = result.stdout.str()
    for option in ("--input-len", "--concurrency", "--backend", "--output-len", "--trials", "--kv-server",
                   "--kv-endpoint", "--kv-server-args", "--model", "--tokenizer", "--kv-results-dir", "--baseline-dir",
                   "--update-baselines", "--reset-baselines", "--strict-baselines", "--alpha", "--threshold",
                   "--emulator-profile", "--emulator-slowdown", "--kv-python", "--kv-lmcache-mode", "--kv-lmcache",
                   "--kv-redis-url", "--kv-gds-path", "--kv-label", "--kv-min-hit-ratio", "--kv-ready-timeout",
                   "--kv-request-timeout"):
        assert option in text, option
    for ini in ("kvcache_server", "kvcache_endpoint", "kvcache_server_args", "kvcache_model", "kvcache_tokenizer",
                "kvcache_results_dir", "kvcache_baseline_dir", "kvcache_strict_baselines", "kvcache_alpha",
                "kvcache_thresholds", "kvcache_emulator_profile",
                "kvcache_emulator_slowdown", "kvcache_python", "kvcache_lmcache_mode", "kvcache_lmcache",
                "kvcache_redis_url", "kvcache_gds_path", "kvcache_labels", "kvcache_min_hit_ratio",
                "kvcache_ready_timeout", "kvcache_request_timeout"):
        assert ini in text, ini


def test_markers_are_registered(project):
    result = project.runpytest("--markers")
    for marker in ("none", "cpu", "disk", "gds", "redis", "lmcache_server", "mooncake", "native",
                   "prefill", "sharegpt", "multiturn", "kvcache"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}[:(]*"])  # kvcache shows its arguments


def test_gds_and_100k_select_exactly_one_item(project):
    result = project.runpytest("--collect-only", "-q", "--strict-markers", "-m", "gds", "--input-len", "100k")
    assert result.ret == 0
    assert collected(result) == ["prefill[gds-100k-c16]"]


def test_phase_marker_and_strict_markers(project):
    result = project.runpytest("--collect-only", "-q", "--strict-markers", "-m", "prefill and (cpu or disk)")
    assert result.ret == 0
    assert len(collected(result)) == 10


@pytest.mark.parametrize("args,expected", [
    (["--input-len", "1k,10k"], 8),
    (["--input-len", "1k", "--input-len", "100"], 8),
    (["--input-len", "1000"], 4),
    (["--backend", "cpu,disk"], 10),
    (["--backend", "none", "--input-len", "50k"], 1),
    (["--concurrency", "16"], 20),
    (["--concurrency", "1,8"], 0),
    (["--output-len", "1"], 20),
    (["--output-len", "128"], 0),
])
def test_filters_select_items(project, args, expected):
    result = project.runpytest("--collect-only", "-q", *args)
    assert len(collected(result)) == expected
    assert result.ret == (0 if expected else pytest.ExitCode.NO_TESTS_COLLECTED)


@pytest.mark.parametrize("args,message", [
    (["--input-len", "ten"], "argument --input-len: 'ten': use an integer with an optional k or m suffix"),
    (["--input-len", "1k,,x"], "argument --input-len:*1k, 10k, 100k, 1m"),
    (["--concurrency", "0"], "argument --concurrency: '0': use positive integers"),
    (["--backend", "floppy"], "argument --backend: 'floppy': use one or more of none, cpu, disk, gds*"),
    (["--output-len", "x"], "argument --output-len: 'x': use positive integers*"),
    (["--trials", "0"], "argument --trials: '0': use a positive integer"),
    (["--kv-server", "triton"], "*argument --kv-server: invalid choice: 'triton'*"),
    (["--kv-server", "external"], "*--kv-server external needs --kv-endpoint URL*"),
    (["--kv-server", "external", "--kv-endpoint", "localhost"], "*--kv-endpoint / kvcache_endpoint = 'localhost'*"),
    (["--tokenizer", "/no/such/dir"], "*--tokenizer / kvcache_tokenizer = '/no/such/dir': no such file*"),
    (["--kv-server-args", "'--unclosed"], "*--kv-server-args / kvcache_server_args = \"'--unclosed\"*quote*"),
    (["--threshold", "median_ttft_ms"], "*argument --threshold: 'median_ttft_ms': use METRIC=PCT*"),
    (["--threshold", "speed=5%"], "*argument --threshold: 'speed=5%': use METRIC=PCT*"),
    (["--threshold", "median_ttft_ms=-5%"], "*argument --threshold: 'median_ttft_ms=-5%': the threshold must be*"),
    (["--alpha", "2"], "*--alpha / kvcache_alpha = '2': use a significance level*"),
    (["--alpha", "x"], "*--alpha / kvcache_alpha = 'x'*"),
    (["--emulator-profile", "warp"], "*--emulator-profile / kvcache_emulator_profile = 'warp': use one of*quick*"),
    (["--emulator-slowdown", "-1"], "*--emulator-slowdown / kvcache_emulator_slowdown = '-1': use a factor above 0*"),
    (["--kv-python", "/no/python"], "*--kv-python / kvcache_python = '/no/python': no such file*"),
    (["--kv-lmcache-mode", "gpu"],
     "*--kv-lmcache-mode / kvcache_lmcache_mode = 'gpu': use one of auto, inprocess, mp*"),
    (["--kv-lmcache", "chunk_size"], "*--kv-lmcache / kvcache_lmcache = 'chunk_size': use KEY=VALUE*"),
    (["--kv-redis-url", "localhost:6379"], "*--kv-redis-url / kvcache_redis_url = 'localhost:6379': use redis://*"),
    (["--kv-label", "bandwidth"], "*--kv-label / kvcache_labels = 'bandwidth': use KEY=VALUE, e.g. bandwidth=400Gbps*"),
    (["--kv-label", "=x"], "*--kv-label / kvcache_labels = '=x': use KEY=VALUE*"),
    (["--kv-min-hit-ratio", "1.5"], "*--kv-min-hit-ratio / kvcache_min_hit_ratio = '1.5': use a fraction from 0 to 1*"),
    (["--kv-ready-timeout", "0"], "*--kv-ready-timeout / kvcache_ready_timeout = '0': use seconds above 0*"),
])
def test_bad_values_are_usage_errors_naming_the_option(project, args, message):
    result = project.runpytest("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


@pytest.mark.parametrize("ini,value,message", [
    ("kvcache_server", "triton", "kvcache_server = 'triton': use one of emulator, vllm, external"),
    ("kvcache_thresholds", "ttft=5", "kvcache_thresholds: 'ttft=5': use METRIC=PCT"),
    ("kvcache_alpha", "0.9", "--alpha / kvcache_alpha = '0.9'"),
    ("kvcache_emulator_profile", "warp", "kvcache_emulator_profile = 'warp'"),
    ("kvcache_emulator_slowdown", "fast", "kvcache_emulator_slowdown = 'fast'"),
    ("kvcache_endpoint", "nope", "kvcache_endpoint = 'nope'"),
    ("kvcache_tokenizer", "/nope", "kvcache_tokenizer = '/nope'"),
    ("kvcache_python", "/nope", "kvcache_python = '/nope'"),
    ("kvcache_lmcache_mode", "gpu", "kvcache_lmcache_mode = 'gpu'"),
    ("kvcache_lmcache", "\n  chunk_size", "kvcache_lmcache = 'chunk_size'"),
    ("kvcache_redis_url", "http://x", "kvcache_redis_url = 'http://x'"),
    ("kvcache_labels", "\n  bandwidth", "kvcache_labels = 'bandwidth'"),
    ("kvcache_min_hit_ratio", "-0.1", "kvcache_min_hit_ratio = '-0.1'"),
    ("kvcache_ready_timeout", "soon", "kvcache_ready_timeout = 'soon'"),
])
def test_bad_ini_values_are_usage_errors(project, ini, value, message):
    project.makeini(f"[pytest]\n{ini} = {value}\n")
    result = project.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


@pytest.mark.parametrize("args", [
    ["--kv-server", "emulator"], ["--kv-server", "vllm", "--model", "m"],
    ["--kv-server", "external", "--kv-endpoint", "http://127.0.0.1:9"],
    ["--tokenizer", "."], ["--kv-server-args=--max-model-len 4096"], ["--alpha", "0.01"],
    ["--threshold", "median_ttft_ms=15%", "--threshold", "p99_ttft_ms=0.3"], ["--emulator-slowdown", "1.3"],
    ["--emulator-profile", "fixed"], ["--trials", "5"],
    ["--kv-results-dir", "out"], ["--baseline-dir", "bl"], ["--update-baselines"], ["--reset-baselines"],
    ["--strict-baselines"], ["--model", "Qwen/Qwen2.5-7B-Instruct"],
    ["--kv-python", "/usr/bin/env"], ["--kv-lmcache-mode", "mp"], ["--kv-lmcache-mode", "inprocess"],
    ["--kv-lmcache", "max_local_cpu_size=20", "--kv-lmcache", 'extra_config={"use_odirect": true}'],
    ["--kv-redis-url", "redis://10.0.0.5:6379"], ["--kv-gds-path", "/mnt/gds"],
    ["--kv-label", "bandwidth=400Gbps", "--kv-label", "arcc=on"], ["--kv-min-hit-ratio", "0"],
    ["--kv-min-hit-ratio", "0.9"], ["--kv-ready-timeout", "900"],
])
def test_good_values_are_accepted(project, args):
    result = project.runpytest("--collect-only", "-q", *args)
    assert result.ret == 0, result.stderr.str()
    assert len(collected(result)) == 20


def test_good_ini_values_are_accepted(project):
    project.makeini("[pytest]\nkvcache_server = external\nkvcache_endpoint = http://127.0.0.1:9\n"
                    "kvcache_alpha = 0.01\nkvcache_emulator_slowdown = 2\nkvcache_emulator_profile = fixed\n"
                    "kvcache_strict_baselines = true\n"
                    "kvcache_baseline_dir = bl\nkvcache_results_dir = out\nkvcache_model = m\n")
    result = project.runpytest("--collect-only", "-q")
    assert result.ret == 0, result.stderr.str()


def test_malformed_scenario_fails_collection_naming_file_and_key(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "bad.yaml").write_text(
        "name: prefill\nphase: prefill\nmatrix:\n  backend: [floppy]\n  input_len: [1k]\n")
    result = pytester.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*scenarios/bad.yaml: key 'matrix.backend': unknown backend 'floppy'; use one of*"])
    assert "Traceback" not in result.stdout.str()


def test_yaml_outside_scenarios_is_not_collected(pytester):
    pytester.path.joinpath("ci.yaml").write_text("jobs: {}\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_threshold_overrides_reach_the_items(project):
    project.makeini("[pytest]\nkvcache_thresholds =\n    median_ttft_ms=20%\n    p90_itl_ms=7%\n")
    project.makeconftest("""
def pytest_collection_finish(session):
    for item in session.items:
        print("THRESHOLDS", item.name, sorted((t.metric, t.direction, t.threshold) for t in item.case.thresholds))
""")
    result = project.runpytest("--collect-only", "-q", "-s", "--threshold", "median_ttft_ms=15%",
                               "--input-len", "1k", "--backend", "cpu")
    assert result.ret == 0
    assert ("THRESHOLDS prefill[cpu-1k-c16] [('median_ttft_ms', 'lower', 0.15), ('p90_itl_ms', 'lower', 0.07), "
            "('total_token_throughput', 'higher', 0.05)]") in result.stdout.str()


def test_good_ini_values_of_the_real_server_options_are_accepted(project):
    project.makeini("[pytest]\nkvcache_python = /usr/bin/env\nkvcache_lmcache_mode = mp\n"
                    "kvcache_lmcache =\n  max_local_cpu_size=20\n  chunk_size=256\n"
                    "kvcache_redis_url = redis://127.0.0.1:6379\nkvcache_gds_path = /mnt/gds\n"
                    "kvcache_labels =\n  bandwidth=800Gbps\n  direction=east-west\n"
                    "kvcache_min_hit_ratio = 0.25\nkvcache_ready_timeout = 120\n")
    result = project.runpytest("--collect-only", "-q")
    assert result.ret == 0, result.stderr.str()


def test_labels_are_recorded_on_every_result(pytester):
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "s.yaml").write_text(
        "name: s\nphase: prefill\nmatrix:\n  backend: [none]\n  input_len: [100]\n  concurrency: [1]\n"
        "  output_len: [1]\nnum_prompts: 2\ntrials: 2\n")
    pytester.makeini("[pytest]\nkvcache_labels =\n  bandwidth=800Gbps\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--emulator-profile", "fixed",
                                           "--kv-label", "arcc=on", "--kv-label", "direction=north-south",
                                           "--update-baselines", "--kv-results-dir", "out", timeout=120)
    assert result.ret == 0, result.stdout.str()
    import json

    (path,) = pytester.path.joinpath("out").rglob("s[[]none-100-c1[]].json")
    server = json.loads(path.read_text())["server"]
    # options replace the ini lines; each label is a key of the server info (and the testbed)
    assert server["label.arcc"] == "on" and server["label.direction"] == "north-south"
    assert "label.bandwidth" not in server


# -- --kv-gpus-per-worker (pytest-xdist scale-out; report/ and plugin's xdist hooks) ----


def test_help_lists_gpus_per_worker(project):
    text = project.runpytest("--help").stdout.str()
    assert "--kv-gpus-per-worker" in text and "kvcache_gpus_per_worker" in text


@pytest.mark.parametrize("args,ini", [(["--kv-gpus-per-worker", "0"], None), (["--kv-gpus-per-worker", "two"], None),
                                      ([], "kvcache_gpus_per_worker = -1")])
def test_bad_gpus_per_worker_is_a_usage_error(project, args, ini):
    if ini:
        project.makeini(f"[pytest]\n{ini}\n")
    result = project.runpytest("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kv-gpus-per-worker / kvcache_gpus_per_worker = *: use a positive integer*"])


def test_good_gpus_per_worker_is_accepted(project):
    result = project.runpytest("--collect-only", "-q", "--kv-gpus-per-worker", "2")
    assert result.ret == 0, result.stderr.str()
    project.makeini("[pytest]\nkvcache_gpus_per_worker = 4\n")
    assert project.runpytest("--collect-only", "-q").ret == 0


@pytest.mark.parametrize("option,good,bad", [
    ("--kv-tensor-parallel-size", "8", "0"),
    ("--kv-max-model-len", "16384", "long"),
    ("--kv-gpu-memory-utilization", "0.9", "1.5"),
])
def test_vllm_engine_options(project, option, good, bad):
    assert option in project.runpytest("--help").stdout.str()
    ini = "kvcache_" + option[5:].replace("-", "_")
    assert ini in project.runpytest("--help").stdout.str()
    accepted = project.runpytest("--collect-only", "-q", option, good)
    assert accepted.ret == 0, accepted.stderr.str()
    refused = project.runpytest("--collect-only", option, bad)
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines([f"*{option}*{bad}*"])
    project.makeini(f"[pytest]\n{ini} = {bad}\n")
    from_ini = project.runpytest("--collect-only")
    assert from_ini.ret == pytest.ExitCode.USAGE_ERROR
    from_ini.stderr.fnmatch_lines([f"*{ini}*{bad}*"])


def test_vllm_engine_options_reach_the_server_settings(project):
    project.makeini("[pytest]\nkvcache_max_model_len = 4096\n")
    project.makeconftest("""
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    s = kv_session(session.config).settings.server
    print("ENGINE", s.tensor_parallel_size, s.max_model_len, s.gpu_memory_utilization)
""")
    result = project.runpytest("--collect-only", "-q", "-s", "--kv-tensor-parallel-size", "8",
                               "--kv-gpu-memory-utilization", "0.85")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["ENGINE 8 4096 0.85"])


# -- --percentiles (metrics.summarize) ------------------------------------------------


def test_percentiles_option_good_bad_help_and_reach_the_settings(project):
    text = project.runpytest("--help").stdout.str()
    assert "--percentiles" in text and "kvcache_percentiles" in text
    project.makeconftest("""
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    print("PCT", kv_session(session.config).settings.percentiles)
""")
    result = project.runpytest("--collect-only", "-q", "-s", "--percentiles", "50,90,99.9")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["PCT (50.0, 90.0, 99.9)"])
    default = project.runpytest("--collect-only", "-q", "-s")
    default.stdout.fnmatch_lines(["PCT (50.0, 90.0, 99.0)"])
    for bad in ("ninety", "0", "101"):
        refused = project.runpytest("--collect-only", "--percentiles", bad)
        assert refused.ret == pytest.ExitCode.USAGE_ERROR
        refused.stderr.fnmatch_lines([f"*--percentiles / kvcache_percentiles*{bad}*"])


def test_percentiles_ini_good_and_bad(project):
    project.makeini("[pytest]\nkvcache_percentiles = 95, 99\n")
    project.makeconftest("""
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    print("PCT", kv_session(session.config).settings.percentiles)
""")
    result = project.runpytest("--collect-only", "-q", "-s")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["PCT (95.0, 99.0)"])
    project.makeini("[pytest]\nkvcache_percentiles = p99\n")
    refused = project.runpytest("--collect-only")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*--percentiles / kvcache_percentiles*p99*"])


# -- the LMCache mode: --kv-lmcache-mode > scenario lmcache_mode > ini kvcache_lmcache_mode > auto ----

PRINT_MODES = """
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    pool = kv_session(session.config).pool
    for item in session.items:
        print("MODE", item.name, dict(pool.backend(item.case.backend, item.case.lmcache_mode).recorded))
"""


def modes_project(pytester: pytest.Pytester, scenario_key: str = "", ini: str = "") -> pytest.Pytester:
    pytester.mkdir("scenarios")
    pytester.path.joinpath("scenarios", "modes.yaml").write_text(
        "name: modes\nphase: prefill\nmatrix:\n  backend: [none, cpu]\n  input_len: [100]\n  concurrency: [1]\n"
        f"num_prompts: 2\ntrials: 2\n{scenario_key}\n")
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makeconftest(PRINT_MODES)
    return pytester


@pytest.mark.parametrize("ini,scenario_key,args,mode,chooser", [
    ("", "", [], "auto", "default"),
    ("kvcache_lmcache_mode = mp", "", [], "mp", "kvcache_lmcache_mode"),
    ("kvcache_lmcache_mode = mp", "lmcache_mode: inprocess", [], "inprocess", "scenario"),
    ("kvcache_lmcache_mode = mp", "lmcache_mode: inprocess", ["--kv-lmcache-mode", "auto"], "auto",
     "--kv-lmcache-mode"),
    ("", "lmcache_mode: inprocess", ["--kv-lmcache-mode", "mp"], "mp", "--kv-lmcache-mode"),
], ids=["auto", "ini", "scenario-over-ini", "option-over-all", "option-over-scenario"])
def test_lmcache_mode_precedence_option_scenario_ini_auto(pytester, ini, scenario_key, args, mode, chooser):
    project = modes_project(pytester, scenario_key, ini)
    result = project.runpytest("--collect-only", "-q", "-s", *args)
    assert result.ret == 0, result.stderr.str()
    # none runs no LMCache: no mode applies; the emulator accepts and records any mode
    recorded = {"lmcache_mode": mode, "lmcache_mode_from": chooser}
    result.stdout.fnmatch_lines(["MODE modes[[]none-100-c1[]] {}", f"MODE modes[[]cpu-100-c1[]] {recorded}"])


def test_lmcache_mode_matrix_axis_items_and_the_option_keeps_its_own(pytester):
    project = modes_project(pytester)
    project.path.joinpath("scenarios", "modes.yaml").write_text(
        "name: modes\nphase: prefill\nmatrix:\n  backend: [cpu]\n  input_len: [100]\n  concurrency: [1]\n"
        "  lmcache_mode: [inprocess, mp]\n")
    project.makeini("[pytest]\nkvcache_lmcache_mode = mp\n")  # a default does not beat the scenario's modes
    both = project.runpytest("--collect-only", "-q", "-s")
    assert collected(both) == ["modes[cpu-100-c1-inprocess]", "modes[cpu-100-c1-mp]"]
    both.stdout.fnmatch_lines(["MODE modes[[]cpu-100-c1-inprocess[]] {'lmcache_mode': 'inprocess', *'scenario'}",
                               "MODE modes[[]cpu-100-c1-mp[]] {'lmcache_mode': 'mp', *'scenario'}"])
    # the user's word on this runner: an item made to measure another mode would measure this one
    # under a false name, so it is deselected
    only_mp = project.runpytest("--collect-only", "-q", "--kv-lmcache-mode", "mp")
    assert collected(only_mp) == ["modes[cpu-100-c1-mp]"]
    only_mp.stdout.fnmatch_lines(["*1/2 tests collected (1 deselected)*"])


def test_malformed_lmcache_mode_fails_collection_naming_file_key_and_modes(pytester):
    project = modes_project(pytester, "lmcache_mode: gpu")
    result = project.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    message = "scenarios/modes.yaml: key 'lmcache_mode': unknown LMCache mode 'gpu'; use one of: auto, inprocess, mp"
    result.stdout.fnmatch_lines([f"*{message}*"])


def test_lmcache_mode_is_recorded_on_each_result_and_not_in_the_emulator_testbed(pytester):
    import json

    project = modes_project(pytester)
    project.path.joinpath("scenarios", "modes.yaml").write_text(
        "name: modes\nphase: prefill\nmatrix:\n  backend: [cpu]\n  input_len: [300]\n  concurrency: [1]\n"
        "  lmcache_mode: [inprocess, mp]\nnum_prompts: 2\ntrials: 2\n")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--emulator-profile", "fixed",
                                          "--update-baselines", "--baseline-dir", "bl", "--kv-results-dir", "out",
                                          timeout=120)
    assert result.ret == 0, result.stdout.str()
    docs = {mode: json.loads(project.path.joinpath("out", "modes", f"modes[cpu-300-c1-{mode}].json").read_text())
            for mode in ("inprocess", "mp")}
    for mode, doc in docs.items():
        assert (doc["server"]["lmcache_mode"], doc["server"]["lmcache_mode_from"]) == (mode, "scenario")
        assert doc["scenario"]["lmcache_mode"] == mode
    # the emulator has no LMCache connector: the mode changes nothing it measures
    assert docs["inprocess"]["testbed"] == docs["mp"]["testbed"]
    assert not [key for key in docs["mp"]["testbed"] if key.startswith("lmcache_mode")]
    assert len(list(project.path.joinpath("out", "logs").glob("emulator-cpu-*.log"))) == 1  # one server for both


# -- --kv-client-processes (spread.py) --------------------------------------------------------

PRINT_PROCESSES = """
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    print("PROCS", kv_session(session.config).settings.client_processes)
"""


def test_client_processes_option_good_bad_help(project):
    text = project.runpytest("--help").stdout.str()
    assert "--kv-client-processes" in text and "kvcache_client_processes" in text
    project.makeconftest(PRINT_PROCESSES)
    default = project.runpytest("--collect-only", "-q", "-s")
    assert default.ret == 0, default.stderr.str()
    default.stdout.fnmatch_lines(["PROCS 1"])
    result = project.runpytest("--collect-only", "-q", "-s", "--kv-client-processes", "4")
    result.stdout.fnmatch_lines(["PROCS 4"])
    for bad in ("0", "two"):
        refused = project.runpytest("--collect-only", "--kv-client-processes", bad)
        assert refused.ret == pytest.ExitCode.USAGE_ERROR
        refused.stderr.fnmatch_lines([f"*--kv-client-processes*{bad}*positive integer*"])


def test_client_processes_ini_good_and_bad(project):
    project.makeconftest(PRINT_PROCESSES)
    project.makeini("[pytest]\nkvcache_client_processes = 3\n")
    result = project.runpytest("--collect-only", "-q", "-s")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["PROCS 3"])
    project.makeini("[pytest]\nkvcache_client_processes = -1\n")
    refused = project.runpytest("--collect-only")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    refused.stderr.fnmatch_lines(["*kvcache_client_processes*-1*positive integer*"])


# -- the nightly gate's options: versions, key moves, run noise, confirmation runs, history ------

PRINT_GATE_SETTINGS = """
from pytest_kvcache.plugin import kv_session

def pytest_collection_finish(session):
    s = kv_session(session.config).settings
    print("GATE", s.versions, s.key_moves.to_testbed, s.key_moves.to_software, s.run_noise, s.confirm_runs,
          s.history_url, s.history_window)
"""


def test_gate_options_help_and_defaults(project):
    text = project.runpytest("--help").stdout.str()
    for name in ("--kv-version", "kvcache_versions", "kvcache_testbed_keys", "kvcache_software_keys",
                 "--kv-run-noise", "kvcache_run_noise", "--kv-confirm-runs", "kvcache_confirm_runs", "--kv-history",
                 "kvcache_history", "--kv-history-window", "kvcache_history_window"):
        assert name in text, name
    project.makeconftest(PRINT_GATE_SETTINGS)
    result = project.runpytest("--collect-only", "-q", "-s")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines([f"GATE () () () None 1 {project.path / '.kvcache' / 'history.sqlite'} 20"])


def test_gate_options_good_values_reach_the_settings(project):
    project.makeconftest(PRINT_GATE_SETTINGS)
    result = project.runpytest("--collect-only", "-q", "-s", "--kv-version", "commit=abc123", "--kv-version",
                               "build=42", "--kv-run-noise", "3%", "--kv-confirm-runs", "0", "--kv-history",
                               "sqlite:///h.db", "--kv-history-window", "10")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["GATE (('commit', 'abc123'), ('build', '42')) () () 0.03 0 sqlite:///h.db 10"])
    off = project.runpytest("--collect-only", "-q", "-s", "--kv-history", "none", "--kv-run-noise", "0.05")
    off.stdout.fnmatch_lines(["GATE () () () 0.05 1 None 20"])


def test_gate_ini_good_values_reach_the_settings(project):
    project.makeconftest(PRINT_GATE_SETTINGS)
    project.makeini("[pytest]\nkvcache_versions =\n  commit=abc\nkvcache_testbed_keys =\n  torch_version\n"
                    "kvcache_software_keys =\n  label.*\n  gpu\nkvcache_run_noise = 2%\nkvcache_confirm_runs = 2\n"
                    "kvcache_history = none\nkvcache_history_window = 5\n")
    result = project.runpytest("--collect-only", "-q", "-s")
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["GATE (('commit', 'abc'),) ('torch_version',) ('label.*', 'gpu') 0.02 2 None 5"])


@pytest.mark.parametrize("args,message", [
    (["--kv-version", "commit"], "--kv-version / kvcache_versions = 'commit': use KEY=VALUE, e.g. commit=abc123"),
    (["--kv-run-noise", "0"], "--kv-run-noise / kvcache_run_noise = '0': use a percentage above 0"),
    (["--kv-run-noise", "lots"], "--kv-run-noise / kvcache_run_noise = 'lots'"),
    (["--kv-confirm-runs", "-1"], "--kv-confirm-runs / kvcache_confirm_runs = '-1': use a whole number from 0"),
    (["--kv-history", "ftp://x/y"], "--kv-history / kvcache_history: history URL 'ftp://x/y': unknown scheme"),
    (["--kv-history-window", "1"], "--kv-history-window / kvcache_history_window = '1': use a whole number from 2"),
])
def test_gate_options_bad_values_are_usage_errors(project, args, message):
    result = project.runpytest("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


@pytest.mark.parametrize("ini,value,message", [
    ("kvcache_versions", "\n  commit", "kvcache_versions = 'commit'"),
    ("kvcache_run_noise", "150%", "kvcache_run_noise = '150%'"),
    ("kvcache_confirm_runs", "many", "kvcache_confirm_runs = 'many'"),
    ("kvcache_history", "sqlite://relative", "history URL 'sqlite://relative'"),
    ("kvcache_history_window", "0", "kvcache_history_window = '0'"),
    ("kvcache_testbed_keys", "\n  torch version", "kvcache_testbed_keys = 'torch version': use identity keys"),
    ("kvcache_software_keys", "\n  gpu=1", "kvcache_software_keys = 'gpu=1'"),
])
def test_gate_ini_bad_values_are_usage_errors(project, ini, value, message):
    project.makeini(f"[pytest]\n{ini} = {value}\n")
    result = project.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
