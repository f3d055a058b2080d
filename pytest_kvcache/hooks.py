"""pytest-kvcache's hooks, for a ``conftest.py`` or a plugin to implement.

Registered by the plugin (``pytest_addhooks``); see the README's "Hooks" section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .servers import ServerHandle

__all__ = ["pytest_kvcache_after_round"]


def pytest_kvcache_after_round(item: str, backend: str, trial: int, round_name: str, server: ServerHandle) -> None:
    """Called after each round of a benchmark item (a scenario item or a test using the
    kv_* fixtures), before the next one is sent; nothing in it is measured.

    What the seeds did by hand between a cold and a warm round goes here: drop the page
    cache, restart a tier, inject a fault into what the tier stored. ``item`` is the
    item's name (``prefill[cpu-10k-c16]``), ``trial`` the trial's index from 0,
    ``round_name`` the round just finished (``cold``, ``warm``, or ``control``: the
    answers check's recomputation), ``server`` the running server, with ``base_url``,
    ``info`` and ``ports`` (its services' ports by name, e.g. ``{"redis": 6390}``).
    An exception raised here fails the item with its message.
    """
