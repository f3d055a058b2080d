from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One request's input: its text, its exact token count, and the tokens to generate."""

    text: str
    input_len: int
    output_len: int
