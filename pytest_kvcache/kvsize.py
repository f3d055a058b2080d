"""KV-cache size: bytes per token of a model, and requests to write a target size.

GQA/MHA models: layers x KV heads x head_dim x 2 (K and V) x dtype bytes.
MLA models (DeepSeek-V2/V3, ``kv_lora_rank`` in the config): layers x (kv_lora_rank +
qk_rope_head_dim) x dtype bytes, no x2 (one compressed latent per token).
Sizes in GB are decimal (10^9 bytes), as storage is sold; ``gib=True`` for 2^30.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .workloads._options import show

__all__ = ["DTYPE_BYTES", "MAX_CONFIG_BYTES", "MAX_CONFIG_COUNT", "kv_bytes_per_token", "kv_tokens_per_request",
           "load_model_config", "prompts_for_kv_target"]

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


#: bytes of a model config file read (Hugging Face config.json files are a few KB)
MAX_CONFIG_BYTES = 4 * 1024 * 1024
#: the largest layer, head or dimension count believed (real models stay far below)
MAX_CONFIG_COUNT = 1_000_000


def load_model_config(source: str | Path | Mapping[str, Any]) -> dict:
    """A config dict, a ``config.json`` file, or a model folder holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():  # a FIFO or a device would block or never end
            raise ValueError(f"model config {path}: no such file; give config.json or the model folder holding it")
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"model config {path}: cannot be read: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"model config {path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, the limit; "
                         "give the model's config.json")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands of levels deep
        raise ValueError(f"model config {path}: cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path}: must hold a JSON object (the model's config.json)")
    return data


def _get(cfg: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` set in the config or in its ``text_config`` (multimodal models)."""
    for scope in (cfg, cfg.get("text_config")):
        if isinstance(scope, Mapping):
            for name in names:
                if scope.get(name) is not None:
                    return _count(scope[name], name)
    raise ValueError(f"model config lacks {' / '.join(names)}")


def _count(value: Any, name: str, low: int = 1) -> int:
    """A layer, head or dimension count: a whole number from ``low`` to MAX_CONFIG_COUNT."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_CONFIG_COUNT:
        raise ValueError(f"model config: {name} = {show(value)} must be a whole number from {low} to "
                         f"{MAX_CONFIG_COUNT:,}")
    return value


def kv_bytes_per_token(config: str | Path | Mapping[str, Any], dtype: str | None = None) -> int:
    """KV-cache bytes one token occupies (all layers); ``dtype`` overrides the
    config's ``torch_dtype`` (e.g. an fp8 KV cache)."""
    cfg = load_model_config(config)
    dtype = str(dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {show(dtype)}; one of {', '.join(sorted(DTYPE_BYTES))}")
    size = DTYPE_BYTES[dtype]
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    if cfg.get("kv_lora_rank"):
        return layers * (_count(cfg["kv_lora_rank"], "kv_lora_rank")
                         + _count(cfg.get("qk_rope_head_dim") or 0, "qk_rope_head_dim", low=0)) * size
    heads = _get(cfg, "num_attention_heads", "n_head")
    kv_heads = _count(cfg["num_key_value_heads"], "num_key_value_heads") if cfg.get("num_key_value_heads") else heads
    if cfg.get("head_dim"):
        head_dim = _count(cfg["head_dim"], "head_dim")
    else:
        head_dim = _get(cfg, "hidden_size", "n_embd") // heads
        if head_dim < 1:
            raise ValueError(f"model config: hidden_size is smaller than num_attention_heads ({heads}); "
                             "set head_dim")
    return layers * kv_heads * head_dim * 2 * size


def kv_tokens_per_request(input_len: int, output_len: int = 1) -> int:
    """Tokens whose KV one request writes: its prompt, then every generated token but the
    last (a token's KV is computed when it is fed back for the next one; the last never
    is).  A prefill-only request (``output_len`` 1) writes exactly its prompt, as seed 003
    sized its runs: a fixed input length, prompts x input length x bytes per token."""
    if input_len <= 0 or output_len <= 0:
        raise ValueError("input and output lengths must be positive")
    return input_len + output_len - 1


def prompts_for_kv_target(target_gb: float, bytes_per_token: int, input_len: int, output_len: int = 1, *,
                          gib: bool = False) -> int:
    """The fewest requests of ``input_len`` prompt and ``output_len`` generated tokens
    whose KV (:func:`kv_tokens_per_request` each) reaches ``target_gb``."""
    if target_gb <= 0 or bytes_per_token <= 0:
        raise ValueError("target and bytes per token must be positive")
    target = target_gb * (2**30 if gib else 10**9)
    return max(1, math.ceil(target / (bytes_per_token * kv_tokens_per_request(input_len, output_len))))
