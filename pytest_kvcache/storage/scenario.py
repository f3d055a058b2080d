"""The schema of a storage scenario file (``phase: storage``, ``scenarios/storage.yaml``),
read into one :class:`~.replay.StorageConfig` per matrix point.

scenarios.py parses the inference phases; this module reads a storage file itself
(the plugin hands it over, storage_items.py). The keys are those of the other scenario
files where they mean the same (name, phase, description, matrix, trials, seed), plus
``capacities`` (per hierarchy, per tier), ``token_bytes``, ``trace`` (:class:`~.trace.TraceSpec`'s fields), ``promote``,
``trial_timeout_s``, ``think_time_s``, ``redis_url`` (for a ``redis`` tier), ``gds_path``
(a folder on a GDS mount, for a ``gds`` tier; ``--kv-gds-path`` gives it too) and
``threshold`` (the gate's, on storage throughput). Sizes
are bytes or strings such as ``64MiB``, ``1GB``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Any

from ..errors import ScenarioError
from .hierarchy import PROMOTE_POLICIES
from .replay import StorageConfig
from .tiers import TIER_KINDS, TierSpec
from .trace import TraceSpec

__all__ = ["load_storage_scenario", "parse_size", "parse_threshold", "storage_configs"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TOP_KEYS = {"name", "phase", "description", "matrix", "capacities", "token_bytes", "trace", "promote", "trials",
             "trial_timeout_s", "think_time_s", "seed", "redis_url", "gds_path", "scratch_dir", "threshold"}
_MATRIX_KEYS = ("tiers", "users")


#: users a storage item may replay with, and trials it may run (scenarios.py's bound)
_MAX_USERS = 1024
_MAX_TRIALS = 100


class _Reader:
    """Typed reads of one storage file's keys: a bad value is a ScenarioError naming the
    file, the key and the fix, as in every other scenario file (scenarios.py)."""

    def __init__(self, path: str | Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def fail(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(self.path, key, problem)

    def text(self, key: str, default: str | None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.fail(key, f"{value!r} is not a text; give a non-empty string")
        return value

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise self.fail(key, f"{value!r} is not a whole number {bound}")
        return value

    def seconds(self, key: str, default: float, positive: bool) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0 or (positive and value == 0):
            raise self.fail(key, f"{value!r} is not a number of seconds {'above' if positive else 'of at least'} 0")
        return float(value)

    def size(self, key: str, value: Any) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, f"{value!r} is not a mapping of keys")
        return value


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like ``128KiB`` (decimal kB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if isinstance(value, bool) or not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is no size; use bytes or e.g. 64MiB, 1GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_threshold(value: Any) -> float:
    """The gate's practical threshold on storage throughput: ``25%`` or ``0.25``."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        fraction = 0.0
    if isinstance(value, bool) or not 0 < fraction < 1:
        raise ValueError(f"{value!r} is no fraction; use e.g. 25% or 0.25")
    return fraction


def _matrix(read: _Reader) -> tuple[list[str], list[int]]:
    matrix = read.mapping("matrix")
    hierarchies, users = matrix.get("tiers"), matrix.get("users", [4])
    if set(matrix) - set(_MATRIX_KEYS) or not isinstance(hierarchies, list) or not hierarchies:
        raise read.fail("matrix", f"give tiers (a list such as [cpu, cpu+disk]) and optionally users; "
                                  f"only {', '.join(_MATRIX_KEYS)}")
    for hierarchy in hierarchies:
        kinds = str(hierarchy).split("+") if isinstance(hierarchy, str) else []
        if not kinds or any(kind not in TIER_KINDS for kind in kinds) or len(set(kinds)) != len(kinds):
            raise read.fail("matrix.tiers", f"{hierarchy!r} is no hierarchy; join distinct tiers of "
                                            f"{', '.join(TIER_KINDS)} with +, e.g. hbm+cpu+disk")
    if not isinstance(users, list) or not users or any(
            isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= _MAX_USERS for n in users):
        raise read.fail("matrix.users", f"{users!r}: give a list of user counts from 1 to {_MAX_USERS}")
    return hierarchies, users


def _tiers(read: _Reader, hierarchy: str, redis_url: str | None) -> tuple[TierSpec, ...]:
    sizes = read.mapping("capacities").get(hierarchy)
    kinds = hierarchy.split("+")
    key = f"capacities.{hierarchy}"
    if not isinstance(sizes, dict) or sorted(map(str, sizes)) != sorted(kinds):
        raise read.fail(key, f"give the size of each of its tiers ({', '.join(kinds)}), e.g. {kinds[0]}: 64MiB")
    if "redis" in kinds and redis_url is None:
        raise read.fail("redis_url", f"{hierarchy} has a redis tier: give the server's URL (redis://HOST:PORT)")
    specs = tuple(TierSpec(kind, read.size(f"{key}.{kind}", sizes[kind]),
                           url=redis_url if kind == "redis" else None) for kind in kinds)
    # RAM tiers are allocated whole before the first trial: a size past this machine's
    # memory would be an out-of-memory kill, not a measurement
    in_memory = sum(spec.capacity_bytes for spec in specs if spec.kind in ("hbm", "cpu"))
    limit = _memory_bytes() // 2
    if in_memory > limit:
        raise read.fail(key, f"its memory tiers hold {in_memory:,} bytes, more than half of this machine's "
                             f"memory ({limit * 2:,} bytes); lower their sizes")
    return specs


def _memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _trace(read: _Reader) -> TraceSpec:
    fields = {f.name: f for f in dataclasses.fields(TraceSpec)}
    raw = dict(read.mapping("trace"))
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise read.fail(f"trace.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(fields))}")
    for key, value in raw.items():
        default = fields[key].default
        if key in ("prompt_tokens", "output_tokens"):
            if not (isinstance(value, list) and len(value) == 2 and all(
                    isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value) and value[0] <= value[1]):
                raise read.fail(f"trace.{key}", f"{value!r}: give [lowest, highest] token counts, e.g. [64, 256]")
            raw[key] = tuple(value)
        elif isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)
                                           or value < (0 if key == "seed" else 1)):
            raise read.fail(f"trace.{key}", f"{value!r} is not a whole number of at least {0 if key == 'seed' else 1}")
        elif not isinstance(default, int) and value is not None and not isinstance(value, str):
            raise read.fail(f"trace.{key}", f"{value!r} is not a text")
    return TraceSpec(**raw)


def storage_configs(data: dict[str, Any], path: str | Path = "<storage scenario>") -> tuple[StorageConfig, ...]:
    """One config per point of the matrix (hierarchies x users), named like the other
    phases' items: ``storage[hbm+cpu-u8]``. A bad key raises ScenarioError naming ``path``."""
    read = _Reader(path, data)
    unknown = sorted(set(data) - _TOP_KEYS, key=str)
    if unknown:
        raise read.fail(str(unknown[0]), f"unknown key; allowed: {', '.join(sorted(_TOP_KEYS))}")
    hierarchies, users_axis = _matrix(read)
    promote = read.text("promote", "none")
    if promote not in PROMOTE_POLICIES:
        raise read.fail("promote", f"{promote!r}: use one of {', '.join(PROMOTE_POLICIES)}")
    if "threshold" in data:
        try:
            parse_threshold(data["threshold"])
        except ValueError as exc:
            raise read.fail("threshold", str(exc)) from None
    name, redis_url = read.text("name", "storage"), read.text("redis_url", None)
    read.text("description", None)
    common: dict[str, Any] = {
        "trace": _trace(read), "token_bytes": read.size("token_bytes", data.get("token_bytes", 131_072)),
        "trials": read.integer("trials", 3, 1, _MAX_TRIALS), "promote": promote,
        "trial_timeout_s": read.seconds("trial_timeout_s", 60, positive=True),
        "think_time_s": read.seconds("think_time_s", 0, positive=False), "seed": read.integer("seed", 0, 0),
        "scratch_dir": read.text("scratch_dir", None), "gds_path": read.text("gds_path", None)}
    return tuple(StorageConfig(f"{name}[{hierarchy}-u{users}]", _tiers(read, hierarchy, redis_url),
                               users=users, **common)
                 for hierarchy, users in itertools.product(hierarchies, users_axis))


def load_storage_scenario(path: str | Path) -> tuple[StorageConfig, ...]:
    """The configs of a storage file; a bad file raises ScenarioError naming it and the key."""
    from ..scenarios import read_scenario_data

    data = read_scenario_data(path)  # within the limits of every scenario file
    if not isinstance(data, dict):
        raise ScenarioError(path, "<file>", "a storage scenario is a mapping of keys")
    return storage_configs(data, path)
