"""pytest-xdist: each worker gets its own GPUs, and too few GPUs for the workers is a clear error."""

from __future__ import annotations

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("worker,per_worker,visible,expected", [
    ("gw0", 2, ["0", "1", "2", "3"], "0,1"),
    ("gw1", 2, ["0", "1", "2", "3"], "2,3"),
    ("gw2", 1, ["4", "5", "6"], "6"),
])
def test_each_worker_gets_its_own_gpus(worker, per_worker, visible, expected):
    from pytest_kvcache._xdist import worker_gpus

    assert worker_gpus(worker, per_worker, visible) == expected


def test_too_few_gpus_for_the_workers_is_a_clear_error():
    from pytest_kvcache._xdist import worker_gpus

    with pytest.raises(pytest.UsageError, match=r"worker gw2 needs GPUs 4\.\.5 but 4 are visible"):
        worker_gpus("gw2", 2, ["0", "1", "2", "3"])
