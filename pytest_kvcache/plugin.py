"""pytest hooks: options and their ini twins, markers, YAML collection, summary, exit status.

Scenario files (``*.yaml`` in a folder named ``scenarios``, or any YAML file named on
the command line) become one item per matrix point, named like
``prefill[cpu-10k-c16]`` and marked with their backend and phase. Tests written with
the fixtures of :mod:`.fixtures` (registered here) are parametrized, marked, filtered
and gated the same way.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from .backends import LMCACHE_MODES
from .errors import KVCacheError, ScenarioError
from .guide import SessionGuide
from .identity import KeyMoves
from .loadgen import DEFAULT_CLIENT_FLOOR
from .models import BACKENDS, PHASES, ScenarioCase, format_tokens
from .scenarios import (
    MAX_TOKENS,
    MAX_TRIALS,
    TOKEN_COUNT_FORMS,
    load_scenario,
    override_thresholds,
    parse_threshold_override,
    parse_token_count,
)
from .servers import SERVER_KINDS, ServerSettings
from .session import KVSession, Settings

__all__ = ["SESSION_KEY", "ScenarioFile", "ScenarioItem"]

pytest_plugins = ("pytest_kvcache.fixtures",)  # kv_backend, kv_server, kv_load, kv_gate

SESSION_KEY = pytest.StashKey[KVSession]()
#: seconds one benchmark request may take (--kv-request-timeout); a 100k-token prefill under load fits
DEFAULT_REQUEST_TIMEOUT = 600.0
#: --kv-client-floor's lowest value: below it a round would be another scenario's load
MIN_CLIENT_FLOOR = 0.5
#: --kv-client-processes: each is a Python interpreter, and a round never needs more than a CPU's cores
MAX_CLIENT_PROCESSES = 256
_URL = re.compile(r"^https?://([^/\s@]+@)?[^/\s:@]+(:\d+)?(/.*)?$")  # credentials allowed: user:token@


# -- option value types: each raises ArgumentTypeError, which pytest turns into a usage error


def _token_counts(text: str) -> list[int]:
    parts = [part for part in text.split(",") if part.strip()]
    try:
        values = [parse_token_count(part) for part in parts]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: use {TOKEN_COUNT_FORMS}, at most {format_tokens(MAX_TOKENS)}, "
                                         "or a comma list such as 1k,10k")
    return values


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: use positive integers, or a comma list such as 1,16")
    return values


def _backends(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    bad = [v for v in values if v not in BACKENDS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: use one or more of {', '.join(BACKENDS)} (comma-separated)")
    return values


def _threshold_override(text: str) -> tuple[str, float]:
    try:
        return parse_threshold_override(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0 or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text!r}: use a positive integer" + (f" up to {high}" if high else ""))
    return value


def _trials(text: str) -> int:
    return _positive_int(text, MAX_TRIALS)


def _client_processes(text: str) -> int:
    return _positive_int(text, MAX_CLIENT_PROCESSES)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvcache", "KV-cache offloading benchmarks (pytest-kvcache)")
    group.addoption("--input-len", action="append", type=_token_counts, default=[], metavar="LEN[,LEN]",
                    help=f"run only items with these input lengths; {TOKEN_COUNT_FORMS}; repeatable")
    group.addoption("--concurrency", action="append", type=_positive_ints, default=[], metavar="N[,N]",
                    help="run only items with these concurrencies; repeatable")
    group.addoption("--backend", action="append", type=_backends, default=[], metavar="NAME[,NAME]",
                    help=f"run only items of these offload backends: {', '.join(BACKENDS)}; repeatable")
    group.addoption("--output-len", action="append", type=_positive_ints, default=[], metavar="N[,N]",
                    help="run only items with these output lengths; repeatable")
    group.addoption("--trials", type=_trials, default=None, metavar="N",
                    help=f"trials per item, overriding the scenarios' value (at most {MAX_TRIALS})")
    group.addoption("--kv-server", choices=SERVER_KINDS, default=None,
                    help="server to benchmark: the built-in emulator (default), a real vllm serve process, "
                         "or an external endpoint (ini: kvcache_server)")
    group.addoption("--kv-endpoint", default=None, metavar="URL",
                    help="base URL of the server for --kv-server external, e.g. http://127.0.0.1:8000 "
                         "(ini: kvcache_endpoint)")
    group.addoption("--kv-server-args", default=None, metavar="ARGS",
                    help="extra arguments for the started server (vllm serve or the emulator), one quoted "
                         "string, e.g. --kv-server-args='--max-model-len 16384' (ini: kvcache_server_args)")
    group.addoption("--model", default=None, metavar="NAME",
                    help="model name or folder to serve / request (ini: kvcache_model)")
    group.addoption("--tokenizer", default=None, metavar="PATH",
                    help="local tokenizer (folder with tokenizer.json) for exact prompt lengths; default: the "
                         "server's /tokenize (ini: kvcache_tokenizer)")
    group.addoption("--kv-results-dir", default=None, metavar="DIR",
                    help="folder for per-item JSON results and server logs (ini: kvcache_results_dir; "
                         "default kvcache-results/run-<timestamp>)")
    group.addoption("--baseline-dir", default=None, metavar="DIR",
                    help="folder of stored baselines (ini: kvcache_baseline_dir; default baselines)")
    group.addoption("--update-baselines", action="store_true", default=False,
                    help="append this run to the stored baselines instead of comparing")
    group.addoption("--reset-baselines", action="store_true", default=False,
                    help="replace the stored baselines' history with this run (after an intended change)")
    group.addoption("--strict-baselines", action="store_true", default=None,
                    help="fail, rather than skip, items without a matching baseline (ini: kvcache_strict_baselines)")
    group.addoption("--alpha", default=None, metavar="P",
                    help="significance level of the regression gate, 0 < P < 0.5 (ini: kvcache_alpha; default 0.05)")
    group.addoption("--threshold", action="append", type=_threshold_override, default=[], metavar="METRIC=PCT",
                    help="override a metric's practical threshold in every scenario, e.g. median_ttft_ms=15%%; "
                         "repeatable (ini: kvcache_thresholds, one per line)")
    group.addoption("--emulator-profile", default=None, metavar="NAME|FILE",
                    help="cost-model profile of the emulator, by name or a profile file written by "
                         "'python -m pytest_kvcache calibrate' (ini: kvcache_emulator_profile; default quick); "
                         "python -m pytest_kvcache.emulator --help lists the names")
    group.addoption("--emulator-slowdown", default=None, metavar="FACTOR",
                    help="multiply every modeled time of the emulator by FACTOR > 0, to rehearse a regression "
                         "(ini: kvcache_emulator_slowdown; default 1.0)")

    group.addoption("--kv-python", default=None, metavar="PATH",
                    help="Python interpreter that runs vLLM and LMCache for --kv-server vllm, e.g. "
                         ".real-stack/venv/bin/python (ini: kvcache_python; default: this one)")
    group.addoption("--kv-lmcache-mode", default=None, metavar="MODE",
                    help=f"LMCache mode under --kv-server vllm: {', '.join(LMCACHE_MODES)}; auto takes the "
                         "multi-process server where there is no GPU. Given here it overrides the scenarios' "
                         "lmcache_mode (and keeps only this mode's items where lmcache_mode is a matrix axis); "
                         "the ini kvcache_lmcache_mode is only a default under them (default auto)")
    group.addoption("--kv-lmcache", action="append", default=[], metavar="KEY=VALUE",
                    help="LMCache setting overriding the backend's default, VALUE as JSON or text, e.g. "
                         "max_local_disk_size=100 or extra_config='{\"use_odirect\": true}'; in multi-process "
                         "mode also l2_store_policy=skip_l1 and fault_inject=RATE (a tier losing that share of "
                         "keys, a rehearsal never stored as a baseline); repeatable (ini: kvcache_lmcache, one per "
                         "line)")
    group.addoption("--kv-redis-url", default=None, metavar="URL",
                    help="Redis of the redis backend, redis://HOST:PORT; default: a redis-server started on "
                         "127.0.0.1 for the session (ini: kvcache_redis_url)")
    group.addoption("--kv-gds-path", default=None, metavar="DIR",
                    help="folder on a GDS mount for the gds backend (ini: kvcache_gds_path)")
    group.addoption("--kv-label", action="append", default=[], metavar="KEY=VALUE",
                    help="a fact of this runner the fixtures cannot set, recorded on every result and in the "
                         "baseline testbed, e.g. bandwidth=400Gbps, arcc=on, direction=east-west, "
                         "mount=/mnt/nvme; repeatable (ini: kvcache_labels, one per line)")
    group.addoption("--kv-min-hit-ratio", default=None, metavar="F",
                    help="a warm round of an offload backend fails unless it loads at least this fraction "
                         "of the whole 256-token chunks of its prompts from the tier; 0 turns the check off "
                         "(ini: kvcache_min_hit_ratio; default 0.5)")
    group.addoption("--kv-tensor-parallel-size", type=_positive_int, default=None, metavar="N",
                    help="vllm serve --tensor-parallel-size (ini: kvcache_tensor_parallel_size)")
    group.addoption("--kv-max-model-len", type=_positive_int, default=None, metavar="N",
                    help="vllm serve --max-model-len (ini: kvcache_max_model_len)")
    group.addoption("--kv-gpu-memory-utilization", default=None, metavar="F",
                    help="vllm serve --gpu-memory-utilization, 0 < F <= 1 (ini: kvcache_gpu_memory_utilization)")
    group.addoption("--kv-ready-timeout", default=None, metavar="SECONDS",
                    help="how long a started server may take to answer /health (ini: kvcache_ready_timeout; "
                         "default 60 for the emulator, 600 for vllm)")
    group.addoption("--kv-request-timeout", default=None, metavar="SECONDS",
                    help="how long one benchmark request may take to complete before it counts as failed "
                         f"(ini: kvcache_request_timeout; default {DEFAULT_REQUEST_TIMEOUT:g})")
    group.addoption("--kv-client-floor", default=None, metavar="F",
                    help="a round is invalid when the client kept fewer than F x the scenario's concurrency in "
                         "flight while requests waited, or issued fewer than F x its request rate; lower it "
                         f"knowingly on a shared runner with very short requests ({MIN_CLIENT_FLOOR:g} <= F <= 1; "
                         f"ini: kvcache_client_floor; default {DEFAULT_CLIENT_FLOOR:g})")

    parser.addini("kvcache_python", "default of --kv-python", default="")
    parser.addini("kvcache_tensor_parallel_size", "default of --kv-tensor-parallel-size", default="")
    parser.addini("kvcache_max_model_len", "default of --kv-max-model-len", default="")
    parser.addini("kvcache_gpu_memory_utilization", "default of --kv-gpu-memory-utilization", default="")
    parser.addini("kvcache_lmcache_mode", "LMCache mode of scenarios without lmcache_mode (see --kv-lmcache-mode)",
                  default="")
    parser.addini("kvcache_lmcache", "LMCache settings KEY=VALUE, one per line (see --kv-lmcache)",
                  type="linelist", default=[])
    parser.addini("kvcache_redis_url", "default of --kv-redis-url", default="")
    parser.addini("kvcache_gds_path", "default of --kv-gds-path", default="")
    parser.addini("kvcache_labels", "runner labels KEY=VALUE, one per line (see --kv-label)", type="linelist",
                  default=[])
    parser.addini("kvcache_min_hit_ratio", "default of --kv-min-hit-ratio", default="0.5")
    parser.addini("kvcache_ready_timeout", "default of --kv-ready-timeout", default="")
    parser.addini("kvcache_request_timeout", "default of --kv-request-timeout", default="")
    parser.addini("kvcache_client_floor", "default of --kv-client-floor", default="")
    parser.addini("kvcache_server", f"default of --kv-server: {', '.join(SERVER_KINDS)}", default="emulator")
    parser.addini("kvcache_endpoint", "default of --kv-endpoint", default="")
    parser.addini("kvcache_server_args", "default of --kv-server-args", default="")
    parser.addini("kvcache_model", "default of --model", default="")
    parser.addini("kvcache_tokenizer", "default of --tokenizer", default="")
    parser.addini("kvcache_results_dir", "default of --kv-results-dir", default="")
    parser.addini("kvcache_baseline_dir", "default of --baseline-dir", default="baselines")
    parser.addini("kvcache_strict_baselines", "default of --strict-baselines", type="bool", default=False)
    parser.addini("kvcache_alpha", "default of --alpha", default="0.05")
    parser.addini("kvcache_thresholds", "threshold overrides METRIC=PCT, one per line (see --threshold)",
                  type="linelist", default=[])
    parser.addini("kvcache_emulator_profile", "default of --emulator-profile", default="quick")
    parser.addini("kvcache_emulator_slowdown", "default of --emulator-slowdown", default="1.0")
    group.addoption("--kv-gpus-per-worker", default=None, metavar="N",
                    help="under pytest-xdist, give each worker its own N GPUs (CUDA_VISIBLE_DEVICES: worker gwK "
                         "gets the K-th slice of the visible ones) (ini: kvcache_gpus_per_worker)")
    parser.addini("kvcache_gpus_per_worker", "default of --kv-gpus-per-worker", default="")
    group.addoption("--percentiles", default=None, metavar="Q[,Q]",
                    help="percentiles reported for TTFT, TPOT, ITL and E2E latency, e.g. 50,90,99 "
                         "(ini: kvcache_percentiles)")
    parser.addini("kvcache_percentiles", "default of --percentiles", default="50,90,99")
    group.addoption("--kv-client-processes", type=_client_processes, default=None, metavar="N",
                    help="send each round from N client processes, the concurrency and the prompts split "
                         "between them, for servers that stream more than one process reads "
                         "(ini: kvcache_client_processes; default 1)")
    parser.addini("kvcache_client_processes", "default of --kv-client-processes", default="1")
    group.addoption("--kv-version", action="append", default=[], metavar="KEY=VALUE",
                    help="a version of the software under test the plugin cannot see, e.g. commit=abc123 or "
                         "build=nightly-42: recorded on every run and compared across, never a reason to skip; "
                         "repeatable (ini: kvcache_versions, one per line)")
    parser.addini("kvcache_versions", "software versions KEY=VALUE, one per line (see --kv-version)",
                  type="linelist", default=[])
    parser.addini("kvcache_testbed_keys", "identity keys (glob patterns) that must match for runs to be compared, "
                  "e.g. torch_version; one per line", type="linelist", default=[])
    parser.addini("kvcache_software_keys", "identity keys (glob patterns) compared across runs instead, e.g. "
                  "label.bandwidth; one per line", type="linelist", default=[])
    group.addoption("--kv-run-noise", default=None, metavar="PCT",
                    help="the run-to-run noise of this testbed, e.g. 3%%, used where the baselines have too few "
                         "runs to estimate it (ini: kvcache_run_noise; default: none, such items are not judged)")
    parser.addini("kvcache_run_noise", "default of --kv-run-noise", default="")
    group.addoption("--kv-confirm-runs", default=None, metavar="N",
                    help="runs on fresh servers that confirm a first run that looks worse before it is judged; "
                         "0 judges the first run alone (ini: kvcache_confirm_runs; default 1)")
    parser.addini("kvcache_confirm_runs", "default of --kv-confirm-runs", default="1")
    group.addoption("--kv-history", default=None, metavar="URL",
                    help="where every run is recorded: a file, sqlite:///PATH or postgresql://...; none turns it "
                         "off (ini: kvcache_history; default .kvcache/history.sqlite in the rootdir)")
    parser.addini("kvcache_history", "default of --kv-history", default="")
    group.addoption("--kv-history-window", default=None, metavar="N",
                    help="the session summary lists change points of its items among their last N runs "
                         "(ini: kvcache_history_window; default 20)")
    parser.addini("kvcache_history_window", "default of --kv-history-window", default="20")
    group.addoption("--kv-external-backend", default=None, metavar="NAME",
                    help=f"the offload backend the --kv-server external server runs ({', '.join(BACKENDS)}; none "
                         "for a server without a tier): only its items run, the others are deselected. Default: "
                         "what the server's GET /version says (the built-in emulator says it), else every item "
                         "runs (ini: kvcache_external_backend)")
    parser.addini("kvcache_external_backend", "default of --kv-external-backend", default="")
    group.addoption("--kv-check-outputs", dest="kv_check_outputs", action="store_const", const=True, default=None,
                    help="check every offload item's answers: each warm round's against the cold round's "
                         "recomputation, beside a control recomputation (ini: kvcache_check_outputs = auto, true "
                         "or false; default auto: each scenario's check_outputs, else where output_len > 1)")
    group.addoption("--no-kv-check-outputs", dest="kv_check_outputs", action="store_const", const=False,
                    help="check no item's answers (no control round is sent)")
    parser.addini("kvcache_check_outputs", "default of --kv-check-outputs: auto, true or false", default="auto")


def _option(config: pytest.Config, name: str, ini: str):
    value = config.getoption(name)
    if value is None or value == "":
        value = config.getini(ini)
    return value if value != "" else None


def _choice_setting(config: pytest.Config, name: str, ini: str, choices) -> str:
    value = _option(config, name, ini)
    if value not in choices:
        raise pytest.UsageError(f"--{name.replace('_', '-')} / {ini} = {value!r}: use one of {', '.join(choices)}")
    return value


def _emulator_profile(config: pytest.Config) -> str:
    """A built-in profile's name, or the absolute path of a readable profile file."""
    from .emulator.costmodel import PROFILES
    from .emulator.profile_file import ProfileFileError, is_profile_path, read_profile_file

    value = _option(config, "emulator_profile", "kvcache_emulator_profile")
    if not is_profile_path(value):
        return _choice_setting(config, "emulator_profile", "kvcache_emulator_profile", sorted(PROFILES))
    path = Path(value)
    if not path.is_absolute() and not _exists(path):
        path = config.rootpath / path  # an ini value is relative to the rootdir
    try:
        read_profile_file(path)
    except (ProfileFileError, ValueError) as exc:  # ValueError: a path no file can have (a NUL byte)
        raise pytest.UsageError(f"--emulator-profile / kvcache_emulator_profile = {value!r}: {exc}") from None
    return str(path.resolve())


def _float_setting(config: pytest.Config, name: str, ini: str, low: float, high: float, form: str, *,
                   default: float | None = None, low_ok: bool = False, high_ok: bool = False) -> float:
    """Option ``name`` (else ini ``ini``, else ``default``) as a number between ``low`` and
    ``high`` (each excluded unless ``low_ok`` / ``high_ok``); ``form`` says what to give."""
    raw = _option(config, name, ini)
    if raw is None and default is not None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not ((low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)):
        raise pytest.UsageError(f"--{name.replace('_', '-')} / {ini} = {raw!r}: use {form}")
    return value


def _threshold_settings(config: pytest.Config) -> tuple[tuple[str, float], ...]:
    overrides = dict()
    for line in config.getini("kvcache_thresholds"):
        try:
            metric, value = parse_threshold_override(line)
        except ValueError as exc:
            raise pytest.UsageError(f"kvcache_thresholds: {exc}") from None
        overrides[metric] = value
    overrides.update(config.getoption("threshold"))  # the command line wins
    return tuple(overrides.items())


def _settings(config: pytest.Config) -> Settings:
    kind = _option(config, "kv_server", "kvcache_server")
    if kind not in SERVER_KINDS:
        raise pytest.UsageError(f"kvcache_server = {kind!r}: use one of {', '.join(SERVER_KINDS)}")
    endpoint = _option(config, "kv_endpoint", "kvcache_endpoint")
    if endpoint is not None:
        _check_endpoint(endpoint)
    if kind == "external" and endpoint is None:
        raise pytest.UsageError("--kv-server external needs --kv-endpoint URL (e.g. http://127.0.0.1:8000)")
    server_args = _option(config, "kv_server_args", "kvcache_server_args") or ""
    try:
        extra_args = tuple(shlex.split(server_args))
    except ValueError as exc:
        raise pytest.UsageError(f"--kv-server-args / kvcache_server_args = {server_args!r}: {exc}; "
                                "quote it as one shell string") from None
    tokenizer = _option(config, "tokenizer", "kvcache_tokenizer")
    if tokenizer is not None and not _exists(Path(tokenizer)):
        raise pytest.UsageError(f"--tokenizer / kvcache_tokenizer = {tokenizer!r}: no such file or folder; "
                                "pass a model folder with tokenizer.json")
    profile = _emulator_profile(config)
    root = config.rootpath
    results = _option(config, "kv_results_dir", "kvcache_results_dir")
    if getattr(config, "workerinput", {}).get("kvcache_results_dir"):
        results = config.workerinput["kvcache_results_dir"]  # an xdist worker: the controller's run folder
    if results is None:
        import datetime as _dt
        import secrets

        # sortable by time to the microsecond, and random beyond: runs started together never share it
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        results = str(root / "kvcache-results" / f"run-{stamp}-{secrets.token_hex(2)}")
    update, reset = config.getoption("update_baselines"), config.getoption("reset_baselines")
    if update and reset:
        raise pytest.UsageError("--update-baselines and --reset-baselines exclude each other: --update-baselines adds "
                                "this run to the stored runs, --reset-baselines replaces them with it; pass one")
    results_dir = _folder(config, results, "--kv-results-dir / kvcache_results_dir", writable=True)
    baseline_dir = _folder(config, _option(config, "baseline_dir", "kvcache_baseline_dir"),
                           "--baseline-dir / kvcache_baseline_dir", writable=update or reset)
    backend_settings = _backend_settings(config, kind)
    return Settings(
        server=ServerSettings(
            kind=kind,
            endpoint=endpoint,
            model=_option(config, "model", "kvcache_model"),
            extra_args=extra_args,
            emulator_profile=profile,
            emulator_slowdown=_float_setting(config, "emulator_slowdown", "kvcache_emulator_slowdown", 0, 1000,
                                             "a factor above 0, e.g. 1.3"),
            **backend_settings,
        ),
        tokenizer=tokenizer,
        results_dir=results_dir,
        baseline_dir=baseline_dir,
        update_baselines=update,
        reset_baselines=reset,
        strict_baselines=_strict_baselines(config),
        alpha=_float_setting(config, "alpha", "kvcache_alpha", 0, 0.5, "a significance level such as 0.05"),
        thresholds=_threshold_settings(config),
        trials=config.getoption("trials"),
        verbose=config.getoption("verbose"),
        min_hit_ratio=_float_setting(config, "kv_min_hit_ratio", "kvcache_min_hit_ratio", 0, 1,
                                     "a fraction from 0 to 1, e.g. 0.5 (0 turns the check off)",
                                     low_ok=True, high_ok=True),
        percentiles=_percentiles(config),
        client_processes=_int_setting(config, "kv_client_processes", "kvcache_client_processes",
                                      MAX_CLIENT_PROCESSES) or 1,
        versions=_pairs(config, "kv_version", "kvcache_versions", "commit=abc123"),
        key_moves=KeyMoves(to_testbed=_key_patterns(config, "kvcache_testbed_keys"),
                           to_software=_key_patterns(config, "kvcache_software_keys")),
        run_noise=_run_noise(config),
        confirm_runs=_count_setting(config, "kv_confirm_runs", "kvcache_confirm_runs", "1"),
        history_url=_history_url(config),
        history_window=_count_setting(config, "kv_history_window", "kvcache_history_window", "20", low=2),
        request_timeout=_float_setting(config, "kv_request_timeout", "kvcache_request_timeout", 0, 86400,
                                       f"seconds above 0 and at most 86400 (a day), e.g. {DEFAULT_REQUEST_TIMEOUT:g}",
                                       default=DEFAULT_REQUEST_TIMEOUT, high_ok=True),
        client_floor=_float_setting(config, "kv_client_floor", "kvcache_client_floor", MIN_CLIENT_FLOOR, 1,
                                    f"a fraction from {MIN_CLIENT_FLOOR:g} to 1, e.g. {DEFAULT_CLIENT_FLOOR:g} (below "
                                    f"{MIN_CLIENT_FLOOR:g} a round would be another scenario's load)",
                                    default=DEFAULT_CLIENT_FLOOR, low_ok=True, high_ok=True),
        check_outputs=_check_outputs(config),
    )


def _check_endpoint(endpoint: str) -> None:
    """A http(s) URL with a host and a valid port; the message never shows its credentials."""
    from urllib.parse import urlsplit

    from .report.redact import redact_url

    try:
        parts = urlsplit(endpoint)
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError out of 0..65535
    except ValueError:
        parts, port_ok = None, False
    if parts is None or not port_ok or not parts.hostname or not _URL.match(endpoint):
        raise pytest.UsageError(f"--kv-endpoint / kvcache_endpoint = {redact_url(endpoint)!r}: use a URL such as "
                                "http://127.0.0.1:8000 (credentials as http://user:token@host:8000)")


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; a name the system cannot hold (too long, a NUL byte) does not."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the system
        return False


def _folder(config: pytest.Config, raw: str, names: str, writable: bool) -> Path:
    """The folder of an option, absolute: ``~`` expanded, relative to the rootdir. A usage
    error now, rather than a traceback in every item, when it is no folder (a file is in
    the way) or, ``writable``, when this user cannot create or write it."""
    try:
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else config.rootpath / path
        existing = path
        while not existing.exists():  # the folder is made on first use: its nearest existing parent must allow it
            existing = existing.parent
        problem = None
        if not existing.is_dir():
            problem = f"{existing} is not a folder"
        elif writable and not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable by this user"
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: ~user of no such user
        problem = f"cannot be used as a folder ({exc})"
    if problem:
        raise pytest.UsageError(f"{names} = {raw!r}: {problem}; pass a folder this user can write")
    return path


def _check_outputs(config: pytest.Config) -> bool | None:
    """--kv-check-outputs / --no-kv-check-outputs, else the ini's auto (None), true or false."""
    value = config.getoption("kv_check_outputs")
    if value is not None:
        return value
    text = str(config.getini("kvcache_check_outputs")).strip().lower()
    choices = {"auto": None, "": None, "true": True, "false": False}
    if text not in choices:
        raise pytest.UsageError(f"kvcache_check_outputs = {text!r}: use auto, true or false")
    return choices[text]


def _strict_baselines(config: pytest.Config) -> bool:
    if config.getoption("strict_baselines"):
        return True
    try:
        return bool(config.getini("kvcache_strict_baselines"))
    except ValueError as exc:  # pytest's "invalid truth value 'maybe'" names neither the key nor the fix
        raise pytest.UsageError(f"--strict-baselines / kvcache_strict_baselines: {exc}; use true or false") from None


def _key_patterns(config: pytest.Config, ini: str) -> tuple[str, ...]:
    patterns = tuple(config.getini(ini))
    for pattern in patterns:
        if not re.fullmatch(r"[A-Za-z0-9_.*?-]+", pattern):
            raise pytest.UsageError(f"{ini} = {pattern!r}: use identity keys or glob patterns of them, one per line, "
                                    "e.g. torch_version or label.*")
    return patterns


def _run_noise(config: pytest.Config) -> float | None:
    raw = _option(config, "kv_run_noise", "kvcache_run_noise")
    if raw is None:
        return None
    text = str(raw).strip()
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise pytest.UsageError(f"--kv-run-noise / kvcache_run_noise = {raw!r}: use a percentage above 0 and "
                                "below 100, e.g. 3%")
    return value


def _count_setting(config: pytest.Config, name: str, ini: str, example: str, low: int = 0) -> int:
    raw = _option(config, name, ini)
    try:
        value = int(str(raw))
    except ValueError:
        value = -1
    if value < low or value > 1000:
        raise pytest.UsageError(f"--{name.replace('_', '-')} / {ini} = {raw!r}: use a whole number from {low}, "
                                f"e.g. {example}")
    return value


def _history_url(config: pytest.Config) -> str | None:
    raw = _option(config, "kv_history", "kvcache_history")
    if raw is not None and raw.strip().lower() == "none":
        return None
    from .errors import HistoryError
    from .history import check_history_url

    url = raw or str(config.rootpath / ".kvcache" / "history.sqlite")
    try:
        check_history_url(url)
    except HistoryError as exc:
        raise pytest.UsageError(f"--kv-history / kvcache_history: {exc}") from None
    except RuntimeError as exc:  # ~user of no such user
        raise pytest.UsageError(f"--kv-history / kvcache_history = {raw!r}: {exc}") from None
    return url


def _percentiles(config: pytest.Config) -> tuple[float, ...]:
    from .metrics import parse_percentiles

    raw = _option(config, "percentiles", "kvcache_percentiles") or "50,90,99"
    try:
        values = parse_percentiles(raw)
    except ValueError as exc:
        raise pytest.UsageError(f"--percentiles / kvcache_percentiles: {exc}") from None
    given = [float(part) for part in str(raw).split(",")]  # parse_percentiles drops repeats silently
    if len(given) != len(values):
        repeated = next(q for q in given if given.count(q) > 1)
        raise pytest.UsageError(f"--percentiles / kvcache_percentiles: {raw!r} names percentile {repeated:g} more "
                                "than once; list each once, e.g. 50,90,99")
    return values


def _pairs(config: pytest.Config, name: str, ini: str, example: str) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE items of a repeatable option, else of its ini lines."""
    items = config.getoption(name) or config.getini(ini)
    pairs = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key.strip()) or not value.strip():
            raise pytest.UsageError(f"--{name.replace('_', '-')} / {ini} = {item!r}: use KEY=VALUE, e.g. {example}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _backend_settings(config: pytest.Config, kind: str) -> dict:
    """ServerSettings fields of the vLLM/LMCache options (validated)."""
    python = _option(config, "kv_python", "kvcache_python")
    if python is not None and not _is_file(Path(python)):
        raise pytest.UsageError(f"--kv-python / kvcache_python = {python!r}: no such file; pass a Python "
                                "interpreter that has vLLM, e.g. .real-stack/venv/bin/python")
    # Kept apart: the command line beats a scenario's lmcache_mode, the ini does not.
    mode_override = config.getoption("kv_lmcache_mode")
    mode_default = config.getini("kvcache_lmcache_mode") or None
    for mode in (mode_override, mode_default):
        if mode is not None and mode not in LMCACHE_MODES:
            raise pytest.UsageError(f"--kv-lmcache-mode / kvcache_lmcache_mode = {mode!r}: use one of "
                                    f"{', '.join(LMCACHE_MODES)}")
    redis_url = _option(config, "kv_redis_url", "kvcache_redis_url")
    if redis_url is not None and not re.match(r"^(redis|rediss|valkey)://[^/\s:]+(:\d+)?/?$", redis_url):
        raise pytest.UsageError(f"--kv-redis-url / kvcache_redis_url = {redis_url!r}: use redis://HOST:PORT")
    gds_path = _option(config, "kv_gds_path", "kvcache_gds_path")
    raw_timeout = _option(config, "kv_ready_timeout", "kvcache_ready_timeout")
    if raw_timeout is None:
        timeout = 600.0 if kind == "vllm" else 60.0
    else:
        try:
            timeout = float(raw_timeout)
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= 86400:
            raise pytest.UsageError(f"--kv-ready-timeout / kvcache_ready_timeout = {raw_timeout!r}: use seconds "
                                    "above 0, e.g. 600")
    return {
        "python": python,
        "lmcache_mode": mode_default,
        "lmcache_mode_override": mode_override,
        "redis_url": redis_url,
        "gds_path": gds_path,
        "ready_timeout": timeout,
        "labels": _pairs(config, "kv_label", "kvcache_labels", "bandwidth=400Gbps"),
        "lmcache_overrides": _pairs(config, "kv_lmcache", "kvcache_lmcache", "max_local_cpu_size=20"),
        "tensor_parallel_size": _int_setting(config, "kv_tensor_parallel_size", "kvcache_tensor_parallel_size"),
        "max_model_len": _int_setting(config, "kv_max_model_len", "kvcache_max_model_len"),
        "gpu_memory_utilization": (
            None if _option(config, "kv_gpu_memory_utilization", "kvcache_gpu_memory_utilization") is None
            else _float_setting(config, "kv_gpu_memory_utilization", "kvcache_gpu_memory_utilization", 0, 1.000001,
                                "a fraction of GPU memory above 0 and at most 1, e.g. 0.9")),
    }


def _int_setting(config: pytest.Config, name: str, ini: str, high: int | None = None) -> int | None:
    raw = _option(config, name, ini)
    if raw is None or isinstance(raw, int):
        return raw
    try:
        return _positive_int(raw, high)
    except argparse.ArgumentTypeError:
        raise pytest.UsageError(f"{ini} = {raw!r}: use a positive integer" + (f" up to {high}" if high else "")) \
            from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvcache(backend=[...], input_len=[...], concurrency=[...], output_len=[...], "
                            "phase=..., thresholds=..., lmcache_mode=..., server_args=...): a pytest-kvcache "
                            "benchmark, from a scenario file or a test using the kv_* fixtures (one test per "
                            "combination of the lists)")
    for backend in BACKENDS:
        config.addinivalue_line("markers", f"{backend}: items of the '{backend}' offload backend")
    for phase in PHASES:
        if phase not in BACKENDS:
            config.addinivalue_line("markers", f"{phase}: items of the '{phase}' phase")
    settings = _settings(config)
    # an external server's backend and the items it deselects, hints for an empty selection, progress
    config.stash[_GUIDE_KEY] = SessionGuide(config)
    # Scratch space of the disk-backed tiers, made on first use and removed at the end;
    # beside the results rather than in /tmp, which is much slower to create files in
    # on some hosts (0.9 ms a file here against 30 us on the project's disk).
    workdir = settings.results_dir / f".scratch-{os.getpid()}"
    _sweep_scratch(settings.results_dir)
    session_id = getattr(config, "workerinput", {}).get("kvcache_session_id")  # an xdist worker: the controller's
    config.stash[SESSION_KEY] = KVSession(settings, workdir, planned_comparisons=lambda: _planned(config),
                                          collected_keys=lambda: config.stash.get(_COLLECTED_KEY, ()),
                                          session_id=session_id)
    per_worker = _option(config, "kv_gpus_per_worker", "kvcache_gpus_per_worker")
    if per_worker is not None:
        _gpus_per_worker(per_worker)  # a bad value is a usage error in every process
    _setup_worker(config, config.stash[SESSION_KEY])
    config.pluginmanager.register(config.stash[_GUIDE_KEY], "kvcache-guide")
    config.stash[SESSION_KEY].after_round = config.hook.pytest_kvcache_after_round


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hooks

    pluginmanager.add_hookspecs(hooks)


def _planned(config: pytest.Config) -> int:
    return config.stash.get(_PLANNED_KEY, 1)


_PLANNED_KEY = pytest.StashKey[int]()
_COLLECTED_KEY = pytest.StashKey[tuple]()
_GUIDE_KEY = pytest.StashKey[SessionGuide]()


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    guard = config.stash.get(_GUARD_KEY, None)
    if guard is not None:
        guard.ending = True  # an interrupt now would leave servers or the scratch behind
    try:
        if session is not None:
            session.close()
            import shutil

            shutil.rmtree(session.pool.workdir, ignore_errors=True)
    finally:
        if guard is not None:
            guard.restore()


# -- interrupts: SIGTERM as Ctrl-C, a quiet cleanup, scratch of dead runs -------------------


class _SignalGuard:
    """SIGTERM (how CI runners stop a job) ends the run as Ctrl-C does: a KeyboardInterrupt,
    so the servers and their services stop, the run files are written marked interrupted,
    the scratch folder goes, and pytest exits with status 2. Once the run is ending, a
    further SIGINT or SIGTERM is held rather than raised, so the cleanup is never cut
    short into a traceback; it is bounded (each server gets 10 s, then SIGKILL)."""

    def __init__(self) -> None:
        self.received: list[str] = []  # signal names, in order
        self.ending = False
        self._held = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        import signal
        import threading

        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        import asyncio
        import signal

        name = signal.Signals(signum).name
        self.received.append(name)
        if not self.ending:
            self.ending = True
            interrupt = KeyboardInterrupt() if name == "SIGINT" else KeyboardInterrupt(f"{name} received")
            loop = asyncio._get_running_loop()
            if loop is not None and asyncio.current_task(loop) is not None:
                # raised from a callback of its own instead: a task that ended with it would be
                # logged with a traceback ("exception was never retrieved") at exit, while
                # asyncio.run cancels the tasks still running, so their cleanup runs
                loop.call_soon(_raise, interrupt)
                return
            raise interrupt
        self._held += 1
        if self._held == 1:  # said once; os.write: a buffered stream may be mid-write below us
            os.write(2, f"\npytest-kvcache: {name} held: stopping the servers, writing the run files and removing "
                        f"the scratch folder first (kill -9 {os.getpid()} abandons that)\n".encode())


def _raise(exc: BaseException) -> None:
    raise exc


_GUARD_KEY = pytest.StashKey[_SignalGuard]()
_SCENARIO_ITEMS_KEY = pytest.StashKey[tuple]()


def _pid_gone(pid: int) -> bool:
    """No such process here (or only its zombie): its scratch folder is nobody's."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _sweep_scratch(results_dir: Path) -> None:
    """Remove the ``.scratch-<pid>`` folders of runs whose process is gone (kill -9, a lost
    machine): in this results folder and in its siblings, since the default results folder
    is a new ``run-<time>`` folder each run. A live process's folder is left alone."""
    import shutil

    found = {*results_dir.glob(".scratch-*"), *results_dir.parent.glob("*/.scratch-*")}
    for folder in sorted(found):
        pid = folder.name.removeprefix(".scratch-")
        if pid.isdigit() and int(pid) != os.getpid() and folder.is_dir() and not folder.is_symlink() \
                and _pid_gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)



# -- collection ---------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    explicit = {Path(arg.split("::")[0]).resolve() for arg in parent.config.args}
    if file_path.parent.name == "scenarios" or file_path.resolve() in explicit:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _scenario_test(request: pytest.FixtureRequest, kvcache_session: KVSession) -> None:
    """The body of every scenario item: measure, store, compare (see KVSession.run_item)."""
    item = request.node
    try:
        kvcache_session.run_item(item.nodeid, item.case, item.baseline_key, _progress(request, item.case.name))
    finally:
        _record(request, kvcache_session)


def _progress(request: pytest.FixtureRequest, name: str) -> Callable[[str], None]:
    """Where an item's progress goes (scenario items and fixture tests alike): a line per
    round under -v, else a status that never floods (see report.terminal.ItemProgress)."""
    from .report.terminal import ItemProgress

    verbose = request.config.stash[SESSION_KEY].settings.verbose
    return ItemProgress(name, request.config.stash[_GUIDE_KEY].progress_output(), verbose=verbose > 0)


_STEMS_KEY = pytest.StashKey[dict]()


def _stem_clash(config: pytest.Config, path: Path) -> str | None:
    """Items are keyed by file stem and item name (ScenarioItem.baseline_key, fixtures.baseline_key):
    two files of one stem in different folders would share baseline and result files. Refused
    rather than keyed by folder, so that a key never depends on which files a run collects."""
    stem = path.stem
    other = config.stash.setdefault(_STEMS_KEY, {}).setdefault(stem.casefold(), path)
    if other == path:
        return None

    def shown(p: Path) -> str:
        try:
            return p.relative_to(config.rootpath).as_posix()
        except ValueError:
            return str(p)

    files = "scenario files" if {path.suffix, other.suffix} <= {".yaml", ".yml"} else "files"
    baselines = config.stash[SESSION_KEY].settings.baseline_dir.name
    return (f"{shown(path)}: {files} {shown(other)} and {shown(path)} share the name '{stem}', so their items "
            f"would share baseline files ({baselines}/{stem}/) and result files; rename one of them")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using the kv_* fixtures: one test per combination of its kvcache marker's lists."""
    if "kv_params" not in metafunc.fixturenames:
        return
    clash = _stem_clash(metafunc.config, metafunc.definition.path)
    if clash:
        raise pytest.Collector.CollectError(clash)
    from .fixtures import parametrize

    parametrize(metafunc)


class ScenarioFile(pytest.File):
    def collect(self):
        self._claim_name()
        from .storage.item import is_storage_file, storage_items

        if is_storage_file(self.path):  # phase: storage, no server (storage/item.py)
            yield from storage_items(self)
            return
        try:
            scenario = load_scenario(self.path)
        except ScenarioError as exc:
            raise self.CollectError(str(exc)) from None
        overrides = self.config.stash[SESSION_KEY].settings.thresholds
        for case in scenario.cases:
            case = override_thresholds(case, overrides)
            yield ScenarioItem.from_parent(self, name=case.name, callobj=_scenario_test, case=case)

    def _claim_name(self) -> None:
        clash = _stem_clash(self.config, self.path)
        if clash:
            raise self.CollectError(clash)

    class CollectError(Exception):
        pass

    def repr_failure(self, excinfo):
        if excinfo.errisinstance((self.CollectError, KVCacheError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class ScenarioItem(pytest.Function):
    """A scenario case run as a test; fixtures work as for a test function."""

    def __init__(self, *, case: ScenarioCase, **kwargs) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.add_marker("kvcache")
        self.add_marker(case.backend)
        if case.phase not in BACKENDS:
            self.add_marker(case.phase)

    @property
    def baseline_key(self) -> str:
        return f"{Path(self.case.path).stem}/{self.case.name}"

    def reportinfo(self):
        return self.path, None, f"{self.case.name} ({Path(self.case.path).name})"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    filters = {
        "input_len": {v for values in config.getoption("input_len") for v in values},
        "concurrency": {v for values in config.getoption("concurrency") for v in values},
        "backend": {v for values in config.getoption("backend") for v in values},
        "output_len": {v for values in config.getoption("output_len") for v in values},
    }
    # An item of a scenario comparing LMCache modes exists to measure its own mode: under
    # another --kv-lmcache-mode it would measure that one under a false name.
    mode_override = config.getoption("kv_lmcache_mode")
    from .fixtures import item_params

    selected, deselected = [], []
    for item in items:
        case, params = getattr(item, "case", None), item_params(item)
        if isinstance(item, ScenarioItem) and (any(
            wanted and getattr(case, dim) not in wanted for dim, wanted in filters.items()
        ) or (mode_override is not None and case.compares_lmcache_modes and case.lmcache_mode != mode_override)):
            deselected.append(item)
        elif params is not None and any(wanted and getattr(params, dim) not in wanted
                                        for dim, wanted in filters.items()):
            deselected.append(item)  # a filter on a list the test's marker does not give: not that value
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = _by_server(selected)


def _by_server(items: list) -> list:
    """Fixture tests of one module grouped by server configuration, first seen first (as
    pytest groups tests by a module-scoped parameter): one server start per configuration.
    Every other item keeps its place."""
    from .fixtures import item_params, server_group

    slots: dict[Path, list[int]] = {}
    for index, item in enumerate(items):
        if item_params(item) is not None:
            slots.setdefault(item.path, []).append(index)
    out = list(items)
    for indices in slots.values():
        groups: dict[tuple, list] = {}
        for index in indices:
            groups.setdefault(server_group(items[index], item_params(items[index])), []).append(items[index])
        for index, item in zip(indices, (item for group in groups.values() for item in group)):
            out[index] = item
    return out


def pytest_collection_finish(session: pytest.Session) -> None:
    from .fixtures import baseline_key, item_params, planned_thresholds

    # Counted after -m/-k deselection: the comparisons this session may make, scenario
    # items' and fixture tests' (those that use kv_gate) alike.
    overrides = session.config.stash[SESSION_KEY].settings.thresholds
    gated = [(item.baseline_key, item.case.thresholds, item.case.reference_backend is None)
             for item in session.items if isinstance(item, ScenarioItem)]
    gated += [(baseline_key(item), planned_thresholds(item, overrides), True)
              for item in session.items if item_params(item) is not None]
    session.config.stash[_PLANNED_KEY] = max(1, sum(len(thresholds) for _, thresholds, _ in gated))
    # the items whose stored baselines tell this runner's run-to-run noise (session._prior)
    session.config.stash[_COLLECTED_KEY] = tuple((key, tuple(t.metric for t in thresholds))
                                                 for key, thresholds, against_baseline in gated
                                                 if against_baseline and thresholds)
    session.config.stash[_ORDER_KEY] = {item.nodeid: i for i, item in enumerate(session.items)}
    session.config.stash[_SCENARIO_ITEMS_KEY] = tuple(
        item.nodeid for item in session.items if isinstance(item, ScenarioItem) or item_params(item) is not None)
    if _worker_id(session.config) is None and session.config.stash[_SCENARIO_ITEMS_KEY]:
        # only where servers will run: other suites keep Python's own SIGINT and SIGTERM
        guard = session.config.stash.setdefault(_GUARD_KEY, _SignalGuard())
        guard.install()


@pytest.fixture(scope="session")
def kvcache_session(pytestconfig: pytest.Config) -> KVSession:
    """The session object of pytest-kvcache: settings, server pool, results."""
    return pytestconfig.stash[SESSION_KEY]


# -- end of session -------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    kv = session.config.stash.get(SESSION_KEY, None)
    if kv is None:
        return
    guard = session.config.stash.get(_GUARD_KEY, None)
    if guard is not None:
        guard.ending = True  # from here on an interrupt is held until the cleanup is done
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        kv.interrupted = guard.received[0] if guard is not None and guard.received else "KeyboardInterrupt"
    kv.close()
    if _worker_id(session.config) is not None:
        _finish_worker(session.config, kv)  # the controller decides and writes the run files
        return
    from .decision import GateEntry, session_gate

    order = session.config.stash.get(_ORDER_KEY, {})
    kv.outcomes.sort(key=lambda o: order.get(o.nodeid, len(order)))  # xdist: back in collection order
    kv.gate = gate = session_gate([GateEntry(item=o.case.name, comparisons=tuple(o.comparisons), status=o.status,
                                             message=o.message, testbed_differs=o.testbed_differs)
                                   for o in kv.outcomes if o.status != "baseline-updated"], kv.settings.alpha)
    if gate.failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _record_history(session.config, kv)
    _write_run_files(session, kv)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    kv = config.stash.get(SESSION_KEY, None)
    if kv is None or not kv.outcomes:
        return
    from .report.terminal import fit_lines, render_summary, terminal_width

    width = terminal_width(config)  # every line fits the terminal (where there is one), nothing is cut

    def say(text: str, colour: str | None = None) -> None:
        for line in fit_lines([text], width):
            terminalreporter.write_line(line, **({colour: True} if colour else {}))

    for line, colour in render_summary(kv.outcomes, kv.gate, kv.settings, change_points=kv.change_points,
                                       interrupted=kv.interrupted, not_run=_not_run(config, kv), width=width):
        terminalreporter.write_line(line, **({colour: True} if colour else {}))
    problem = config.stash.get(_HISTORY_KEY, None)
    if problem:
        say(f"pytest-kvcache: WARNING: {problem}", "yellow")
    files = config.stash.get(_RUN_FILES_KEY, None)
    if isinstance(files, Exception):
        say(f"pytest-kvcache: the run files could not be written: {type(files).__name__}: {files}", "red")
    elif files:
        say(f"pytest-kvcache: report {files['report.html']} (CSV, markdown, plots beside it)")


# -- run files, header, JUnit properties, pytest-benchmark, pytest-xdist (report/) ---------

_ORDER_KEY = pytest.StashKey[dict]()
_RUN_FILES_KEY = pytest.StashKey[object]()


def _worker_id(config: pytest.Config) -> str | None:
    workerinput = getattr(config, "workerinput", None)
    return workerinput.get("workerid") if workerinput else None


def _worker_gpus(worker: str, per_worker: int, visible: list[str]) -> str:
    """The CUDA_VISIBLE_DEVICES of xdist worker ``gwN``: the N-th slice of ``per_worker`` GPUs."""
    index = int(worker.removeprefix("gw") or 0)
    wanted = visible[index * per_worker:(index + 1) * per_worker]
    if len(wanted) < per_worker:
        raise pytest.UsageError(
            f"--kv-gpus-per-worker / kvcache_gpus_per_worker = {per_worker}: worker {worker} needs GPUs "
            f"{index * per_worker}..{(index + 1) * per_worker - 1} but {len(visible)} are visible "
            f"({','.join(visible) or 'none'}); use fewer workers (-n) or fewer GPUs per worker")
    return ",".join(wanted)


def _visible_gpus() -> list[str]:
    import os

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    from .backends.probe import detect_gpus

    return [str(i) for i in range(len(detect_gpus()))]


def _setup_worker(config: pytest.Config, kv: KVSession) -> None:
    """An xdist worker: its own server log folder (ports and scratch folders are already
    per process) and, with --kv-gpus-per-worker, its own GPUs."""
    worker = _worker_id(config)
    if worker is None:
        return
    kv.pool.log_dir = kv.pool.log_dir / worker
    per_worker = _option(config, "kv_gpus_per_worker", "kvcache_gpus_per_worker")
    if per_worker is not None:
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = _worker_gpus(worker, _gpus_per_worker(per_worker), _visible_gpus())


def _gpus_per_worker(text) -> int:
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise pytest.UsageError(f"--kv-gpus-per-worker / kvcache_gpus_per_worker = {text!r}: use a positive "
                                "integer (GPUs given to each pytest-xdist worker)")
    return value


def pytest_report_header(config: pytest.Config) -> list[str]:
    kv = config.stash.get(SESSION_KEY, None)
    if kv is None:
        return []
    from .backends.probe import detect_gpus
    from .report.terminal import header_lines

    server = kv.settings.server
    versions = None
    if server.kind == "emulator":
        gpu = f"emulated (cost-model profile {server.emulator_profile})"
    else:
        names = detect_gpus()
        gpu = f"{len(names)} x {names[0]}" if names and len(set(names)) == 1 else (", ".join(names) or "none")
        if server.kind == "vllm":
            try:
                versions = kv.pool.probe.info()
            except Exception as exc:  # the header must not stop the run; the server start will say more
                versions = {"probe": f"failed: {exc}"}
    return header_lines(kv.settings, gpu=gpu, versions=versions)


def _record(request: pytest.FixtureRequest, kv: KVSession) -> None:
    """JUnit properties and the pytest-benchmark entry of the item that just ran."""
    item = request.node
    outcome = next((o for o in reversed(kv.outcomes) if o.nodeid == item.nodeid), None)
    if outcome is None:
        return
    from .report.properties import benchmark_wanted, fill_benchmark, junit_properties

    item.user_properties.extend(junit_properties(outcome, kv.settings.results_dir))
    bench = getattr(request.config, "_benchmarksession", None)
    if benchmark_wanted(bench) and outcome.result is not None and outcome.result.usable_trials:
        fill_benchmark(request.getfixturevalue("benchmark"), outcome)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller -> worker: one results folder and one run id for the whole run."""
    kv = node.config.stash.get(SESSION_KEY, None)
    if kv is not None:
        node.workerinput["kvcache_results_dir"] = str(kv.settings.results_dir)
        node.workerinput["kvcache_session_id"] = kv.session_id


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist worker -> controller: its items' outcomes, so the gate and files come out once."""
    kv = node.config.stash.get(SESSION_KEY, None)
    data = getattr(node, "workeroutput", {}).get("kvcache_outcomes")
    if kv is None or not data:
        return
    import pickle

    received = pickle.loads(data)  # written by _finish_worker of this same plugin, in a child process
    kv.outcomes.extend(outcome for _, outcome in received)
    order = node.config.stash.setdefault(_ORDER_KEY, {})
    order.update({outcome.nodeid: index for index, outcome in received})


def _finish_worker(config: pytest.Config, kv: KVSession) -> None:
    import pickle

    order = config.stash.get(_ORDER_KEY, {})
    config.workeroutput["kvcache_outcomes"] = pickle.dumps(
        [(order.get(o.nodeid, 0), o) for o in kv.outcomes], protocol=pickle.HIGHEST_PROTOCOL)


_HISTORY_KEY = pytest.StashKey[str]()


def _record_history(config: pytest.Config, kv: KVSession) -> None:
    problem = kv.record_history(config.rootpath)
    if problem:
        config.stash[_HISTORY_KEY] = problem


def _not_run(config: pytest.Config, kv: KVSession) -> tuple[str, ...]:
    """The selected items that never started (an interrupted run), in collection order."""
    if not kv.interrupted:
        return ()
    started = {o.nodeid for o in kv.outcomes}
    return tuple(nodeid for nodeid in config.stash.get(_SCENARIO_ITEMS_KEY, ()) if nodeid not in started)


def _write_run_files(session: pytest.Session, kv: KVSession) -> None:
    if not kv.outcomes:
        return
    from .report.run_files import write_run_files

    config = session.config
    try:
        header = pytest_report_header(config)
        config.stash[_RUN_FILES_KEY] = write_run_files(kv.settings.results_dir, kv.outcomes, kv.gate, kv.settings,
                                                       store=kv.store, header=header, started=kv.started,
                                                       history=kv.history, interrupted=kv.interrupted,
                                                       not_run=_not_run(config, kv))
    except Exception as exc:  # the verdicts stand without the report files; say what went wrong
        config.stash[_RUN_FILES_KEY] = exc
