from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..telemetry import TelemetrySource

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
    #: the interpreter that runs vLLM and LMCache (None: this one)
    python: str | None = None
    #: labels the fixture cannot set (bandwidth, arcc, direction, storage mount), recorded on every result
    labels: tuple[tuple[str, str], ...] = ()
    #: LMCache mode (backends.choose_lmcache_mode): ``lmcache_mode_override`` (--kv-lmcache-mode)
    #: beats a scenario's lmcache_mode, which beats ``lmcache_mode`` (ini); None: not given
    lmcache_mode: str | None = None
    lmcache_mode_override: str | None = None
    #: backend settings (see backends.BackendOptions)
    redis_url: str | None = None
    gds_path: str | None = None
    lmcache_overrides: tuple[tuple[str, str], ...] = ()
    #: vllm serve's engine settings (None: vLLM's default)
    tensor_parallel_size: int | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None


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
