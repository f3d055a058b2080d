"""pytest_kvcache.baselines under writers in several processes at once."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pytest_kvcache.baselines import (
    BaselineRun,
    BaselineStore,
)

KEY = "seed-prefill/prefill[cpu-10k-c16]"
TESTBED = {"gpu": "1 x NVIDIA H100 80GB HBM3", "model": "Qwen/Qwen3-8B", "backend": "cpu", "workload_hash": "d4e5f6"}


@pytest.fixture
def store(tmp_path: Path) -> BaselineStore:
    return BaselineStore(tmp_path / "baselines")


# ------------------------------------------------------------------ concurrency


def _worker(root: str, worker: int, n: int) -> None:
    s = BaselineStore(Path(root))
    for i in range(n):
        s.write(KEY, TESTBED, BaselineRun(run_id=f"{worker}-{i}", created=""), max_runs=1000)


def test_concurrent_writes_from_processes(store: BaselineStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(store.root), w, 5)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 8
    path = store.path_for(KEY)
    json.loads(path.read_text(encoding="utf-8"))  # valid JSON
    ids = [r.run_id for r in store.load(KEY).runs]
    assert sorted(ids) == sorted(f"{w}-{i}" for w in range(8) for i in range(5))
    for w in range(8):  # each worker's runs appear in its own order
        assert [i for i in ids if i.startswith(f"{w}-")] == [f"{w}-{i}" for i in range(5)]
    assert not [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
