"""What the emulator answers: greedy words that follow the prompt and the KV it was served
from, in vLLM's JSON shapes, with the ``emulator_timing`` of the request (see the docstring
of :mod:`.app`)."""

from __future__ import annotations

import hashlib
import random
from itertools import pairwise

from .request import Request
from .tokenizer import WordTokenizer

__all__ = ["answer_words", "chunk_event", "role_event", "timing", "whole_body"]


def answer_rng(req: Request, seed: int) -> random.Random:
    """The generator of ``req``'s (greedy) answer: seeded by its prompt's digest and
    ``--seed``, and by the digests of any loaded chunks that were not their true KV
    (so wrong KV changes the answer, as it would a real model's)."""
    h = hashlib.blake2b(req.digest, digest_size=16)
    h.update(b"|%d|" % seed)
    for d in req.wrong:
        h.update(d)
    return random.Random(int.from_bytes(h.digest(), "little"))


def answer_words(tok: WordTokenizer, req: Request, seed: int) -> list[str]:
    """The text of each of ``req``'s tokens (a word after a space)."""
    rng = answer_rng(req, seed)
    lo, hi = tok.num_special, tok.vocab_size
    return [" " + tok.id_to_word(i) for i in (lo + int(rng.random() * (hi - lo)) for _ in range(req.max_tokens))]


def timing(req: Request, queue_ms: float, cached: int, stamps: list[float]) -> dict:
    """``emulator_timing``: what the request cost, on the model's clock and the host's."""
    t0 = req.arrival
    ttft = (stamps[0] - t0) * 1000.0 if stamps else None
    itl = [round((b - a) * 1000.0, 4) for a, b in pairwise(stamps)]
    return {"queue_ms": round(queue_ms, 4), "ttft_ms": None if ttft is None else round(ttft, 4),
            "itl_ms": itl, "cached_tokens": cached, "computed_tokens": req.n - cached,
            "modeled_ms": round(req.modeled_ms, 4), "tier_io_ms": round(req.io_ms, 4),
            "tier_io_overrun_ms": round(req.io_overrun_ms, 4),
            "arrival_perf_s": t0}


def whole_body(req: Request, chat: bool, created: int, model: str, text: str, timing_: dict) -> dict:
    """A non-streamed response's body."""
    n = req.n
    usage = {"prompt_tokens": n, "total_tokens": n + req.max_tokens,
             "completion_tokens": req.max_tokens, "prompt_tokens_details": None}
    choice: dict
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                  "logprobs": None, "finish_reason": "length", "stop_reason": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None,
                  "finish_reason": "length", "stop_reason": None,
                  "prompt_logprobs": None}
        obj = "text_completion"
    return {"id": req.rid, "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": usage, "emulator_timing": timing_}


def chunk_event(head: dict, chat: bool, word: str, last: bool, usage: dict | None) -> dict:
    """A streamed token's event (``usage``: continuous usage stats)."""
    finish = "length" if last else None
    if chat:
        choice = {"index": 0, "delta": {"content": word}, "logprobs": None,
                  "finish_reason": finish, "stop_reason": None}
    else:
        choice = {"index": 0, "text": word, "logprobs": None,
                  "finish_reason": finish, "stop_reason": None}
    chunk = dict(head, choices=[choice])
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def role_event(head: dict, n: int, continuous: bool) -> dict:
    """A chat stream's first event: the assistant's role."""
    role = dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}])
    if continuous:
        role["usage"] = {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}
    return role
