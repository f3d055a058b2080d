"""Unit tests of pytest_kvcache.baselines (files, locking, fingerprints)."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pytest_kvcache.baselines import (
    SCHEMA_VERSION,
    Baseline,
    BaselineStore,
    fingerprint_diff,
    key_to_relpath,
)
from pytest_kvcache.errors import (
    BaselineCorruptError,
    BaselineError,
    FingerprintMismatchError,
    KVCacheError,
)

KEY = "seed-prefill/prefill[cpu-10k-c16]"
FP = {
    "gpu": "NVIDIA H100 80GB HBM3",
    "gpu_count": "1",
    "driver": "550.54.15",
    "vllm_version": "0.10.1",
    "lmcache_version": "0.3.3",
    "model": "Qwen/Qwen3-8B",
    "server_config": "a1b2c3",
    "workload": "d4e5f6",
}


def make_run(i: int) -> dict:
    return {
        "run_id": f"r{i}",
        "date": "2025-01-01T00:00:00Z",
        "trials": [{"median_ttft_ms": 100.0 + i, "p90_ttft_ms": 120.5}],
        "samples": {"ttfts": [0.1, 0.2]},
        "provenance": {"commit": "abc", "z_last": 1, "a_first": 2},  # order must be kept
    }


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines")


# ------------------------------------------------------------------ paths


def test_path_for_is_readable(store: BaselineStore) -> None:
    assert store.path_for(KEY) == store.root / "seed-prefill" / "prefill[cpu-10k-c16].json"
    assert store.path_for("a/b/c[x,y]") == store.root / "a" / "b" / "c[x,y].json"
    assert store.lock_path_for(KEY).name == ".prefill[cpu-10k-c16].json.lock"


def test_path_for_replaces_unsafe_characters() -> None:
    p = key_to_relpath('s p/a:b*c?"<>|\\d')
    assert p.parts[0] == "s_p"
    assert p.name.startswith("a_b_c______d~") and p.name.endswith(".json")
    # escaping .. and hidden names: nothing leaves the root
    q = key_to_relpath("../../etc/passwd")
    assert ".." not in q.parts and not q.is_absolute()
    assert all(not part.startswith(".") for part in q.parts)
    assert not key_to_relpath("/abs").is_absolute()
    # keys that differ only in replaced characters still get distinct files
    assert key_to_relpath("a b") != key_to_relpath("a_b")
    assert key_to_relpath("a b") != key_to_relpath("a:b")
    with pytest.raises(ValueError):
        key_to_relpath("")


# ------------------------------------------------------------------ round trip


def test_load_missing_is_none(store: BaselineStore) -> None:
    assert store.load(KEY) is None


def test_round_trip(store: BaselineStore) -> None:
    written = store.append(KEY, FP, make_run(0))
    assert isinstance(written, Baseline)
    loaded = store.load(KEY)
    assert loaded == written
    assert loaded.key == KEY
    assert loaded.fingerprint == FP
    assert loaded.history == (make_run(0),)
    assert loaded.schema_version == SCHEMA_VERSION == 1
    assert loaded.path == store.path_for(KEY)
    assert list(loaded.history[0]["provenance"]) == ["commit", "z_last", "a_first"]
    text = loaded.path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    doc = json.loads(text)
    assert list(doc) == ["schema_version", "key", "fingerprint", "history"]
    assert text == json.dumps(doc, indent=1) + "\n"  # pretty, indent=1, insertion order


def test_append_grows_history(store: BaselineStore) -> None:
    for i in range(3):
        b = store.append(KEY, FP, make_run(i))
    assert [r["run_id"] for r in b.history] == ["r0", "r1", "r2"]
    assert store.load(KEY).history == b.history
    assert b.latest == make_run(2)


def test_history_bound(store: BaselineStore) -> None:
    for i in range(7):
        store.append(KEY, FP, make_run(i), max_history=3)
    assert [r["run_id"] for r in store.load(KEY).history] == ["r4", "r5", "r6"]
    for i in range(25):
        b = store.append("other", FP, make_run(i))  # default bound 20
    assert len(b.history) == 20 and b.history[0]["run_id"] == "r5"
    with pytest.raises(ValueError):
        store.append(KEY, FP, make_run(0), max_history=0)


def test_reset(store: BaselineStore) -> None:
    store.append(KEY, FP, make_run(0))
    store.append(KEY, FP, make_run(1))
    new_fp = dict(FP, vllm_version="0.11.0")
    b = store.append(KEY, new_fp, make_run(2), reset=True)
    assert b.history == (make_run(2),)
    assert store.load(KEY).fingerprint == new_fp
    # reset with the same fingerprint also starts over
    b = store.append(KEY, new_fp, make_run(3), reset=True)
    assert [r["run_id"] for r in b.history] == ["r3"]


def test_bad_arguments(store: BaselineStore) -> None:
    with pytest.raises(TypeError):
        store.append(KEY, {"gpu_count": 1}, make_run(0))  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        store.append(KEY, FP, ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        store.append(KEY, FP, {"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        store.append(KEY, FP, {"x": float("nan")})
    assert not store.path_for(KEY).exists()


# ------------------------------------------------------------------ fingerprints


def test_fingerprint_diff() -> None:
    stored = {"vllm_version": "0.10.1", "gpu": "H100", "old_only": "x"}
    current = {"vllm_version": "0.11.0", "gpu": "H100", "new_only": "y"}
    assert fingerprint_diff(stored, current) == [
        "vllm_version: stored 0.10.1, now 0.11.0",
        "old_only: stored x, now (absent)",
        "new_only: stored (absent), now y",
    ]
    assert fingerprint_diff(FP, dict(FP)) == []


def test_fingerprint_mismatch(store: BaselineStore) -> None:
    store.append(KEY, FP, make_run(0))
    before = store.path_for(KEY).read_bytes()
    new_fp = dict(FP, vllm_version="0.11.0", gpu_count="2")
    with pytest.raises(FingerprintMismatchError) as info:
        store.append(KEY, new_fp, make_run(1))
    err = info.value
    assert isinstance(err, BaselineError) and isinstance(err, KVCacheError)
    assert err.differences == [
        "gpu_count: stored 1, now 2",
        "vllm_version: stored 0.10.1, now 0.11.0",
    ]
    msg = str(err)
    assert "vllm_version: stored 0.10.1, now 0.11.0" in msg
    assert "gpu_count: stored 1, now 2" in msg
    assert "--reset-baselines" in msg
    assert KEY in msg
    assert store.path_for(KEY).read_bytes() == before


# ------------------------------------------------------------------ corruption


def _assert_corrupt(store: BaselineStore, content: bytes, needle: str) -> None:
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(BaselineCorruptError) as info:
        store.load(KEY)
    msg = str(info.value)
    assert str(path) in msg
    assert needle in msg
    assert f"git checkout -- {path}" in msg and "--update-baselines" in msg
    for reset in (False, True):
        with pytest.raises(BaselineCorruptError):
            store.append(KEY, FP, make_run(9), reset=reset)
        assert path.read_bytes() == content  # byte-for-byte untouched


def test_truncated_file(store: BaselineStore) -> None:
    store.append(KEY, FP, make_run(0))
    full = store.path_for(KEY).read_bytes()
    _assert_corrupt(store, full[: len(full) // 2], "not valid JSON")


@pytest.mark.parametrize(
    "doc,needle",
    [
        ([], "expected an object"),
        ({"schema_version": 2, "key": KEY, "fingerprint": {}, "history": []}, "schema_version 2"),
        ({"schema_version": "1", "key": KEY, "fingerprint": {}, "history": []}, "schema_version"),
        ({"schema_version": 1, "key": KEY, "fingerprint": {}}, "missing field(s) 'history'"),
        ({"schema_version": 1, "key": KEY, "fingerprint": [], "history": []}, "'fingerprint'"),
        ({"schema_version": 1, "key": KEY, "fingerprint": {"a": 1}, "history": []}, "fingerprint['a']"),
        ({"schema_version": 1, "key": KEY, "fingerprint": {}, "history": {}}, "'history'"),
        ({"schema_version": 1, "key": KEY, "fingerprint": {}, "history": [1]}, "history[0]"),
        ({"schema_version": 1, "key": "other", "fingerprint": {}, "history": []}, "holds key 'other'"),
        ({"schema_version": 1, "key": KEY, "fingerprint": {}, "history": [], "x": 1}, "unexpected"),
    ],
)
def test_wrong_shapes(store: BaselineStore, doc: object, needle: str) -> None:
    _assert_corrupt(store, json.dumps(doc).encode(), needle)


def test_not_utf8(store: BaselineStore) -> None:
    _assert_corrupt(store, b"\xff\xfe{}", "UTF-8")


# ------------------------------------------------------------------ atomicity


def test_no_temp_files_left(store: BaselineStore) -> None:
    for i in range(5):
        store.append(KEY, FP, make_run(i))
    names = sorted(os.listdir(store.path_for(KEY).parent))
    assert names == [".prefill[cpu-10k-c16].json.lock", "prefill[cpu-10k-c16].json"]


def test_failed_write_leaves_old_file_and_no_temp(
    store: BaselineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append(KEY, FP, make_run(0))
    path = store.path_for(KEY)
    before = path.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.append(KEY, FP, make_run(1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not [n for n in os.listdir(path.parent) if n.endswith(".tmp")]


# ------------------------------------------------------------------ concurrency


def _worker(root: str, worker: int, n: int) -> None:
    s = BaselineStore(Path(root))
    for i in range(n):
        s.append(KEY, FP, {"worker": worker, "i": i}, max_history=1000)


def test_concurrent_appends_from_processes(store: BaselineStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(store.root), w, 5)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    path = store.path_for(KEY)
    json.loads(path.read_text(encoding="utf-8"))  # valid JSON
    b = store.load(KEY)
    assert len(b.history) == 40
    seen = sorted((r["worker"], r["i"]) for r in b.history)
    assert seen == [(w, i) for w in range(8) for i in range(5)]
    # each worker's runs appear in its own order
    for w in range(8):
        assert [r["i"] for r in b.history if r["worker"] == w] == list(range(5))
    assert not [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
