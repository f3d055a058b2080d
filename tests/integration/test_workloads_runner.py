"""The runner with the new workloads: multi-turn sub-rounds, warm-up, percentiles, goodput."""

from __future__ import annotations


import pytest

from pytest_kvcache import runner as runner_mod
from pytest_kvcache.runner import CaseRunner
from pytest_kvcache.scenarios import parse_scenario
from pytest_kvcache.telemetry import TelemetrySource

from pytest_kvcache.emulator.tokenizer import get_tokenizer
from pytest_kvcache.testing import start_reference_server

class Codec:
    def __init__(self):
        self._tok = get_tokenizer()
        self.vocab_size = self._tok.vocab_size

    async def encode(self, text):
        return self._tok.encode(text)

    async def decode(self, ids):
        return self._tok.decode(ids)


MODEL = "ref-test-model"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    server = start_reference_server(tmp_path_factory.mktemp("ref"), "--ttft-ms", "20", "--itl-ms", "2", model=MODEL)
    yield server.url
    server.stop()


def run(url, data, monkeypatch, percentiles=(50, 90, 99)):
    calls = []
    real = runner_mod.run_round

    async def spy(pool, spec, prompts, round_name, *args, **kw):
        calls.append((round_name, [p.turn for p in prompts]))
        return await real(pool, spec, prompts, round_name, *args, **kw)

    monkeypatch.setattr(runner_mod, "run_round", spy)
    case = parse_scenario({"name": "s", "phase": "multiturn", "matrix": {"backend": ["none"]}, "input_len": 20,
                           "output_len": 4, "trials": 1, "concurrency": 4, **data}, "s.yaml").cases[0]
    r = CaseRunner(percentiles=percentiles)
    r._local = Codec()  # the reference server has no /tokenize
    trials = r.run(case, url, MODEL, [0], telemetry=TelemetrySource(metrics_urls=()))
    return trials[0], calls


def test_multiturn_turns_are_sent_in_order_as_one_round(ref, monkeypatch):
    trial, calls = run(ref, {"dataset": "multiturn", "num_prompts": 3, "rounds": ["warm"],
                             "dataset_options": {"num_turns": 3, "common_prefix_num_tokens": 10}}, monkeypatch)
    assert calls == [("warm", [0, 0, 0]), ("warm", [1, 1, 1]), ("warm", [2, 2, 2])]
    rnd = trial.measured
    assert len(rnd.records) == 9 and [r.index for r in rnd.records] == list(range(9))
    assert rnd.summary["completed"] == 9 and rnd.summary["turns"] == 3
    ends = [max(r.end for r in rnd.records[k * 3:k * 3 + 3]) for k in range(3)]
    starts = [min(r.start for r in rnd.records[k * 3:k * 3 + 3]) for k in range(3)]
    assert ends[0] <= starts[1] and ends[1] <= starts[2]  # turn k+1 only after turn k
    assert [r.prompt_len for r in rnd.records[:3]] == [30, 30, 30]
    assert rnd.summary["total_input_tokens"] == 3 * (30 + 54 + 78)


def test_warmup_is_sent_before_each_round_and_not_recorded(ref, monkeypatch):
    trial, calls = run(ref, {"num_prompts": 4, "warmup_requests": 2, "slo": {"ttft": 10_000, "tpot": 10_000}},
                       monkeypatch, percentiles=(50, 95))
    assert [(name, len(turns)) for name, turns in calls] == [("warmup", 2), ("cold", 4), ("warmup", 2), ("warm", 4)]
    summary = trial.measured.summary
    assert summary["completed"] == 4 and len(trial.measured.records) == 4
    assert summary["request_goodput"] == pytest.approx(summary["request_throughput"])
    assert "p95_ttft_ms" in summary and "p99_ttft_ms" not in summary
    assert summary["configured_concurrency"] == 4 and "loop_lag_p99_ms" in summary  # guard figures kept


def test_strict_slo_gives_zero_goodput(ref, monkeypatch):
    trial, _ = run(ref, {"num_prompts": 2, "rounds": ["cold"], "slo": {"ttft": 1}}, monkeypatch)
    assert trial.measured.summary["request_goodput"] == 0.0
