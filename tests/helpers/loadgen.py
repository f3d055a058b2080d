"""Prompts for the load generator's rounds against the reference server."""

from __future__ import annotations

import random


from pytest_kvcache.emulator.tokenizer import get_tokenizer
from pytest_kvcache.workloads import Prompt

MODEL = "ref-test-model"


def prompts(n: int, input_len: int = 256, output_len: int = 32, seed: int = 0) -> list[Prompt]:
    tok = get_tokenizer()
    rng = random.Random(seed)
    return [Prompt(tok.decode([rng.randrange(tok.num_special, tok.vocab_size) for _ in range(input_len)]),
                   input_len, output_len) for _ in range(n)]
