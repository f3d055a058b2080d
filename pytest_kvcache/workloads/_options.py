"""Validation of a scenario's ``dataset_options`` and the length distributions of
vLLM's multi-turn benchmark config (``constant``, ``uniform``, ``lognormal``)."""

from __future__ import annotations

import math
import random as _random
from typing import Any

__all__ = ["MAX_PROMPTS", "MAX_TOKENS", "MAX_TURNS", "OptionProblem", "check_distribution", "dist_max", "sample",
           "show"]

#: tokens of one prompt or one answer (input_len, output_len, every token count of an option): 10m
MAX_TOKENS = 10_000_000
#: prompts (requests, conversations, shared documents) of one item
MAX_PROMPTS = 100_000
#: turns of one multi-turn conversation
MAX_TURNS = 1000


def show(value: Any, limit: int = 60) -> str:
    """``repr`` short enough for one line of an error message (a value may be a huge list)."""
    try:
        text = repr(value)
    except ValueError:  # an integer of more digits than Python turns into text
        return f"an integer of {value.bit_length():,} bits" if isinstance(value, int) else "a value"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class OptionProblem(ValueError):
    """A dataset option is malformed; ``key`` is its dotted name inside dataset_options."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


_FORMS = ("a positive integer, or {distribution: constant, value: N}, {distribution: uniform, min: A, max: B} "
          "or {distribution: lognormal, average: A, max: M}")


def _pos_int(value: Any, key: str, zero_ok: bool = False, high: int = MAX_TOKENS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise OptionProblem(key, f"{show(value)} must be a {'non-negative' if zero_ok else 'positive'} integer")
    if value > high:
        raise OptionProblem(key, f"{show(value)} is more than {high:,}, the limit")
    return value


def check_distribution(raw: Any, key: str, zero_ok: bool = False, high: int = MAX_TOKENS) -> dict:
    """Normalize an integer or a distribution mapping of values up to ``high``; raises OptionProblem."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return {"distribution": "constant", "value": _pos_int(raw, key, zero_ok, high)}
    if not isinstance(raw, dict) or "distribution" not in raw:
        raise OptionProblem(key, f"{show(raw)} must be {_FORMS}")
    kind = raw["distribution"]
    allowed = {"constant": {"value"}, "uniform": {"min", "max"}, "lognormal": {"average", "max", "sigma"}}
    if not isinstance(kind, str) or kind not in allowed:  # a list is no key of a dict
        raise OptionProblem(f"{key}.distribution", f"{show(kind)} must be one of constant, uniform, lognormal")
    extra = set(raw) - allowed[kind] - {"distribution"}
    if extra:
        raise OptionProblem(f"{key}.{sorted(extra)[0]}", f"unknown for a {kind} distribution; "
                            f"allowed: {', '.join(sorted(allowed[kind]))}")
    if kind == "constant":
        return {"distribution": kind, "value": _pos_int(raw.get("value"), f"{key}.value", zero_ok, high)}
    if kind == "uniform":
        lo = _pos_int(raw.get("min"), f"{key}.min", zero_ok, high)
        hi = _pos_int(raw.get("max"), f"{key}.max", zero_ok, high)
        if hi < lo:
            raise OptionProblem(f"{key}.max", f"{hi} is below min {lo}")
        return {"distribution": kind, "min": lo, "max": hi}
    avg = _pos_int(raw.get("average"), f"{key}.average", high=high)
    out = {"distribution": kind, "average": avg, "max": _pos_int(raw.get("max", min(4 * avg, high)), f"{key}.max",
                                                                  high=high)}
    sigma = raw.get("sigma", 0.5)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < 5:
        raise OptionProblem(f"{key}.sigma", f"{show(sigma)} must be a number in (0, 5)")
    out["sigma"] = float(sigma)
    return out


def dist_max(dist: dict) -> int:
    """The largest value a normalized distribution yields."""
    return dist["value"] if dist["distribution"] == "constant" else dist["max"]


def sample(dist: dict, rng: _random.Random) -> int:
    """One integer from a normalized distribution (lognormal: mean ``average``, clipped
    to [1, max])."""
    kind = dist["distribution"]
    if kind == "constant":
        return dist["value"]
    if kind == "uniform":
        return rng.randint(dist["min"], dist["max"])
    sigma = dist["sigma"]
    mu = math.log(dist["average"]) - sigma * sigma / 2
    return max(1, min(dist["max"], round(rng.lognormvariate(mu, sigma))))
