"""Workloads: the prompts a scenario sends, built reproducibly from a seed.

``build_prompts`` is the single entry point; each dataset lives in its own module:
``random`` (exact lengths), ``sharegpt`` (real conversations), ``multiturn``
(conversations growing turn by turn over shared prefixes) and ``shared_prefix``
(long-document reuse at a configured hit ratio). ``check_dataset_options`` validates a
scenario's ``dataset_options`` for a dataset (raises :class:`OptionProblem`).
"""

from __future__ import annotations

from ._codec import LocalTokenizer, ServerTokenizer, TokenCodec
from ._options import OptionProblem
from ._prompt import Prompt
from .multiturn import build_multiturn_prompts
from .random import build_random_prompts
from .shared_prefix import build_shared_prefix_prompts
from .sharegpt import build_sharegpt_prompts

__all__ = ["DATASETS", "LocalTokenizer", "OptionProblem", "Prompt", "ServerTokenizer", "TokenCodec",
           "build_prompts", "build_random_prompts", "check_dataset_options"]

DATASETS: tuple[str, ...] = ("random", "sharegpt", "multiturn", "shared_prefix")


def check_dataset_options(dataset: str, options: dict) -> dict:
    """The options normalized; unknown keys and bad values raise OptionProblem."""
    from . import multiturn, shared_prefix, sharegpt

    allowed = {"random": {}, "sharegpt": sharegpt.OPTIONS, "multiturn": multiturn.OPTIONS,
               "shared_prefix": shared_prefix.OPTIONS}[dataset]
    if not isinstance(options, dict):
        raise OptionProblem("<mapping>", f"{options!r} must be a mapping of option -> value")
    for key in options:
        if key not in allowed:
            raise OptionProblem(str(key), f"unknown for dataset {dataset}; allowed: "
                                f"{', '.join(sorted(allowed)) or '(none)'}")
    if dataset == "multiturn":
        return {**options, **multiturn.check_options(options)}
    if dataset == "shared_prefix":
        return {**options, **shared_prefix.check_options(options)}
    if dataset == "sharegpt":
        out = dict(options)
        if "path" in out and not isinstance(out["path"], str):
            raise OptionProblem("path", f"{out['path']!r} must be the path of a ShareGPT JSON file")
        for key in ("min_len", "max_total_len", "output_len"):
            if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1):
                raise OptionProblem(key, f"{out[key]!r} must be a positive integer")
        return out
    return dict(options)


async def build_prompts(codec: TokenCodec, *, dataset: str, input_len: int, output_len: int,
                        num_prompts: int, seed: int, trial: int, options: dict | None = None) -> list[Prompt]:
    """The prompts of one trial of a scenario case."""
    options = dict(options or {})
    common = dict(input_len=input_len, output_len=output_len, num_prompts=num_prompts, seed=seed, trial=trial)
    if dataset == "random":
        return await build_random_prompts(codec, **common)
    if dataset == "sharegpt":
        return await build_sharegpt_prompts(codec, **common, options=options)
    if dataset == "multiturn":
        return await build_multiturn_prompts(codec, **common, options=options)
    if dataset == "shared_prefix":
        return await build_shared_prefix_prompts(codec, **common, options=options)
    raise ValueError(f"unknown dataset {dataset!r}")
