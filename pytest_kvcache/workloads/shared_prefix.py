"""Shared-prefix / long-document reuse with a configured hit ratio.

``dataset_options``: ``hit_ratio`` (0..1, default 0.5): the fraction of each prompt's
``input_len`` tokens that is a shared document prefix; ``num_prefixes`` (default 1):
how many distinct documents, prompt i reading document i mod num_prefixes. The rest
of each prompt is its own seeded suffix. With one document and the cache warm, the
expected token hit ratio of a round is ``hit_ratio`` (plus the first prompt's miss).
"""

from __future__ import annotations

import random as _random

from ._codec import TokenCodec
from ._options import MAX_PROMPTS, OptionProblem, show
from ._prompt import Prompt
from .random import SAMPLED_IDS

__all__ = ["OPTIONS", "build_shared_prefix_prompts", "check_options"]

OPTIONS = {"hit_ratio": 0.5, "num_prefixes": 1}


def check_options(options: dict) -> dict:
    out = {}
    if "hit_ratio" in options:
        value = options["hit_ratio"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise OptionProblem("hit_ratio", f"{show(value)} must be a number from 0 to 1, e.g. 0.8")
        out["hit_ratio"] = float(value)
    if "num_prefixes" in options:
        value = options["num_prefixes"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROMPTS:
            raise OptionProblem("num_prefixes", f"{show(value)} must be a positive integer up to {MAX_PROMPTS:,}")
        out["num_prefixes"] = value
    return out


def prefix_len(input_len: int, hit_ratio: float) -> int:
    return min(input_len, round(input_len * hit_ratio))


async def build_shared_prefix_prompts(codec: TokenCodec, *, input_len: int, output_len: int, num_prompts: int,
                                      seed: int, trial: int, options: dict) -> list[Prompt]:
    opts = {**OPTIONS, **check_options(options)}
    high = min(SAMPLED_IDS.stop, codec.vocab_size or SAMPLED_IDS.stop)
    low = SAMPLED_IDS.start
    base = f"shared_prefix:{seed}:{input_len}:{trial}"
    n_prefix = prefix_len(input_len, opts["hit_ratio"])
    documents = []
    for d in range(min(opts["num_prefixes"], num_prompts)):  # a document no prompt uses is never built
        rng = _random.Random(f"{base}:doc:{d}")
        documents.append([rng.randrange(low, high) for _ in range(n_prefix)])
    prompts = []
    for i in range(num_prompts):
        rng = _random.Random(f"{base}:{i}")
        ids = documents[i % len(documents)] + [rng.randrange(low, high) for _ in range(input_len - n_prefix)]
        text = await codec.decode(ids)
        prompts.append(Prompt(text=text, input_len=len(await codec.encode(text)), output_len=output_len))
    return prompts
