"""KV access traces: the block reads and writes of multi-turn conversations.

A request is one turn of a conversation. Its prefill reads the blocks the earlier turns
left (the conversation's shared prefix) and writes the blocks of its new prompt
tokens; its decode reads the whole context ``decode_reads`` times (each read stands for
a pass over the cached KV while generating) and writes the answer's blocks. Blocks are
whole: a block holds ``block_tokens`` tokens of KV, a partial last block is written
whole, as a paged KV cache allocates it. Token counts of ShareGPT text are its length
in characters / 4 (no tokenizer needed to size storage traffic).

A trace file is JSON lines, one request a line::

    {"conversation": 0, "accesses": [["prefill_read", "c0:b0"], ["prefill_write", "c0:b1"]]}
"""

from __future__ import annotations

import json
import random as _random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["OPERATIONS", "KVRequest", "TraceSpec", "build_trace", "load_trace", "save_trace"]

#: the operations a request's block accesses belong to (per-operation latency)
OPERATIONS = ("prefill_read", "prefill_write", "decode_read", "decode_write")
_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class KVRequest:
    """One request: its conversation (replayed in order by one user) and its block
    accesses, each ``(operation, key)`` with an operation of OPERATIONS."""

    conversation: int
    accesses: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TraceSpec:
    """``source``: ``sharegpt`` (turn lengths from ShareGPT pairs, grouped ``turns`` to a
    conversation), ``synthetic`` (uniform lengths from ``prompt_tokens`` and
    ``output_tokens`` ranges) or a trace file's path."""

    source: str = "synthetic"
    conversations: int = 8
    turns: int = 3
    block_tokens: int = 16
    decode_reads: int = 4
    prompt_tokens: tuple[int, int] = (64, 256)
    output_tokens: tuple[int, int] = (32, 128)
    max_context_tokens: int = 4096
    sharegpt_path: str | None = None
    seed: int = 0


def _lengths(spec: TraceSpec) -> list[list[tuple[int, int]]]:
    """(prompt tokens, output tokens) of each turn of each conversation."""
    rng = _random.Random(spec.seed)
    if spec.source == "sharegpt":
        from ..workloads.sharegpt import load_conversations

        pairs = list(load_conversations(spec.sharegpt_path))
        rng.shuffle(pairs)
        need = spec.conversations * spec.turns
        if len(pairs) < need:
            raise ValueError(f"ShareGPT holds {len(pairs)} usable pairs; the trace needs {need}")
        sizes = [(max(1, len(q) // _CHARS_PER_TOKEN), max(1, len(a) // _CHARS_PER_TOKEN)) for q, a in pairs[:need]]
        return [sizes[c * spec.turns:(c + 1) * spec.turns] for c in range(spec.conversations)]
    return [[(rng.randint(*spec.prompt_tokens), rng.randint(*spec.output_tokens)) for _ in range(spec.turns)]
            for _ in range(spec.conversations)]


def build_trace(spec: TraceSpec) -> list[KVRequest]:
    """The requests of ``spec``, conversation by conversation, turn by turn."""
    if Path(spec.source).suffix in (".jsonl", ".json"):
        return load_trace(spec.source)
    if spec.source not in ("sharegpt", "synthetic"):
        raise ValueError(f"trace source {spec.source!r}: use sharegpt, synthetic or a .jsonl trace file")
    bt = spec.block_tokens
    requests = []
    for conv, turns in enumerate(_lengths(spec)):
        context = 0
        for prompt, output in turns:
            if context + prompt + output > spec.max_context_tokens:
                break  # the conversation outgrew the model's context
            cached = context // bt  # whole blocks the earlier turns left
            prompt_end = -(-(context + prompt) // bt)
            total_end = -(-(context + prompt + output) // bt)
            ops = [("prefill_read", f"c{conv}:b{b}") for b in range(cached)]
            ops += [("prefill_write", f"c{conv}:b{b}") for b in range(cached, prompt_end)]
            for _ in range(spec.decode_reads):
                ops += [("decode_read", f"c{conv}:b{b}") for b in range(prompt_end)]
            ops += [("decode_write", f"c{conv}:b{b}") for b in range(prompt_end, total_end)]
            requests.append(KVRequest(conv, tuple(ops)))
            context += prompt + output
    return requests


def save_trace(requests: list[KVRequest], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as file:
        for req in requests:
            file.write(json.dumps({"conversation": req.conversation, "accesses": [list(a) for a in req.accesses]}))
            file.write("\n")


def load_trace(path: str | Path) -> list[KVRequest]:
    requests = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                accesses = tuple((str(op), str(key)) for op, key in row["accesses"])
                conversation = int(row["conversation"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"trace {path}, line {number}: {exc!r}; want "
                                 '{"conversation": N, "accesses": [["prefill_write", KEY], ...]}') from None
            bad = [op for op, _ in accesses if op not in OPERATIONS]
            if bad:
                raise ValueError(f"trace {path}, line {number}: operation {bad[0]!r}: use one of {OPERATIONS}")
            requests.append(KVRequest(conversation, accesses))
    return requests
