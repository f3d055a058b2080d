"""Scenario YAML parsing and matrix expansion (no pytest machinery involved)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_kvcache.errors import ScenarioError
from pytest_kvcache.scenarios import load_scenario, parse_scenario, parse_token_count

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,value", [("100", 100), ("1k", 1000), ("10K", 10_000), ("100k", 100_000),
                                        ("1m", 1_000_000), ("1.5k", 1500), (2048, 2048)])
def test_token_counts(text, value):
    assert parse_token_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1x", "-5", "0", "1.0001k", "k"])
def test_bad_token_counts_name_the_forms(text):
    with pytest.raises(ValueError, match="1k, 10k"):
        parse_token_count(text)


def test_seed_matrix_expands_to_readable_ids():
    scenario = load_scenario(ROOT / "scenarios" / "seed_prefill.yaml")
    ids = [c.case_id for c in scenario.cases]
    assert len(ids) == 20
    assert ids[:5] == ["none-100-c16", "none-1k-c16", "none-10k-c16", "none-50k-c16", "none-100k-c16"]
    assert "gds-100k-c16" in ids
    case = scenario.cases[0]
    assert case.name == "prefill[none-100-c16]"
    assert (case.output_len, case.concurrency, case.num_prompts, case.trials) == (1, 16, 50, 3)
    assert case.rounds == ("cold", "warm") and case.measure_round == "warm"
    assert {t.metric: (t.direction, t.threshold) for t in case.thresholds} == {
        "median_ttft_ms": ("lower", 0.10), "total_token_throughput": ("higher", 0.05)}


def _minimal(**extra):
    data = {"name": "s", "phase": "prefill", "matrix": {"backend": ["cpu"], "input_len": [1000]}}
    data.update(extra)
    return data


def test_defaults_and_varying_dimensions_in_ids():
    s = parse_scenario(_minimal(matrix={"backend": ["cpu"], "input_len": ["1k"], "output_len": [1, 128]}), "x.yaml")
    assert [c.case_id for c in s.cases] == ["cpu-1k-c16-o1", "cpu-1k-c16-o128"]
    assert math.isinf(s.cases[0].request_rate)
    # TPOT is only compared once there is more than one output token
    assert "median_tpot_ms" not in {t.metric for t in s.cases[0].thresholds}
    assert "median_tpot_ms" in {t.metric for t in s.cases[1].thresholds}


@pytest.mark.parametrize("data,key", [
    ([1, 2], "<top>"),
    ({"matrix": {"backend": ["cpu"]}}, "name"),
    (_minimal(bogus=1), "bogus"),
    (_minimal(matrix={"backend": ["floppy"], "input_len": [1]}), "matrix.backend"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": ["ten"]}), "matrix.input_len"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": [1], "color": [1]}), "matrix.color"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": []}), "matrix.input_len"),
    (_minimal(matrix={"backend": ["cpu", "cpu"], "input_len": [1]}), "matrix.backend"),
    (_minimal(trials=0), "trials"),
    (_minimal(rounds=["hot"]), "rounds"),
    (_minimal(measure="warm", rounds=["cold"]), "measure"),
    (_minimal(phase="lunch"), "phase"),
    (_minimal(api="grpc"), "api"),
    (_minimal(request_rate=-1), "request_rate"),
    (_minimal(burstiness=0), "burstiness"),
    (_minimal(thresholds={"median_ttft_ms": {"threshold": "ten"}}), "thresholds.median_ttft_ms.threshold"),
    (_minimal(thresholds={"speed": {"threshold": "10%"}}), "thresholds.speed"),
    (_minimal(thresholds={"median_ttft_ms": {"direction": "up", "threshold": "10%"}}),
     "thresholds.median_ttft_ms.direction"),
    (_minimal(concurrency=16, matrix={"concurrency": [1], "backend": ["cpu"], "input_len": [1]}), "concurrency"),
])
def test_malformed_scenarios_name_file_and_key(data, key):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "scen/bad.yaml")
    assert info.value.key == key
    assert str(info.value).startswith(f"scen/bad.yaml: key '{key}':")


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmatrix: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"broken.yaml: key '<yaml>': not valid YAML at line \d"):
        load_scenario(path)


# -- dataset keys: dataset_options, kv_target_gb + model_config, warmup_requests, slo ----


def test_dataset_options_reach_the_cases_and_the_fingerprint():
    s = parse_scenario(_minimal(dataset="shared_prefix", dataset_options={"hit_ratio": 0.8, "num_prefixes": 2},
                                warmup_requests=3, slo={"ttft": 500, "tpot": 50}), "x.yaml")
    case = s.cases[0]
    assert case.dataset == "shared_prefix" and case.options == {"hit_ratio": 0.8, "num_prefixes": 2}
    assert case.warmup_requests == 3 and dict(case.slos) == {"ttft": 500.0, "tpot": 50.0}
    assert case.workload_params["dataset_options"] == {"hit_ratio": 0.8, "num_prefixes": 2}
    plain = parse_scenario(_minimal(), "x.yaml").cases[0]
    assert not {"dataset_options", "warmup_requests", "kv_target_gb"} & set(plain.workload_params)


def test_multiturn_options_in_vllm_shape():
    s = parse_scenario(_minimal(dataset="multiturn", dataset_options={
        "num_turns": {"distribution": "uniform", "min": 12, "max": 18},
        "common_prefix_num_tokens": {"distribution": "constant", "value": 500},
        "prefix_num_tokens": {"distribution": "lognormal", "average": 4000, "max": 20000},
        "num_tokens": {"distribution": "uniform", "min": 120, "max": 160}}), "x.yaml")
    assert s.cases[0].options["prefix_num_tokens"]["max"] == 20000


def test_kv_target_chooses_num_prompts(tmp_path):
    config = {"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512,
              "qk_rope_head_dim": 64, "hidden_size": 7168, "torch_dtype": "bfloat16"}
    s = parse_scenario(_minimal(matrix={"backend": ["disk"], "input_len": ["100k"],
                                        "kv_target_gb": [50, 100, 150, 200, 250]}, model_config=config), "x.yaml")
    assert [c.num_prompts for c in s.cases] == [8, 15, 22, 29, 36]
    assert [c.case_id for c in s.cases][:2] == ["disk-100k-c16-50gb", "disk-100k-c16-100gb"]
    assert s.cases[0].workload_params["kv_target_gb"] == 50.0
    import json

    (tmp_path / "config.json").write_text(json.dumps(config))
    path = tmp_path / "kv.yaml"
    s2 = parse_scenario(_minimal(input_len="100k", matrix={"backend": ["disk"]}, kv_target_gb=50,
                                 model_config="config.json"), path)
    assert s2.cases[0].num_prompts == 8
    # a request writes the KV of its prompt and of its generated tokens (all but the last)
    s3 = parse_scenario(_minimal(matrix={"backend": ["disk"], "input_len": ["50k"], "output_len": [1, 50_001]},
                                 kv_target_gb=50, model_config=config), "x.yaml")
    assert [c.num_prompts for c in s3.cases] == [15, 8]


@pytest.mark.parametrize("data,key", [
    (_minimal(dataset="mmlu"), "dataset"),
    (_minimal(dataset_options=[1]), "dataset_options"),
    (_minimal(dataset="shared_prefix", dataset_options={"hit_ratio": 2}), "dataset_options.hit_ratio"),
    (_minimal(dataset_options={"hit_ratio": 0.5}), "dataset_options.hit_ratio"),
    (_minimal(dataset="multiturn", dataset_options={"num_turns": {"distribution": "zipf"}}),
     "dataset_options.num_turns.distribution"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": [1], "dataset": ["random", "multiturn"]},
              dataset_options={"num_turns": 2}), "dataset_options"),
    (_minimal(warmup_requests=-1), "warmup_requests"),
    (_minimal(slo={"latency": 5}), "slo.latency"),
    (_minimal(slo={"ttft": 0}), "slo.ttft"),
    (_minimal(slo=[5]), "slo"),
    (_minimal(kv_target_gb=50), "model_config"),
    (_minimal(kv_target_gb=-5, model_config={}), "kv_target_gb"),
    (_minimal(kv_target_gb=50, num_prompts=3, model_config={}), "kv_target_gb"),
    (_minimal(kv_target_gb=50, model_config={"num_attention_heads": 4}), "model_config"),
    (_minimal(kv_target_gb=50, model_config="/no/config.json"), "model_config"),
    (_minimal(model_config={}), "model_config"),
])
def test_malformed_dataset_keys_name_file_and_key(data, key):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "scen/bad.yaml")
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"scen/bad.yaml: key '{key}':")


# -- lmcache_mode: how LMCache runs beside vLLM (top level, or a matrix axis) ------------


def test_lmcache_mode_at_top_level_reaches_every_case_but_not_the_ids_or_the_workload():
    s = parse_scenario(_minimal(lmcache_mode="inprocess", matrix={"backend": ["cpu", "disk"], "input_len": [1000]}),
                       "x.yaml")
    assert [(c.case_id, c.lmcache_mode, c.compares_lmcache_modes) for c in s.cases] == [
        ("cpu-1k-c16", "inprocess", False), ("disk-1k-c16", "inprocess", False)]
    plain = parse_scenario(_minimal(), "x.yaml").cases[0]
    assert plain.lmcache_mode is None and not plain.compares_lmcache_modes
    # the baseline's workload hash does not move: the backend's configuration carries the mode
    assert s.cases[0].workload_params == plain.workload_params


def test_lmcache_mode_as_a_matrix_axis_names_the_mode_in_the_ids():
    s = parse_scenario(_minimal(matrix={"backend": ["cpu"], "input_len": ["10k"], "lmcache_mode": ["inprocess", "mp"]}),
                       "x.yaml")
    assert [(c.case_id, c.lmcache_mode, c.compares_lmcache_modes) for c in s.cases] == [
        ("cpu-10k-c16-inprocess", "inprocess", True), ("cpu-10k-c16-mp", "mp", True)]
    single = parse_scenario(_minimal(matrix={"backend": ["cpu"], "input_len": [1], "lmcache_mode": ["mp"]}), "x.yaml")
    assert [(c.case_id, c.lmcache_mode, c.compares_lmcache_modes) for c in single.cases] == [("cpu-1-c16", "mp", False)]


ALLOWED_MODES = "use one of: auto, inprocess, mp"


@pytest.mark.parametrize("data,key,problem", [
    (_minimal(lmcache_mode="gpu"), "lmcache_mode", f"unknown LMCache mode 'gpu'; {ALLOWED_MODES}"),
    (_minimal(lmcache_mode=1), "lmcache_mode", f"unknown LMCache mode 1; {ALLOWED_MODES}"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": [1], "lmcache_mode": ["mp", "remote"]}),
     "matrix.lmcache_mode", f"unknown LMCache mode 'remote'; {ALLOWED_MODES}"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": [1], "lmcache_mode": ["mp", "mp"]}),
     "matrix.lmcache_mode", "repeats a value"),
    (_minimal(matrix={"backend": ["cpu"], "input_len": [1], "lmcache_mode": []}),
     "matrix.lmcache_mode", "must not be an empty list"),
    (_minimal(lmcache_mode="mp", matrix={"backend": ["cpu"], "input_len": [1], "lmcache_mode": ["mp"]}),
     "lmcache_mode", "given both at top level and in matrix"),
])
def test_bad_lmcache_modes_name_file_key_and_the_allowed_values(data, key, problem):
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "scen/bad.yaml")
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"scen/bad.yaml: key '{key}': {problem}")
