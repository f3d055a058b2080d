from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One request's input: its text, its exact token count, and the tokens to generate.

    ``turn`` orders multi-turn workloads: the runner sends all prompts of turn 0, then
    all of turn 1, ... each as its own sub-round, so later turns find the KV of earlier
    ones in the cache. Every other workload leaves it 0.

    ``token_ids``, when set, is sent instead of the text (a completions request's
    ``prompt`` as a list of ids): a prompt given as ids reaches the server exactly.
    """

    text: str
    input_len: int
    output_len: int
    turn: int = 0
    token_ids: tuple[int, ...] | None = None
