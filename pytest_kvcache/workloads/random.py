"""The random dataset: prompts of exact token lengths from seeded token ids.

Like ``vllm bench serve --dataset-name random``, each prompt is random token ids
decoded to text; unlike it, the text is re-encoded and corrected until it is exactly
``input_len`` tokens as the server counts them. The ids come from a generator seeded
by (seed, input length, trial, prompt index), so a trial sends the same tokens in
every run, and prompts of different lengths share no prefix (no accidental hits
between the items of one server).
"""

from __future__ import annotations

import random as _random

from ..errors import WorkloadError
from ._codec import TokenCodec
from ._prompt import Prompt

__all__ = ["SAMPLED_IDS", "build_random_prompts"]

#: Token ids are drawn from this range: above the usual special and byte tokens and
#: inside even a tiny 4096-token vocabulary, so one seed means the same ids everywhere.
SAMPLED_IDS = range(100, 4000)
_MAX_FIT_ROUNDS = 12


async def build_random_prompts(codec: TokenCodec, *, input_len: int, output_len: int, num_prompts: int,
                               seed: int, trial: int, parallel: int = 4) -> list[Prompt]:
    import asyncio  # here, not at the top: scenarios.py (read at every pytest start) imports this module

    limit = asyncio.Semaphore(parallel)

    async def one(index: int) -> Prompt:
        async with limit:
            rng = _random.Random(f"random:{seed}:{input_len}:{trial}:{index}")
            text = await _fit(codec, rng, input_len)
            return Prompt(text=text, input_len=input_len, output_len=output_len)

    return list(await asyncio.gather(*(one(i) for i in range(num_prompts))))


async def _fit(codec: TokenCodec, rng: _random.Random, target: int) -> str:
    """Random ids decoded to text, trimmed or extended until it encodes to ``target``."""
    low, high = SAMPLED_IDS.start, min(SAMPLED_IDS.stop, codec.vocab_size or SAMPLED_IDS.stop)
    ids = [rng.randrange(low, high) for _ in range(target)]
    count = -1
    for _ in range(_MAX_FIT_ROUNDS):
        text = await codec.decode(ids)
        count = len(await codec.encode(text))
        if count == target:
            return text
        if count > target:
            del ids[max(1, len(ids) - (count - target)):]
        else:
            ids.extend(rng.randrange(low, high) for _ in range(target - count))
    raise WorkloadError(
        f"could not build a prompt of exactly {target} tokens with this tokenizer (last try: {count}); "
        "check that --tokenizer matches the served model"
    )
