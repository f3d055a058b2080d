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

__all__ = ["DTYPE_BYTES", "kv_bytes_per_token", "kv_tokens_per_request", "load_model_config",
           "prompts_for_kv_target"]

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "float8_e4m3fn": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


def load_model_config(source: str | Path | Mapping[str, Any]) -> dict:
    """A config dict, a ``config.json`` file, or a model folder holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"model config {path}: cannot be read as JSON: {exc}") from None


def _get(cfg: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        return _get(text, *names)
    raise ValueError(f"model config lacks {' / '.join(names)}")


def kv_bytes_per_token(config: str | Path | Mapping[str, Any], dtype: str | None = None) -> int:
    """KV-cache bytes one token occupies (all layers); ``dtype`` overrides the
    config's ``torch_dtype`` (e.g. an fp8 KV cache)."""
    cfg = load_model_config(config)
    dtype = str(dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(sorted(DTYPE_BYTES))}")
    size = DTYPE_BYTES[dtype]
    layers = int(_get(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    if cfg.get("kv_lora_rank"):
        return layers * (int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)) * size
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or int(_get(cfg, "hidden_size", "n_embd")) // heads
    return layers * kv_heads * int(head_dim) * 2 * size


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
