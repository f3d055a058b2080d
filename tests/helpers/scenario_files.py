"""A scenario file that must be refused: the input-limit tests' check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_kvcache.errors import ScenarioError
from pytest_kvcache.scenarios import load_scenario


def refused(tmp_path: Path, text: str | bytes, key: str, *words: str, seconds: float = 10.0) -> ScenarioError:
    """Load ``text`` as a scenario file: a ScenarioError naming the file, ``key`` and ``words``, in bounded time
    (a bomb takes minutes; 10 s holds on a busy shared runner)."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert time.perf_counter() - start < seconds
    message = str(info.value)
    assert info.value.key == key, message
    assert message.startswith(f"{path}: key '{key}': "), message
    for word in words:
        assert word in message, message
    assert "\n" not in message
    return info.value
