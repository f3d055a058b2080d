"""Multi-turn conversations in the shape of vLLM's multi-turn benchmark config.

``dataset_options`` (each length an integer or a distribution, see ``_options``)::

    num_turns: {distribution: uniform, min: 12, max: 18}
    common_prefix_num_tokens: 500                                 # shared by every conversation
    prefix_num_tokens: {distribution: lognormal, average: 4000, max: 20000}   # per conversation
    num_tokens: {distribution: uniform, min: 120, max: 160}       # each user turn
    output_num_tokens: {distribution: uniform, min: 80, max: 120} # each answer

Without ``output_num_tokens`` each answer has the case's ``output_len``; with it, the
scenario must not set ``output_len`` too (it would have no effect: scenarios.py refuses
it), and the case's ``output_len`` is the distribution's mean (:func:`answer_len`).

``num_prompts`` is the number of conversations. Everything is deterministic: turn k's
prompt is the conversation so far (common prefix + own prefix + earlier user turns and
synthetic assistant answers of the requested output lengths + user turn k), built
from seeded token ids, so the prompts of turn k+1 extend those of turn k token for
token and hit the cache they left. Prompts carry ``turn`` = k; the runner sends each
turn of every conversation as one sub-round.
"""

from __future__ import annotations

import random as _random

from ._codec import TokenCodec
from ._options import MAX_TURNS, check_distribution, dist_max, sample
from ._prompt import Prompt
from .random import SAMPLED_IDS

__all__ = ["OPTIONS", "answer_len", "build_multiturn_prompts", "check_options", "request_bounds"]

OPTIONS = {
    "num_turns": {"distribution": "constant", "value": 2},
    "common_prefix_num_tokens": {"distribution": "constant", "value": 0},
    "prefix_num_tokens": {"distribution": "constant", "value": 0},
    "num_tokens": None,  # default: the case's input_len
    "output_num_tokens": None,  # default: the case's output_len
}


def check_options(options: dict) -> dict:
    out = {}
    for key in ("common_prefix_num_tokens", "prefix_num_tokens"):
        if key in options:
            out[key] = check_distribution(options[key], key, zero_ok=True)
    if "num_turns" in options:
        out["num_turns"] = check_distribution(options["num_turns"], "num_turns", high=MAX_TURNS)
    for key in ("num_tokens", "output_num_tokens"):
        if key in options:
            out[key] = check_distribution(options[key], key)
    return out


def answer_len(options: dict) -> int | None:
    """The mean length of ``output_num_tokens`` (None without it): a multi-turn item's
    ``output_len`` when its answers are drawn from a distribution."""
    dist = check_options(options).get("output_num_tokens")
    if dist is None:
        return None
    if dist["distribution"] == "constant":
        return dist["value"]
    if dist["distribution"] == "uniform":
        return round((dist["min"] + dist["max"]) / 2)
    return dist["average"]  # lognormal


def request_bounds(input_len: int, output_len: int, num_prompts: int, options: dict) -> tuple[int, int, int]:
    """(requests of a round, the longest prompt, the longest request) at the options' maxima:
    the last turn's prompt holds the prefixes and every earlier user turn and answer."""
    opts = {**OPTIONS, **check_options(options)}
    turns = dist_max(opts["num_turns"])
    user = dist_max(opts["num_tokens"]) if opts["num_tokens"] else input_len
    answer = dist_max(opts["output_num_tokens"]) if opts["output_num_tokens"] else output_len
    prompt = (dist_max(opts["common_prefix_num_tokens"]) + dist_max(opts["prefix_num_tokens"]) + turns * user
              + (turns - 1) * answer)
    return num_prompts * turns, prompt, prompt + answer


def _ids(rng: _random.Random, n: int, high: int) -> list[int]:
    return [rng.randrange(SAMPLED_IDS.start, high) for _ in range(n)]


async def build_multiturn_prompts(codec: TokenCodec, *, input_len: int, output_len: int, num_prompts: int,
                                  seed: int, trial: int, options: dict) -> list[Prompt]:
    opts = {**OPTIONS, **check_options(options)}
    user_dist = opts["num_tokens"] or {"distribution": "constant", "value": input_len}
    answer_dist = opts["output_num_tokens"] or {"distribution": "constant", "value": output_len}
    high = min(SAMPLED_IDS.stop, codec.vocab_size or SAMPLED_IDS.stop)
    base = f"multiturn:{seed}:{input_len}:{trial}"
    shared = _random.Random(f"{base}:common")
    common = _ids(shared, sample(opts["common_prefix_num_tokens"], shared), high)
    prompts: list[Prompt] = []
    for conv in range(num_prompts):
        rng = _random.Random(f"{base}:{conv}")
        turns = sample(opts["num_turns"], rng)
        history = common + _ids(rng, sample(opts["prefix_num_tokens"], rng), high)
        for turn in range(turns):
            history = history + _ids(rng, sample(user_dist, rng), high)
            answer_len = sample(answer_dist, rng)
            text = await codec.decode(history)
            prompts.append(Prompt(text=text, input_len=len(await codec.encode(text)), output_len=answer_len,
                                  turn=turn))
            history = history + _ids(rng, answer_len, high)  # the synthetic assistant answer
    prompts.sort(key=lambda p: p.turn)  # stable: turn 0 of every conversation first
    return prompts
