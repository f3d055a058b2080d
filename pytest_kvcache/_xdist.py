"""pytest-xdist: what passes between the controller and its workers, and each worker's GPUs.

Registered by plugin.py only where pytest-xdist is active. The controller hands every
worker one results folder and one run id (:func:`pytest_configure_node`); a worker keeps
its own server log folder and, with --kv-gpus-per-worker, its own GPUs
(:func:`setup_worker`), and at its end sends its items' outcomes back
(:func:`finish_worker`, :func:`pytest_testnodedown`), so that the gate and the run files
are made once, by the controller.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from ._stash import ORDER_KEY, SESSION_KEY, kv_session

if TYPE_CHECKING:
    from .session import KVSession

__all__ = ["finish_worker", "setup_worker_gpus", "worker_gpus", "worker_id"]


def worker_id(config: pytest.Config) -> str | None:
    """``gwN`` in an xdist worker, None in the controller or a run without xdist."""
    workerinput = getattr(config, "workerinput", None)
    return workerinput.get("workerid") if workerinput else None


def worker_gpus(worker: str, per_worker: int, visible: list[str]) -> str:
    """The CUDA_VISIBLE_DEVICES of xdist worker ``gwN``: the N-th slice of ``per_worker`` GPUs."""
    index = int(worker.removeprefix("gw") or 0)
    wanted = visible[index * per_worker:(index + 1) * per_worker]
    if len(wanted) < per_worker:
        raise pytest.UsageError(
            f"--kv-gpus-per-worker / kvcache_gpus_per_worker = {per_worker}: worker {worker} needs GPUs "
            f"{index * per_worker}..{(index + 1) * per_worker - 1} but {len(visible)} are visible "
            f"({','.join(visible) or 'none'}); use fewer workers (-n) or fewer GPUs per worker")
    return ",".join(wanted)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    from .backends.probe import detect_gpus

    return [str(i) for i in range(len(detect_gpus()))]


def setup_worker_gpus(config: pytest.Config, per_worker: int | None) -> None:
    """An xdist worker with ``per_worker`` GPUs (--kv-gpus-per-worker): its own GPUs. (Its own
    server log folder comes with its session, _stash.kv_session.)"""
    worker = worker_id(config)
    if worker is not None and per_worker is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpus(worker, per_worker, _visible_gpus())


def finish_worker(config: pytest.Config, kv: KVSession) -> None:
    """A worker's outcomes, with their collection indices, for the controller."""
    import pickle

    order = config.stash.get(ORDER_KEY, {})
    config.workeroutput["kvcache_outcomes"] = pickle.dumps(  # type: ignore[attr-defined]
        [(order.get(o.nodeid, 0), o) for o in kv.outcomes], protocol=pickle.HIGHEST_PROTOCOL)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller -> worker: one results folder and one run id for the whole run."""
    kv = kv_session(node.config)  # the run id is the controller's session's
    node.workerinput["kvcache_results_dir"] = str(kv.settings.results_dir)
    node.workerinput["kvcache_session_id"] = kv.session_id


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist worker -> controller: its items' outcomes, so the gate and files come out once."""
    kv = node.config.stash.get(SESSION_KEY, None)
    data = getattr(node, "workeroutput", {}).get("kvcache_outcomes")
    if kv is None or not data:
        return
    import pickle

    received = pickle.loads(data)  # written by finish_worker of this same plugin, in a child process
    kv.outcomes.extend(outcome for _, outcome in received)
    order = node.config.stash.setdefault(ORDER_KEY, {})
    order.update({outcome.nodeid: index for index, outcome in received})
