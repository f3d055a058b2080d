"""Validation of a scenario's ``dataset_options`` and the length distributions of
vLLM's multi-turn benchmark config (``constant``, ``uniform``, ``lognormal``)."""

from __future__ import annotations

import math
import random as _random
from typing import Any

__all__ = ["OptionProblem", "check_distribution", "sample"]


class OptionProblem(ValueError):
    """A dataset option is malformed; ``key`` is its dotted name inside dataset_options."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


_FORMS = ("a positive integer, or {distribution: constant, value: N}, {distribution: uniform, min: A, max: B} "
          "or {distribution: lognormal, average: A, max: M}")


def _pos_int(value: Any, key: str, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        raise OptionProblem(key, f"{value!r} must be a {'non-negative' if zero_ok else 'positive'} integer")
    return value


def check_distribution(raw: Any, key: str, zero_ok: bool = False) -> dict:
    """Normalize an integer or a distribution mapping; raises OptionProblem."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return {"distribution": "constant", "value": _pos_int(raw, key, zero_ok)}
    if not isinstance(raw, dict) or "distribution" not in raw:
        raise OptionProblem(key, f"{raw!r} must be {_FORMS}")
    kind = raw["distribution"]
    allowed = {"constant": {"value"}, "uniform": {"min", "max"}, "lognormal": {"average", "max", "sigma"}}
    if kind not in allowed:
        raise OptionProblem(f"{key}.distribution", f"{kind!r} must be one of constant, uniform, lognormal")
    extra = set(raw) - allowed[kind] - {"distribution"}
    if extra:
        raise OptionProblem(f"{key}.{sorted(extra)[0]}", f"unknown for a {kind} distribution; "
                            f"allowed: {', '.join(sorted(allowed[kind]))}")
    if kind == "constant":
        return {"distribution": kind, "value": _pos_int(raw.get("value"), f"{key}.value", zero_ok)}
    if kind == "uniform":
        lo = _pos_int(raw.get("min"), f"{key}.min", zero_ok)
        hi = _pos_int(raw.get("max"), f"{key}.max", zero_ok)
        if hi < lo:
            raise OptionProblem(f"{key}.max", f"{hi} is below min {lo}")
        return {"distribution": kind, "min": lo, "max": hi}
    avg = _pos_int(raw.get("average"), f"{key}.average")
    out = {"distribution": kind, "average": avg, "max": _pos_int(raw.get("max", 4 * avg), f"{key}.max")}
    sigma = raw.get("sigma", 0.5)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < 5:
        raise OptionProblem(f"{key}.sigma", f"{sigma!r} must be a number in (0, 5)")
    out["sigma"] = float(sigma)
    return out


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
