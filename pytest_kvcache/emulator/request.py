"""A generation request as the emulator's parts pass it along: the prompt served, the request
in flight, and the outcome of its tier read."""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Loaded", "Prompt", "Request"]


class Prompt(NamedTuple):
    """A prompt as the emulator serves it: token ids, chunk keys (none without a tier) and
    the digest of the ids (its greedy answer's seed)."""

    ids: array
    keys: list[bytes]
    digest: bytes


class Request:
    """A generation request from its arrival to its last token."""

    __slots__ = ("arrival", "digest", "ids", "io_ms", "io_overrun_ms", "keys", "max_tokens", "modeled_ms", "n",
                 "rid", "rng", "seq", "split", "wrong")

    def __init__(self, rid: str, seq: int, prompt: Prompt, arrival: float, max_tokens: int) -> None:
        self.rid = rid
        self.seq = seq
        self.ids: Sequence[int] = prompt.ids
        self.digest = prompt.digest  # of the prompt's token ids: the answer's seed
        self.wrong: list[bytes] = []  # digests of the loaded chunks that are not their true KV
        self.keys: list[bytes] = prompt.keys
        self.arrival = arrival
        self.n = len(prompt.ids)
        self.max_tokens = max_tokens
        self.modeled_ms = 0.0
        self.io_ms = 0.0
        self.io_overrun_ms = 0.0
        self.rng: random.Random | None = None
        self.split: dict[str, int] | None = None  # waterfall: hit tokens per tier


@dataclass(frozen=True)
class Loaded:
    """Outcome of a request's real tier read: how many of its hit chunks were read back
    (their frames intact), the digests of those whose bytes are not their true KV, and
    when (``perf_counter``) the read was handed to the tier and ended."""

    chunks: int
    wrong: list[bytes]
    started: float
    done: float
