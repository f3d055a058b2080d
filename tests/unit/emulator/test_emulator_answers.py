"""The emulator's corruption knob in-process (issue 16, offload correctness): which chunks a
load reports altered, and the ``--corrupt-rate`` settings; tests/integration/emulator has
the answers of a running emulator."""

from __future__ import annotations

import pytest

from pytest_kvcache.emulator.__main__ import parse_settings
from pytest_kvcache.emulator.prefix_cache import PrefixCache
from pytest_kvcache.emulator.tiers import CpuTier, DiskTier


def test_load_reports_altered_chunks_from_the_tier_and_the_write_buffer(tmp_path):
    cache = PrefixCache(DiskTier(str(tmp_path), 10**9), chunk_size=4, corrupt_rate=1.0, seed=3)
    keys = cache.keys(list(range(12)))
    assert cache.store(keys) == 3 and cache.corrupted_chunks == 3
    n, wrong = cache.load(keys)
    assert n == 3 and len(wrong) == 3 and len(set(wrong)) == 3
    assert cache.load(keys, frozenset(keys)) == (3, wrong)  # the buffer holds what was written
    honest = PrefixCache(CpuTier(10**9), chunk_size=4, seed=3)
    assert honest.store(keys) == 3 and honest.corrupted_chunks == 0
    assert honest.load(keys) == (3, []) and honest.load(keys, frozenset(keys)) == (3, [])
    # the draw is per key and seed
    half = [PrefixCache(CpuTier(1), corrupt_rate=0.5, seed=s).corrupts(keys[0]) for s in range(32)]
    assert 0 < sum(half) < 32
    with pytest.raises(ValueError):
        PrefixCache(CpuTier(1), corrupt_rate=1.5)


@pytest.mark.parametrize("args", [
    ["--corrupt-rate", "-0.1"],
    ["--corrupt-rate", "2"],
    ["--corrupt-rate", "x"],
    ["--config-json", '{"corrupt_rate": 2}'],
    ["--config-json", '{"corrupt_rate": "x"}'],
])
def test_bad_corrupt_rate_is_an_argument_error(args):
    with pytest.raises(SystemExit) as ei:
        parse_settings(args)
    assert ei.value.code == 2


def test_corrupt_rate_settings():
    assert parse_settings(["--corrupt-rate", "0.25"])[0].corrupt_rate == 0.25
    assert parse_settings(["--config-json", '{"corrupt_rate": 1}'])[0].corrupt_rate == 1.0
    assert parse_settings([])[0].corrupt_rate == 0.0
