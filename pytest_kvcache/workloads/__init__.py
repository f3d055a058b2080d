"""Workloads: the prompts a scenario sends, built reproducibly from a seed.

``build_prompts`` is the single entry point; each dataset lives in its own module.
"""

from __future__ import annotations

from ._codec import LocalTokenizer, ServerTokenizer, TokenCodec
from ._prompt import Prompt
from .random import build_random_prompts

__all__ = ["LocalTokenizer", "Prompt", "ServerTokenizer", "TokenCodec", "build_prompts", "build_random_prompts"]


async def build_prompts(codec: TokenCodec, *, dataset: str, input_len: int, output_len: int,
                        num_prompts: int, seed: int, trial: int) -> list[Prompt]:
    """The prompts of one trial of a scenario case."""
    if dataset == "random":
        return await build_random_prompts(
            codec, input_len=input_len, output_len=output_len, num_prompts=num_prompts, seed=seed, trial=trial
        )
    raise ValueError(f"unknown dataset {dataset!r}")
