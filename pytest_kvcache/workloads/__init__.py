"""Workloads: the prompts a scenario sends, built reproducibly from a seed.

``build_prompts`` is the single entry point; each dataset lives in its own module:
``random`` (exact lengths), ``sharegpt`` (real conversations), ``multiturn``
(conversations growing turn by turn over shared prefixes) and ``shared_prefix``
(long-document reuse at a configured hit ratio). ``check_dataset_options`` validates a
scenario's ``dataset_options`` for a dataset (raises :class:`OptionProblem`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import WorkloadError
from ._codec import LocalTokenizer, ServerTokenizer, TokenCodec
from ._options import MAX_TOKENS, OptionProblem, show
from ._prompt import Prompt
from .multiturn import build_multiturn_prompts
from .random import build_random_prompts
from .shared_prefix import build_shared_prefix_prompts
from .sharegpt import build_sharegpt_prompts

__all__ = ["DATASETS", "LocalTokenizer", "OptionProblem", "Prompt", "ServerTokenizer", "TokenCodec",
           "build_prompts", "build_random_prompts", "check_dataset_options", "check_model_len", "request_bounds"]

DATASETS: tuple[str, ...] = ("random", "sharegpt", "multiturn", "shared_prefix")


def check_dataset_options(dataset: str, options: dict) -> dict:
    """The options normalized; unknown keys and bad values raise OptionProblem."""
    from . import multiturn, shared_prefix, sharegpt

    options_of: dict[str, Mapping[str, object]] = {
        "random": {}, "sharegpt": sharegpt.OPTIONS, "multiturn": multiturn.OPTIONS,
        "shared_prefix": shared_prefix.OPTIONS}
    allowed = options_of[dataset]
    if not isinstance(options, dict):
        raise OptionProblem("<mapping>", f"{show(options)} must be a mapping of option -> value")
    for key in options:
        if key not in allowed:
            raise OptionProblem(str(key)[:60], f"unknown for dataset {dataset}; allowed: "
                                f"{', '.join(sorted(allowed)) or '(none)'}")
    if dataset == "multiturn":
        return {**options, **multiturn.check_options(options)}
    if dataset == "shared_prefix":
        return {**options, **shared_prefix.check_options(options)}
    if dataset == "sharegpt":
        out = dict(options)
        if "path" in out and not isinstance(out["path"], str):
            raise OptionProblem("path", f"{show(out['path'])} must be the path of a ShareGPT JSON file")
        for key in ("min_len", "max_total_len", "output_len"):
            if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int)
                               or not 1 <= out[key] <= MAX_TOKENS):
                raise OptionProblem(key, f"{show(out[key])} must be a positive integer up to {MAX_TOKENS:,} (tokens)")
        return out
    return dict(options)


def request_bounds(dataset: str, *, input_len: int, output_len: int, num_prompts: int,
                   options: dict) -> tuple[int, int, int]:
    """(requests of one round, the longest prompt, the longest request: prompt + max_tokens),
    in tokens at the options' maxima: what the limits and the server's ``max_model_len``
    are checked against."""
    from . import multiturn, sharegpt

    if dataset == "multiturn":
        return multiturn.request_bounds(input_len, output_len, num_prompts, options)
    if dataset == "sharegpt":  # kept pairs: prompt <= input_len, prompt + answer <= max_total_len
        total = options.get("max_total_len", sharegpt.MAX_TOTAL_LEN)
        return num_prompts, min(input_len, total), min(total, input_len + (options.get("output_len") or total))
    return num_prompts, input_len, input_len + output_len


async def check_model_len(client, model: str, item: str, *, dataset: str, input_len: int, output_len: int,
                          num_prompts: int, options: dict, warmup: bool = False) -> None:
    """Before any prompt is built: raise WorkloadError when the item's longest request
    (prompt + output tokens) exceeds the ``max_model_len`` the server reports for
    ``model`` in ``GET /v1/models`` (vLLM, the emulator and the reference server do);
    nothing where it reports none. ``client``: httpx.AsyncClient with base_url."""
    limit = await _served_max_model_len(client, model)
    if limit is None:
        return
    _, _, longest = request_bounds(dataset, input_len=input_len, output_len=output_len, num_prompts=num_prompts,
                                   options=options)
    if warmup:  # warm-up requests are random prompts of the case's lengths
        longest = max(longest, input_len + output_len)
    if longest > limit:
        raise WorkloadError(f"{item}: requests of up to {longest:,} tokens (prompt + output) exceed the server's "
                            f"max_model_len of {limit:,} for model {model!r}; shorten input_len or output_len, "
                            "or serve the model with a larger --max-model-len")


async def _served_max_model_len(client, model: str) -> int | None:
    import httpx

    try:
        response = await client.get("/v1/models", timeout=30)
        listing = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None  # the run itself reports an unreachable server
    entries = listing.get("data") if isinstance(listing, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model:
            limit = entry.get("max_model_len")
            return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    return None


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
