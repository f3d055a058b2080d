"""What a newcomer types first reads right: an empty selection says what exists, the
markers are listed, a scenario setting without effect is refused, help texts are whole."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pytest_kvcache.errors import ScenarioError
from pytest_kvcache.scenarios import parse_scenario

ROOT = Path(__file__).resolve().parents[2]


MULTITURN = {"name": "mt", "phase": "multiturn", "dataset": "multiturn", "num_prompts": 2,
             "dataset_options": {"num_turns": 2, "output_num_tokens": {"distribution": "uniform", "min": 12,
                                                                       "max": 20}}}


@pytest.mark.parametrize("where", ["matrix", "top"])
def test_output_len_beside_output_num_tokens_is_refused_naming_it(where):
    data = {**MULTITURN, "matrix": {"backend": ["cpu"], "input_len": [128]}}
    if where == "matrix":
        data["matrix"]["output_len"] = [32]
    else:
        data["output_len"] = 32
    key = "matrix.output_len" if where == "matrix" else "output_len"
    with pytest.raises(ScenarioError, match=rf"key '{key}': .*has no effect: dataset_options.output_num_tokens "
                                             "sets each answer's length"):
        parse_scenario(data, "mt.yaml")


def test_multiturn_output_len_takes_effect_or_follows_the_distribution():
    from pytest_kvcache.workloads import build_prompts

    derived = parse_scenario({**MULTITURN, "matrix": {"backend": ["cpu"], "input_len": [128]}}, "mt.yaml").cases[0]
    assert derived.output_len == 16  # the mean of uniform 12..20: ids, thresholds and warm-ups follow it
    plain = {k: v for k, v in MULTITURN.items() if k != "dataset_options"}
    case = parse_scenario({**plain, "dataset_options": {"num_turns": 2},
                           "matrix": {"backend": ["cpu"], "input_len": [128], "output_len": [32]}}, "mt.yaml").cases[0]

    class Codec:
        vocab_size = 32000

        async def encode(self, text):
            return text.split()

        async def decode(self, ids):
            return " ".join(f"t{i}" for i in ids)

    prompts = asyncio.run(build_prompts(Codec(), dataset="multiturn", input_len=case.input_len,
                                        output_len=case.output_len, num_prompts=2, seed=0, trial=0,
                                        options=case.options))
    assert {p.output_len for p in prompts} == {32}


def test_sharegpt_output_len_without_effect_is_refused():
    data = {"name": "sg", "phase": "sharegpt", "dataset": "sharegpt", "matrix": {"backend": ["none"],
                                                                                 "input_len": [1024],
                                                                                 "output_len": [1]}}
    with pytest.raises(ScenarioError, match="key 'matrix.output_len': .*has no effect: a ShareGPT answer"):
        parse_scenario(data, "sg.yaml")
    del data["matrix"]["output_len"]
    fixed = parse_scenario({**data, "dataset_options": {"output_len": 64}}, "sg.yaml").cases[0]
    assert fixed.output_len == 64


def test_shipped_and_example_scenarios_still_load():
    from pytest_kvcache.scenarios import load_scenario, read_scenario_data
    from pytest_kvcache.storage import load_storage_scenario
    from pytest_kvcache.storage_items import is_storage_data

    for path in [*(ROOT / "scenarios").glob("*.yaml"), *(ROOT / "examples" / "scenarios").glob("*.yaml")]:
        if is_storage_data(read_scenario_data(path)):
            load_storage_scenario(path)
        else:
            load_scenario(path)
    multiturn = load_scenario(ROOT / "scenarios" / "multiturn.yaml").cases[0]
    assert multiturn.name == "multiturn[cpu-128-c8]" and multiturn.output_len == 16  # its baseline still applies


def test_emulator_fault_flags_set_the_settings_and_stall_needs_both():
    from pytest_kvcache.emulator.__main__ import parse_settings

    settings, _ = parse_settings(["--error-rate", "0.25", "--crash-after", "40", "--stall-ms", "50",
                                  "--stall-every", "3"])
    assert (settings.error_rate, settings.crash_after, settings.stall_ms, settings.stall_every) == (0.25, 40, 50.0, 3)
    with pytest.raises(SystemExit):
        parse_settings(["--stall-ms", "50"])
    with pytest.raises(SystemExit):
        parse_settings(["--error-rate", "1.5"])
