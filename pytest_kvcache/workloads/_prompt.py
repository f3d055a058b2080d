from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One request's input: its text, its exact token count, and the tokens to generate.

    ``turn`` orders multi-turn workloads: the runner sends all prompts of turn 0, then
    all of turn 1, ... each as its own sub-round, so later turns find the KV of earlier
    ones in the cache. Every other workload leaves it 0.
    """

    text: str
    input_len: int
    output_len: int
    turn: int = 0
