"""The schema of a storage scenario file (``phase: storage``, ``scenarios/storage.yaml``),
read into one :class:`~.replay.StorageConfig` per matrix point.

scenarios.py parses the inference phases; this module reads a storage file itself
(the plugin hands it over, storage_items.py). The keys are those of the other scenario
files where they mean the same (name, phase, description, matrix, trials, seed), plus
``capacities`` (per hierarchy, per tier), ``token_bytes``, ``trace`` (:class:`~.trace.TraceSpec`'s fields), ``promote``,
``trial_timeout_s``, ``think_time_s``, ``redis_url`` (for a ``redis`` tier) and
``threshold`` (the gate's, on storage throughput). Sizes
are bytes or strings such as ``64MiB``, ``1GB``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path
from typing import Any

from .replay import StorageConfig
from .tiers import TierSpec
from .trace import TraceSpec

__all__ = ["load_storage_scenario", "parse_size", "parse_threshold", "storage_configs"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TOP_KEYS = {"name", "phase", "description", "matrix", "capacities", "token_bytes", "trace", "promote", "trials",
             "trial_timeout_s", "think_time_s", "seed", "redis_url", "scratch_dir", "threshold"}
_MATRIX_KEYS = ("tiers", "users")


def parse_size(value: Any, key: str) -> int:
    """Bytes from an integer or a string like ``128KiB`` (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{key}: {value!r} is no size; use bytes or e.g. 64MiB, 1GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_threshold(value: Any) -> float:
    """The gate's practical threshold on storage throughput: ``25%`` or ``0.25``."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction < 1:
        raise ValueError(f"threshold: {value!r} is no fraction; use e.g. 25% or 0.25")
    return fraction


def _tiers(hierarchy: str, capacities: dict[str, Any], redis_url: str | None) -> tuple[TierSpec, ...]:
    sizes = capacities.get(hierarchy)
    kinds = hierarchy.split("+")
    if not isinstance(sizes, dict) or sorted(sizes) != sorted(kinds):
        raise ValueError(f"capacities.{hierarchy}: give the size of each of its tiers ({', '.join(kinds)})")
    return tuple(TierSpec(kind, parse_size(sizes[kind], f"capacities.{hierarchy}.{kind}"),
                          url=redis_url if kind == "redis" else None) for kind in kinds)


def _trace(raw: Any) -> TraceSpec:
    fields = {f.name for f in dataclasses.fields(TraceSpec)}
    raw = dict(raw or {})
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"trace.{unknown[0]}: unknown key; allowed: {', '.join(sorted(fields))}")
    for key in ("prompt_tokens", "output_tokens"):
        if key in raw:
            raw[key] = tuple(raw[key])
    return TraceSpec(**raw)


def storage_configs(data: dict[str, Any]) -> tuple[StorageConfig, ...]:
    """One config per point of the matrix (hierarchies x users), named like the other
    phases' items: ``storage[hbm+cpu-u8]``."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    matrix = data.get("matrix") or {}
    if set(matrix) - set(_MATRIX_KEYS) or "tiers" not in matrix:
        raise ValueError(f"matrix: give tiers (and users), only {', '.join(_MATRIX_KEYS)}")
    trace = _trace(data.get("trace"))
    common: dict[str, Any] = {
        "trace": trace, "token_bytes": parse_size(data.get("token_bytes", 131_072), "token_bytes"),
        "trials": int(data.get("trials", 3)), "promote": str(data.get("promote", "none")),
        "trial_timeout_s": float(data.get("trial_timeout_s", 60)),
        "think_time_s": float(data.get("think_time_s", 0)), "seed": int(data.get("seed", 0)),
        "scratch_dir": data.get("scratch_dir")}
    configs = []
    for hierarchy, users in itertools.product(matrix["tiers"], matrix.get("users", [4])):
        tiers = _tiers(str(hierarchy), data.get("capacities") or {}, data.get("redis_url"))
        configs.append(StorageConfig(f"{data.get('name', 'storage')}[{hierarchy}-u{users}]", tiers,
                                     users=int(users), **common))
    return tuple(configs)


def load_storage_scenario(path: str | Path) -> tuple[StorageConfig, ...]:
    import yaml

    with open(path, encoding="utf-8") as file:
        data = yaml.safe_load(file)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a storage scenario is a mapping of keys")
    try:
        return storage_configs(data)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
