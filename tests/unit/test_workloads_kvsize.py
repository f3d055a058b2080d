"""KV bytes per token (GQA and MLA) and the request count for a KV-size target."""

from __future__ import annotations

import json

import pytest

from pytest_kvcache.kvsize import (
    kv_bytes_per_token,
    kv_tokens_per_request,
    prompts_for_kv_target,
)

BF16 = {"torch_dtype": "bfloat16"}
MODELS = {
    "Qwen2.5-7B": ({"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "hidden_size": 3584, **BF16}, 57_344),
    "Mistral-7B": ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "hidden_size": 4096, **BF16}, 131_072),
    "Llama-3.1-8B": ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                      "hidden_size": 4096, **BF16}, 131_072),
    "Qwen3-8B": ({"num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "head_dim": 128, "hidden_size": 4096, **BF16}, 147_456),
    "Llama-3.1-70B": ({"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                       "hidden_size": 8192, **BF16}, 327_680),
    "DeepSeek-V3": ({"num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
                     "kv_lora_rank": 512, "qk_rope_head_dim": 64, "hidden_size": 7168, **BF16}, 70_272),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_known_kv_bytes_per_token(name):
    config, expected = MODELS[name]
    assert kv_bytes_per_token(config) == expected


def test_config_json_file_folder_and_dtype_override(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MODELS["Llama-3.1-8B"][0]))
    assert kv_bytes_per_token(tmp_path) == kv_bytes_per_token(tmp_path / "config.json") == 131_072
    assert kv_bytes_per_token(tmp_path, dtype="fp8") == 65_536
    no_gqa = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256, "torch_dtype": "float32"}
    assert kv_bytes_per_token(no_gqa) == 2 * 4 * 64 * 2 * 4


@pytest.mark.parametrize("config,match", [({"num_attention_heads": 4}, "num_hidden_layers"),
                                          ({**MODELS["Mistral-7B"][0], "torch_dtype": "int3"}, "unknown dtype")])
def test_bad_configs_say_what_is_missing(config, match):
    with pytest.raises(ValueError, match=match):
        kv_bytes_per_token(config)


def test_prompts_for_kv_targets_of_the_seed():
    per_token = MODELS["DeepSeek-V3"][1]
    counts = [prompts_for_kv_target(gb, per_token, 100_000) for gb in (50, 100, 150, 200, 250)]
    assert counts == [8, 15, 22, 29, 36]
    for gb, n in zip((50, 100, 150, 200, 250), counts):
        assert n * per_token * 100_000 >= gb * 1e9 > (n - 1) * per_token * 100_000
    assert prompts_for_kv_target(1, 1024, 1024, gib=True) == 1024
    with pytest.raises(ValueError):
        prompts_for_kv_target(0, 1, 1)


def test_a_request_writes_the_kv_of_its_prompt_and_generated_tokens():
    """Prefill-only (seed 003): exactly the prompt.  Decoding adds every generated token
    but the last, whose KV is never computed."""
    assert kv_tokens_per_request(100_000) == kv_tokens_per_request(100_000, 1) == 100_000
    assert kv_tokens_per_request(1000, 1001) == 2000
    per_token = MODELS["Qwen2.5-7B"][1]
    prefill_only = prompts_for_kv_target(1, per_token, 1000)
    decoding = prompts_for_kv_target(1, per_token, 1000, 1001)
    assert (prefill_only, decoding) == (18, 9)  # 1e9 / (57,344 x 1000), then x 2000 tokens
    assert decoding * per_token * 2000 >= 1e9 > (decoding - 1) * per_token * 2000
    for bad in ((0, 1), (1, 0)):
        with pytest.raises(ValueError):
            kv_tokens_per_request(*bad)
    with pytest.raises(ValueError):
        prompts_for_kv_target(1, per_token, 1000, 0)
