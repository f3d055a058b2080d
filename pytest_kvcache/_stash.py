"""The keys of what pytest-kvcache keeps in ``config.stash``, shared by the plugin's modules
(plugin.py, collection.py, _xdist.py) so that none of them holds session state in a global."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .guide import SessionGuide
    from .session import KVSession

__all__ = ["COLLECTED_KEY", "GUIDE_KEY", "ORDER_KEY", "PLANNED_KEY", "SCENARIO_ITEMS_KEY", "SESSION_KEY", "STEMS_KEY"]

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
