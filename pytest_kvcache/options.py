"""The command-line options and ini keys of pytest-kvcache, declared once.

:data:`OPTIONS` is one table: each row is an option, its ini twin, or both. From it come
``parser.addoption`` and ``parser.addini`` (:func:`add_options`), the name errors give
("--alpha / kvcache_alpha") and the raw value, the command line over the ini
(:func:`raw_value`); :func:`read_settings` turns the values into the typed
:class:`~.models.Settings`, a usage error naming the option where a value is bad.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .identity import KeyMoves
from .models import BACKENDS, DEFAULT_CLIENT_FLOOR, LMCACHE_MODES, SERVER_KINDS, ServerSettings, Settings, format_tokens
from .scenarios import MAX_TOKENS, MAX_TRIALS, TOKEN_COUNT_FORMS, parse_threshold_override, parse_token_count

__all__ = ["OPTIONS", "Number", "Option", "add_options", "gpus_per_worker", "number", "raw_value", "read_settings"]

#: seconds one benchmark request may take (--kv-request-timeout); a 100k-token prefill under load fits
DEFAULT_REQUEST_TIMEOUT = 600.0
#: --kv-client-floor's lowest value: below it a round would be another scenario's load
MIN_CLIENT_FLOOR = 0.5
#: --kv-client-processes: each is a Python interpreter, and a round never needs more than a CPU's cores
MAX_CLIENT_PROCESSES = 256
_URL = re.compile(r"^https?://([^/\s@]+@)?[^/\s:@]+(:\d+)?(/.*)?$")  # credentials allowed: user:token@
_REDIS_URL = re.compile(r"^(redis|rediss|valkey)://[^/\s:]+(:\d+)?/?$")


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


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """What a number option takes: from ``low`` to ``high``, each excluded unless ``low_ok`` /
    ``high_ok``; ``form`` says it in the usage error. ``whole``: an integer. Where neither the
    option nor its ini key gives a value: ``default``, else None if ``optional``, else the
    usage error. ``names``: how the error names it, where not "--flag / ini"."""

    low: float
    high: float
    form: str
    low_ok: bool = False
    high_ok: bool = False
    whole: bool = False
    default: float | None = None
    optional: bool = False
    names: str | None = None

    def admits(self, value: float) -> bool:
        return ((self.low <= value if self.low_ok else self.low < value)
                and (value <= self.high if self.high_ok else value < self.high))


def _positive(high: float = math.inf, form: str = "a positive integer", **kwargs: Any) -> Number:
    return Number(1, high, form, low_ok=True, high_ok=True, whole=True, **kwargs)


def _count(low: int, example: str) -> Number:
    return Number(low, 1000, f"a whole number from {low}, e.g. {example}", low_ok=True, high_ok=True, whole=True)


@dataclass(frozen=True)
class Option:
    """One option (``flag``), its ini twin (``ini``), or both. ``action``, ``type``, ``default``,
    ``choices``, ``const`` and ``dest`` go to argparse as they are; an ini key's help is
    "default of FLAG" unless ``ini_help`` says otherwise. ``number``: what a number option
    takes (:func:`number`)."""

    flag: str | None
    ini: str | None = None
    help: str = ""
    metavar: str | None = None
    action: str | None = None
    type: Callable[[str], Any] | None = None
    default: Any = None
    choices: tuple[str, ...] | None = None
    const: Any = None
    dest: str | None = None
    ini_help: str | None = None
    ini_type: str | None = None
    number: Number | None = None
    ini_default: Any = ""

    @property
    def ini_key(self) -> str:
        assert self.ini is not None, self.flag
        return self.ini

    @property
    def name(self) -> str:
        """The attribute ``config.getoption`` reads."""
        if self.dest:
            return self.dest
        assert self.flag is not None, self.ini
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def names(self) -> str:
        """How an error names it: "--alpha / kvcache_alpha"."""
        return " / ".join(n for n in (self.flag, self.ini) if n)

    def argparse_kwargs(self) -> dict[str, Any]:
        given = {"action": self.action, "type": self.type, "choices": self.choices, "const": self.const,
                 "dest": self.dest, "metavar": self.metavar}
        return {"default": self.default, **{k: v for k, v in given.items() if v is not None}, "help": self.help}


def _twin(flag: str, ini: str, *, help: str, **kwargs: Any) -> Option:
    """An option and its ini twin, the help ending in the ini key and, where it has one, the
    ini key's default: "(ini: kvcache_alpha; default 0.05)"."""
    default = kwargs.get("ini_default", "")
    note = f"ini: {ini}; default {default}" if default != "" else f"ini: {ini}"
    return Option(flag, ini, help=f"{help} ({note})", **kwargs)


def _list_option(flag: str, ini: str, metavar: str, *, ini_help: str, help: str,
                 type: Callable[[str], Any] | None = None) -> Option:
    """A repeatable option whose ini twin is a list, one value per line."""
    return Option(flag, ini, action="append", type=type, default=[], metavar=metavar, ini_type="linelist",
                  ini_default=[], ini_help=ini_help, help=help)


def _ini(key: str, help: str, ini_type: str | None = None, default: Any = "") -> Option:
    return Option(None, key, ini_help=help, ini_type=ini_type, ini_default=default)


OPTIONS: tuple[Option, ...] = (
    Option("--input-len", action="append", type=_token_counts, default=[], metavar="LEN[,LEN]",
           help=f"run only items with these input lengths; {TOKEN_COUNT_FORMS}; repeatable"),
    Option("--concurrency", action="append", type=_positive_ints, default=[], metavar="N[,N]",
           help="run only items with these concurrencies; repeatable"),
    Option("--backend", action="append", type=_backends, default=[], metavar="NAME[,NAME]",
           help=f"run only items of these offload backends: {', '.join(BACKENDS)}; repeatable"),
    Option("--output-len", action="append", type=_positive_ints, default=[], metavar="N[,N]",
           help="run only items with these output lengths; repeatable"),
    Option("--trials", type=_trials, metavar="N",
           help=f"trials per item, overriding the scenarios' value (at most {MAX_TRIALS})"),
    Option("--kv-server", "kvcache_server", choices=SERVER_KINDS, ini_default="emulator",
           ini_help=f"default of --kv-server: {', '.join(SERVER_KINDS)}",
           help="server to benchmark: the built-in emulator (default), a real vllm serve process, "
                "or an external endpoint (ini: kvcache_server)"),
    _twin("--kv-endpoint", "kvcache_endpoint", metavar="URL",
           help="base URL of the server for --kv-server external, e.g. http://127.0.0.1:8000"),
    _twin("--kv-server-args", "kvcache_server_args", metavar="ARGS",
           help="extra arguments for the started server (vllm serve or the emulator), one quoted "
                "string, e.g. --kv-server-args='--max-model-len 16384'"),
    _twin("--model", "kvcache_model", metavar="NAME",
           help="model name or folder to serve / request"),
    _twin("--tokenizer", "kvcache_tokenizer", metavar="PATH",
           help="local tokenizer (folder with tokenizer.json) for exact prompt lengths; default: the "
                "server's /tokenize"),
    Option("--kv-results-dir", "kvcache_results_dir", metavar="DIR",
           help="folder for per-item JSON results and server logs (ini: kvcache_results_dir; "
                "default kvcache-results/run-<timestamp>)"),
    _twin("--baseline-dir", "kvcache_baseline_dir", metavar="DIR", ini_default="baselines",
           help="folder of stored baselines"),
    Option("--update-baselines", action="store_true", default=False,
           help="append this run to the stored baselines instead of comparing"),
    Option("--reset-baselines", action="store_true", default=False,
           help="replace the stored baselines' history with this run (after an intended change)"),
    Option("--strict-baselines", "kvcache_strict_baselines", action="store_true", ini_type="bool", ini_default=False,
           help="fail, rather than skip, items without a matching baseline (ini: kvcache_strict_baselines)"),
    _twin("--alpha", "kvcache_alpha", metavar="P", ini_default="0.05",
           number=Number(0, 0.5, "a significance level such as 0.05"),
           help="significance level of the regression gate, 0 < P < 0.5"),
    _list_option("--threshold", "kvcache_thresholds", "METRIC=PCT", type=_threshold_override,
                 ini_help="threshold overrides METRIC=PCT, one per line (see --threshold)",
                 help="override a metric's practical threshold in every scenario, e.g. median_ttft_ms=15%%; "
                      "repeatable (ini: kvcache_thresholds, one per line)"),
    Option("--emulator-profile", "kvcache_emulator_profile", metavar="NAME|FILE", ini_default="quick",
           help="cost-model profile of the emulator, by name or a profile file written by "
                "'python -m pytest_kvcache calibrate' (ini: kvcache_emulator_profile; default quick); "
                "python -m pytest_kvcache.emulator --help lists the names"),
    _twin("--emulator-slowdown", "kvcache_emulator_slowdown", metavar="FACTOR", ini_default="1.0",
           number=Number(0, 1000, "a factor above 0, e.g. 1.3"),
           help="multiply every modeled time of the emulator by FACTOR > 0, to rehearse a regression"),
    Option("--kv-python", "kvcache_python", metavar="PATH",
           help="Python interpreter that runs vLLM and LMCache for --kv-server vllm, e.g. "
                ".real-stack/venv/bin/python (ini: kvcache_python; default: this one)"),
    Option("--kv-lmcache-mode", "kvcache_lmcache_mode", metavar="MODE",
           ini_help="LMCache mode of scenarios without lmcache_mode (see --kv-lmcache-mode)",
           help=f"LMCache mode under --kv-server vllm: {', '.join(LMCACHE_MODES)}; auto takes the "
                "multi-process server where there is no GPU. Given here it overrides the scenarios' "
                "lmcache_mode (and keeps only this mode's items where lmcache_mode is a matrix axis); "
                "the ini kvcache_lmcache_mode is only a default under them (default auto)"),
    _list_option("--kv-lmcache", "kvcache_lmcache", "KEY=VALUE",
                 ini_help="LMCache settings KEY=VALUE, one per line (see --kv-lmcache)",
                 help="LMCache setting overriding the backend's default, VALUE as JSON or text, e.g. "
                      "max_local_disk_size=100 or extra_config='{\"use_odirect\": true}'; in multi-process "
                      "mode also l2_store_policy=skip_l1 and fault_inject=RATE (a tier losing that share of "
                      "keys, a rehearsal never stored as a baseline); repeatable (ini: kvcache_lmcache, one per "
                      "line)"),
    _twin("--kv-redis-url", "kvcache_redis_url", metavar="URL",
           help="Redis of the redis backend, redis://HOST:PORT; default: a redis-server started on "
                "127.0.0.1 for the session"),
    _twin("--kv-gds-path", "kvcache_gds_path", metavar="DIR",
           help="folder on a GDS mount for the gds backend and the storage phase's gds tier"),
    _list_option("--kv-label", "kvcache_labels", "KEY=VALUE",
                 ini_help="runner labels KEY=VALUE, one per line (see --kv-label)",
                 help="a fact of this runner the fixtures cannot set, recorded on every result and in the "
                      "baseline testbed, e.g. bandwidth=400Gbps, arcc=on, direction=east-west, "
                      "mount=/mnt/nvme; repeatable (ini: kvcache_labels, one per line)"),
    _twin("--kv-min-hit-ratio", "kvcache_min_hit_ratio", metavar="F", ini_default="0.5",
           number=Number(0, 1, "a fraction from 0 to 1, e.g. 0.5 (0 turns the check off)", low_ok=True, high_ok=True),
           help="a warm round of an offload backend fails unless it loads at least this fraction "
                "of the whole 256-token chunks of its prompts from the tier; 0 turns the check off"),
    _twin("--kv-tensor-parallel-size", "kvcache_tensor_parallel_size", type=_positive_int, metavar="N",
           number=_positive(optional=True, names="kvcache_tensor_parallel_size"),
           help="vllm serve --tensor-parallel-size"),
    _twin("--kv-max-model-len", "kvcache_max_model_len", type=_positive_int, metavar="N",
           number=_positive(optional=True, names="kvcache_max_model_len"),
           help="vllm serve --max-model-len"),
    _twin("--kv-gpu-memory-utilization", "kvcache_gpu_memory_utilization", metavar="F",
           number=Number(0, 1.000001, "a fraction of GPU memory above 0 and at most 1, e.g. 0.9", optional=True),
           help="vllm serve --gpu-memory-utilization, 0 < F <= 1"),
    Option("--kv-ready-timeout", "kvcache_ready_timeout", metavar="SECONDS",
           number=Number(0, 86400, "seconds above 0, e.g. 600", high_ok=True, optional=True),
           help="how long a started server may take to answer /health (ini: kvcache_ready_timeout; "
                "default 60 for the emulator, 600 for vllm)"),
    Option("--kv-request-timeout", "kvcache_request_timeout", metavar="SECONDS",
           number=Number(0, 86400, f"seconds above 0 and at most 86400 (a day), e.g. {DEFAULT_REQUEST_TIMEOUT:g}",
                         high_ok=True, default=DEFAULT_REQUEST_TIMEOUT),
           help="how long one benchmark request may take to complete before it counts as failed "
                f"(ini: kvcache_request_timeout; default {DEFAULT_REQUEST_TIMEOUT:g})"),
    Option("--kv-client-floor", "kvcache_client_floor", metavar="F",
           number=Number(MIN_CLIENT_FLOOR, 1, f"a fraction from {MIN_CLIENT_FLOOR:g} to 1, e.g. "
                         f"{DEFAULT_CLIENT_FLOOR:g} (below {MIN_CLIENT_FLOOR:g} a round would be another "
                         "scenario's load)", low_ok=True, high_ok=True, default=DEFAULT_CLIENT_FLOOR),
           help="a round is invalid when the client kept fewer than F x the scenario's concurrency in "
                "flight while requests waited, or issued fewer than F x its request rate; lower it "
                f"knowingly on a shared runner with very short requests ({MIN_CLIENT_FLOOR:g} <= F <= 1; "
                f"ini: kvcache_client_floor; default {DEFAULT_CLIENT_FLOOR:g})"),
    _twin("--kv-gpus-per-worker", "kvcache_gpus_per_worker", metavar="N",
           number=_positive(form="a positive integer (GPUs given to each pytest-xdist worker)", optional=True),
           help="under pytest-xdist, give each worker its own N GPUs (CUDA_VISIBLE_DEVICES: worker gwK "
                "gets the K-th slice of the visible ones)"),
    Option("--percentiles", "kvcache_percentiles", metavar="Q[,Q]", ini_default="50,90,99",
           help="percentiles reported for TTFT, TPOT, ITL and E2E latency, e.g. 50,90,99 "
                "(ini: kvcache_percentiles)"),
    _twin("--kv-client-processes", "kvcache_client_processes", type=_client_processes, metavar="N",
           ini_default="1", number=_positive(MAX_CLIENT_PROCESSES, f"a positive integer up to {MAX_CLIENT_PROCESSES}",
                                              optional=True, names="kvcache_client_processes"),
           help="send each round from N client processes, the concurrency and the prompts split "
                "between them, for servers that stream more than one process reads"),
    _list_option("--kv-version", "kvcache_versions", "KEY=VALUE",
                 ini_help="software versions KEY=VALUE, one per line (see --kv-version)",
                 help="a version of the software under test the plugin cannot see, e.g. commit=abc123 or "
                      "build=nightly-42: recorded on every run and compared across, never a reason to skip; "
                      "repeatable (ini: kvcache_versions, one per line)"),
    _ini("kvcache_testbed_keys", "identity keys (glob patterns) that must match for runs to be compared, "
         "e.g. torch_version; one per line", "linelist", []),
    _ini("kvcache_software_keys", "identity keys (glob patterns) compared across runs instead, e.g. "
         "label.bandwidth; one per line", "linelist", []),
    Option("--kv-run-noise", "kvcache_run_noise", metavar="PCT",
           help="the run-to-run noise of this testbed, e.g. 3%%, used where the baselines have too few "
                "runs to estimate it (ini: kvcache_run_noise; default: none, such items are not judged)"),
    _twin("--kv-confirm-runs", "kvcache_confirm_runs", metavar="N", ini_default="1", number=_count(0, "1"),
           help="runs on fresh servers that confirm a first run that looks worse before it is judged; "
                "0 judges the first run alone"),
    Option("--kv-history", "kvcache_history", metavar="URL",
           help="where every run is recorded: a file, sqlite:///PATH or postgresql://...; none turns it "
                "off (ini: kvcache_history; default .kvcache/history.sqlite in the rootdir)"),
    _twin("--kv-history-window", "kvcache_history_window", metavar="N", ini_default="20", number=_count(2, "20"),
           help="the session summary lists change points of its items among their last N runs"),
    _twin("--kv-external-backend", "kvcache_external_backend", metavar="NAME",
           help=f"the offload backend the --kv-server external server runs ({', '.join(BACKENDS)}; none "
                "for a server without a tier): only its items run, the others are deselected. Default: "
                "what the server's GET /version says (the built-in emulator says it), else every item "
                "runs"),
    Option("--kv-check-outputs", "kvcache_check_outputs", dest="kv_check_outputs", action="store_const", const=True,
           ini_default="auto", ini_help="default of --kv-check-outputs: auto, true or false",
           help="check every offload item's answers: each warm round's against the cold round's "
                "recomputation, beside a control recomputation (ini: kvcache_check_outputs = auto, true "
                "or false; default auto: each scenario's check_outputs, else where output_len > 1)"),
    Option("--no-kv-check-outputs", dest="kv_check_outputs", action="store_const", const=False,
           help="check no item's answers (no control round is sent)"),
)
#: the rows with an ini key, by the name raw_value takes: the option's dest, else the ini key
_BY_NAME = {(option.name if option.flag else option.ini): option for option in OPTIONS if option.ini}


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvcache", "KV-cache offloading benchmarks (pytest-kvcache)")
    for option in OPTIONS:
        if option.flag:
            group.addoption(option.flag, **option.argparse_kwargs())
        if option.ini:
            help = option.ini_help or f"default of {option.flag}"
            if option.ini_type:
                parser.addini(option.ini, help, type=option.ini_type, default=option.ini_default)  # type: ignore[arg-type]
            else:
                parser.addini(option.ini, help, default=option.ini_default)


def raw_value(config: pytest.Config, name: str) -> Any:
    """The option ``name`` as given on the command line, else its ini key's value; None
    where neither gives one."""
    option = _BY_NAME[name]
    value = config.getoption(option.name) if option.flag else None
    if value is None or value == "":
        value = config.getini(option.ini_key)
    return value if value != "" else None


def _refuse(name: str, raw: Any, problem: str) -> pytest.UsageError:
    return pytest.UsageError(f"{_BY_NAME[name].names} = {raw!r}: {problem}")


# -- reading: the typed Settings ------------------------------------------------------


def read_settings(config: pytest.Config) -> Settings:
    """The session's settings from the options (over their ini keys); a usage error where a value is bad."""
    kind = raw_value(config, "kv_server")
    if kind not in SERVER_KINDS:
        raise pytest.UsageError(f"kvcache_server = {kind!r}: use one of {', '.join(SERVER_KINDS)}")
    endpoint = raw_value(config, "kv_endpoint")
    if endpoint is not None:
        _check_endpoint(endpoint)
    if kind == "external" and endpoint is None:
        raise pytest.UsageError("--kv-server external needs --kv-endpoint URL (e.g. http://127.0.0.1:8000)")
    tokenizer = raw_value(config, "tokenizer")
    if tokenizer is not None and not _exists(Path(tokenizer)):
        raise _refuse("tokenizer", tokenizer, "no such file or folder; pass a model folder with tokenizer.json")
    update, reset = config.getoption("update_baselines"), config.getoption("reset_baselines")
    if update and reset:
        raise pytest.UsageError("--update-baselines and --reset-baselines exclude each other: --update-baselines adds "
                                "this run to the stored runs, --reset-baselines replaces them with it; pass one")
    return Settings(
        server=_server_settings(config, kind, endpoint),
        tokenizer=tokenizer,
        results_dir=_folder(config, "kv_results_dir", _results_dir(config), writable=True),
        baseline_dir=_folder(config, "baseline_dir", raw_value(config, "baseline_dir"), writable=update or reset),
        update_baselines=update,
        reset_baselines=reset,
        strict_baselines=_strict_baselines(config),
        alpha=number(config, "alpha"),
        thresholds=_threshold_settings(config),
        trials=config.getoption("trials"),
        verbose=config.getoption("verbose"),
        min_hit_ratio=number(config, "kv_min_hit_ratio"),
        percentiles=_percentiles(config),
        client_processes=int(number(config, "kv_client_processes") or 1),
        versions=_pairs(config, "kv_version", "commit=abc123"),
        key_moves=KeyMoves(to_testbed=_key_patterns(config, "kvcache_testbed_keys"),
                           to_software=_key_patterns(config, "kvcache_software_keys")),
        run_noise=_run_noise(config),
        confirm_runs=int(number(config, "kv_confirm_runs")),
        history_url=_history_url(config),
        history_window=int(number(config, "kv_history_window")),
        request_timeout=number(config, "kv_request_timeout"),
        client_floor=number(config, "kv_client_floor"),
        check_outputs=_check_outputs(config),
    )


def _results_dir(config: pytest.Config) -> str:
    worker_results = getattr(config, "workerinput", {}).get("kvcache_results_dir")
    if worker_results:
        return str(worker_results)  # an xdist worker: the controller's run folder
    results = raw_value(config, "kv_results_dir")
    if results is not None:
        return str(results)
    import datetime as _dt
    import secrets

    # sortable by time to the microsecond, and random beyond: runs started together never share it
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return str(config.rootpath / "kvcache-results" / f"run-{stamp}-{secrets.token_hex(2)}")


def _server_settings(config: pytest.Config, kind: str, endpoint: str | None) -> ServerSettings:
    server_args = raw_value(config, "kv_server_args") or ""
    try:
        extra_args = tuple(shlex.split(server_args))
    except ValueError as exc:
        raise _refuse("kv_server_args", server_args, f"{exc}; quote it as one shell string") from None
    python = raw_value(config, "kv_python")
    if python is not None and not _is_file(Path(python)):
        raise _refuse("kv_python", python, "no such file; pass a Python interpreter that has vLLM, e.g. "
                                           ".real-stack/venv/bin/python")
    # Kept apart: the command line beats a scenario's lmcache_mode, the ini does not.
    mode_override = config.getoption("kv_lmcache_mode")
    mode_default = config.getini("kvcache_lmcache_mode") or None
    for mode in (mode_override, mode_default):
        if mode is not None and mode not in LMCACHE_MODES:
            raise _refuse("kv_lmcache_mode", mode, f"use one of {', '.join(LMCACHE_MODES)}")
    redis_url = raw_value(config, "kv_redis_url")
    if redis_url is not None and not _REDIS_URL.match(redis_url):
        raise _refuse("kv_redis_url", redis_url, "use redis://HOST:PORT")
    return ServerSettings(
        kind=kind,
        endpoint=endpoint,
        model=raw_value(config, "model"),
        extra_args=extra_args,
        emulator_profile=_emulator_profile(config),
        emulator_slowdown=number(config, "emulator_slowdown"),
        python=python,
        lmcache_mode=mode_default,
        lmcache_mode_override=mode_override,
        redis_url=redis_url,
        gds_path=raw_value(config, "kv_gds_path"),
        ready_timeout=_ready_timeout(config, kind),
        labels=_pairs(config, "kv_label", "bandwidth=400Gbps"),
        lmcache_overrides=_pairs(config, "kv_lmcache", "max_local_cpu_size=20"),
        tensor_parallel_size=_whole(number(config, "kv_tensor_parallel_size")),
        max_model_len=_whole(number(config, "kv_max_model_len")),
        gpu_memory_utilization=number(config, "kv_gpu_memory_utilization"),
    )


def _ready_timeout(config: pytest.Config, kind: str) -> float:
    timeout = number(config, "kv_ready_timeout")
    if timeout is None:
        return 600.0 if kind == "vllm" else 60.0
    return timeout


def _check_endpoint(endpoint: str) -> None:
    """A http(s) URL with a host and a valid port; the message never shows its credentials."""
    from urllib.parse import urlsplit

    from .report.redact import redact_url

    try:
        parts = urlsplit(endpoint)
        port_ok = parts.port is None or parts.port > 0  # .port raises ValueError out of 0..65535
    except ValueError:
        port_ok = False
    if not port_ok or not parts.hostname or not _URL.match(endpoint):
        raise _refuse("kv_endpoint", redact_url(endpoint), "use a URL such as http://127.0.0.1:8000 (credentials "
                                                           "as http://user:token@host:8000)")


def _emulator_profile(config: pytest.Config) -> str:
    """A built-in profile's name, or the absolute path of a readable profile file."""
    from .emulator.costmodel import PROFILES
    from .emulator.profile_file import ProfileFileError, is_profile_path, read_profile_file

    value = raw_value(config, "emulator_profile")
    if not is_profile_path(value):
        if value not in PROFILES:
            raise _refuse("emulator_profile", value, f"use one of {', '.join(sorted(PROFILES))}")
        return str(value)
    path = Path(value)
    if not path.is_absolute() and not _exists(path):
        path = config.rootpath / path  # an ini value is relative to the rootdir
    try:
        read_profile_file(path)
    except (ProfileFileError, ValueError) as exc:  # ValueError: a path no file can have (a NUL byte)
        raise _refuse("emulator_profile", value, str(exc)) from None
    return str(path.resolve())


def number(config: pytest.Config, name: str) -> Any:
    """Number option ``name`` (else its ini key) as its row's :class:`Number` takes it; an
    integer where the row says ``whole``."""
    option = _BY_NAME[name]
    rule = option.number
    assert rule is not None, name
    raw = raw_value(config, name)
    if raw is None and (rule.default is not None or rule.optional):
        return rule.default
    if rule.whole and isinstance(raw, int):  # the command line's value, already checked by argparse
        return raw
    try:
        value = int(str(raw)) if rule.whole else float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not rule.admits(value):
        raise pytest.UsageError(f"{rule.names or option.names} = {raw!r}: use {rule.form}")
    return value


def _whole(value: float | None) -> int | None:
    return None if value is None else int(value)


def gpus_per_worker(config: pytest.Config) -> int | None:
    """--kv-gpus-per-worker: GPUs given to each pytest-xdist worker, None where not given."""
    return _whole(number(config, "kv_gpus_per_worker"))


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


def _folder(config: pytest.Config, name: str, raw: str, writable: bool) -> Path:
    """The folder of an option, absolute: ``~`` expanded, relative to the rootdir. A usage
    error now, rather than a traceback in every item, when it is no folder (a file is in
    the way) or, ``writable``, when this user cannot create or write it."""
    problem = None
    try:
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else config.rootpath / path
        existing = path
        while not existing.exists():  # the folder is made on first use: its nearest existing parent must allow it
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is not a folder"
        elif writable and not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable by this user"
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: ~user of no such user
        problem = f"cannot be used as a folder ({exc})"
    if problem:
        raise _refuse(name, raw, f"{problem}; pass a folder this user can write")
    return path


def _check_outputs(config: pytest.Config) -> bool | None:
    """--kv-check-outputs / --no-kv-check-outputs, else the ini's auto (None), true or false."""
    value = config.getoption("kv_check_outputs")
    if value is not None:
        return bool(value)
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


def _key_patterns(config: pytest.Config, ini: str) -> tuple[str, ...]:
    patterns = tuple(config.getini(ini))
    for pattern in patterns:
        if not re.fullmatch(r"[A-Za-z0-9_.*?-]+", pattern):
            raise pytest.UsageError(f"{ini} = {pattern!r}: use identity keys or glob patterns of them, one per line, "
                                    "e.g. torch_version or label.*")
    return patterns


def _run_noise(config: pytest.Config) -> float | None:
    raw = raw_value(config, "kv_run_noise")
    if raw is None:
        return None
    text = str(raw).strip()
    try:
        value = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise _refuse("kv_run_noise", raw, "use a percentage above 0 and below 100, e.g. 3%")
    return value


def _history_url(config: pytest.Config) -> str | None:
    raw = raw_value(config, "kv_history")
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
        raise _refuse("kv_history", raw, str(exc)) from None
    return str(url)


def _percentiles(config: pytest.Config) -> tuple[float, ...]:
    from .metrics import parse_percentiles

    raw = raw_value(config, "percentiles") or "50,90,99"
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


def _pairs(config: pytest.Config, name: str, example: str) -> tuple[tuple[str, str], ...]:
    """KEY=VALUE items of a repeatable option, else of its ini lines."""
    items: Iterable[Any] = config.getoption(name) or config.getini(_BY_NAME[name].ini_key)
    pairs = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key.strip()) or not value.strip():
            raise _refuse(name, item, f"use KEY=VALUE, e.g. {example}")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)
