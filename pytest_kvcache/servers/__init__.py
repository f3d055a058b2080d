"""Servers behind one interface: the built-in emulator, a real vLLM, an existing endpoint.

:class:`ServerPool` keeps one server up at a time and reuses it while consecutive
items need the same configuration.
"""

from __future__ import annotations

from ._base import SERVER_KINDS, ServerHandle, ServerSettings
from ._pool import ServerPool

__all__ = ["SERVER_KINDS", "ServerHandle", "ServerPool", "ServerSettings"]
