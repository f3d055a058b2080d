from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

__all__ = ["SERVER_KINDS", "ServerHandle", "ServerSettings"]

#: ``--kv-server`` choices.
SERVER_KINDS: tuple[str, ...] = ("emulator", "vllm", "external")


@dataclass(frozen=True)
class ServerSettings:
    """What the options say about servers (one per session)."""

    kind: str = "emulator"
    endpoint: str | None = None
    model: str | None = None
    emulator_profile: str = "quick"
    emulator_slowdown: float = 1.0
    ready_timeout: float = 60.0
    extra_args: tuple[str, ...] = ()


@dataclass
class ServerHandle:
    """A running (or external) server: where to send requests and what it is."""

    kind: str
    base_url: str
    model: str
    info: Mapping[str, str]
    log_path: Path | None = None
    _stop: Callable[[], None] | None = field(default=None, repr=False)
    _alive: Callable[[], bool] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self._alive() if self._alive else True

    def stop(self) -> None:
        if self._stop:
            self._stop()
            self._stop = None
