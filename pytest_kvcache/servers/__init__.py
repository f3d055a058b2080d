"""Servers behind one interface: the built-in emulator, a real vLLM, an existing endpoint.

:class:`ServerPool` keeps one server up at a time and reuses it while consecutive
items need the same configuration.
"""

from __future__ import annotations

from ..models import SERVER_KINDS, ServerSettings
from ._base import ServerHandle
from ._pool import ServerPool

__all__ = ["SERVER_KINDS", "ServerHandle", "ServerPool", "ServerSettings"]
