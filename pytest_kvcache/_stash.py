"""The keys of what pytest-kvcache keeps in ``config.stash``, shared by the plugin's modules
(plugin.py, collection.py, _xdist.py) so that none of them holds session state in a global,
and :func:`kv_session`, the one way to the session object."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .guide import SessionGuide
    from .models import Settings
    from .session import KVSession

__all__ = ["COLLECTED_KEY", "GUIDE_KEY", "ORDER_KEY", "PLANNED_KEY", "SCENARIO_ITEMS_KEY", "SESSION_KEY",
           "SETTINGS_KEY", "STARTED_KEY", "STEMS_KEY", "kv_session"]

#: the settings, read and checked at configure (a bad option is a usage error at once)
SETTINGS_KEY: pytest.StashKey[Settings] = pytest.StashKey()
#: when pytest configured the plugin: the run's start, whenever its session is set up
STARTED_KEY: pytest.StashKey[datetime] = pytest.StashKey()
#: the session, set up by kv_session on first use
SESSION_KEY: pytest.StashKey[KVSession] = pytest.StashKey()
GUIDE_KEY: pytest.StashKey[SessionGuide] = pytest.StashKey()
#: comparisons the session may make (for the gate's per-comparison alpha)
PLANNED_KEY = pytest.StashKey[int]()
#: (baseline key, metrics) of the gated items, for the runner's noise prior
COLLECTED_KEY = pytest.StashKey[tuple]()
#: node id -> collection index: outcomes back in collection order (xdist)
ORDER_KEY = pytest.StashKey[dict]()
#: node ids of the benchmark items selected, in collection order
SCENARIO_ITEMS_KEY = pytest.StashKey[tuple]()
#: file stem (casefolded) -> the first file of that stem collected
STEMS_KEY = pytest.StashKey[dict[str, Path]]()


def kv_session(config: pytest.Config) -> KVSession:
    """The run's session (settings, server pool, outcomes), set up on first use: by the first
    benchmark item or, under xdist, when the controller starts a worker. A pytest run that
    collects no benchmark never imports the engine (benchmarks/bench_import.py)."""
    kv = config.stash.get(SESSION_KEY, None)
    if kv is not None:
        return kv
    from .session import KVSession

    settings = config.stash[SETTINGS_KEY]
    workerinput = getattr(config, "workerinput", {})
    # Scratch space of the disk-backed tiers, made on first use and removed at the end;
    # beside the results rather than in /tmp, which is much slower to create files in
    # on some hosts (0.9 ms a file here against 30 us on the project's disk).
    workdir = settings.results_dir / f".scratch-{os.getpid()}"
    kv = KVSession(settings, workdir, planned_comparisons=lambda: config.stash.get(PLANNED_KEY, 1),
                   collected_keys=lambda: config.stash.get(COLLECTED_KEY, ()),
                   session_id=workerinput.get("kvcache_session_id"),  # an xdist worker: the controller's
                   started=config.stash[STARTED_KEY])
    if workerinput.get("workerid"):
        kv.pool.log_dir = kv.pool.log_dir / workerinput["workerid"]  # ports and scratch are per process
    kv.after_round = config.hook.pytest_kvcache_after_round
    config.stash[SESSION_KEY] = kv
    return kv
