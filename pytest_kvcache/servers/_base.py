from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..telemetry import TelemetrySource

__all__ = ["ServerHandle"]

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
    #: the report of a process of this server (or of its services) that died, else None
    _exited: Callable[[float], str | None] | None = field(default=None, repr=False)
    #: where the telemetry of this server and its backend's services is
    telemetry: TelemetrySource = field(default_factory=TelemetrySource)
    #: the ports of its backend's services by name (``{"redis": 6390}``), for hooks
    ports: Mapping[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        return self._alive() if self._alive else True

    def exit_report(self, grace: float = 0.0) -> str | None:
        """Which of its processes died, its exit status and log tail; None while all run
        (and for an external server, which is not ours to watch). ``grace``: seconds to
        wait for the server process to be gone."""
        return self._exited(grace) if self._exited else None

    def stop(self) -> None:
        if self._stop:
            self._stop()
            self._stop = None
