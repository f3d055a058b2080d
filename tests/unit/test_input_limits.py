"""Issue 13, "Nothing bad gets in": each input a hostile user found to cause a traceback, a
hang or a memory blow-up is one clear error at parse time (or, for the server's
max_model_len, before any prompt is built). One regression test per defect; the fuzz
suite (test_fuzz_inputs.py) covers the space around them."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from pytest_kvcache.errors import ScenarioError
from pytest_kvcache.scenarios import MAX_FILE_BYTES, load_scenario, parse_scenario
from helpers.scenario_files import refused

pytest_plugins = ("pytester",)

VALID = "name: s\nphase: prefill\nmatrix:\n  backend: [cpu]\n  input_len: [1k]\n"
TOP_LEN = "name: s\nphase: prefill\nmatrix:\n  backend: [cpu]\n"  # input_len free to set at top level


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
