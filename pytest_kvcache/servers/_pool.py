from __future__ import annotations

import sys
from pathlib import Path

from ..backends import BackendConfig, provision
from ..errors import ServerError
from ._base import ServerHandle, ServerSettings
from ._process import ManagedProcess, free_port
from .external import connect_external
from .vllm import vllm_command

__all__ = ["ServerPool"]


class ServerPool:
    """One server at a time, reused while the backend configuration stays the same.

    Servers are started lazily by :meth:`acquire` and stopped when the next item
    needs another configuration, or by :meth:`close` at the end of the session.
    """

    def __init__(self, settings: ServerSettings, workdir: Path, log_dir: Path) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        self.log_dir = Path(log_dir)
        self._current: tuple[tuple, ServerHandle, BackendConfig] | None = None
        self._broken: dict[tuple, str] = {}
        self.started = 0

    def backend(self, name: str) -> BackendConfig:
        return provision(name, self.settings.kind, self.workdir / name)

    def acquire(self, backend: BackendConfig) -> ServerHandle:
        key = backend.key
        if key in self._broken:
            raise ServerError(self._broken[key])
        if self._current is not None:
            current_key, handle, _ = self._current
            if current_key == key and handle.alive():
                return handle
            self._release()
        try:
            handle = self._start(backend)
        except ServerError as exc:
            # Do not retry a configuration that failed: every item would wait for the timeout.
            self._broken[key] = str(exc)
            backend.cleanup()
            raise
        self._current = (key, handle, backend)
        return handle

    def _release(self) -> None:
        if self._current is not None:
            _, handle, backend = self._current
            self._current = None
            handle.stop()
            backend.cleanup()

    def close(self) -> None:
        self._release()

    def _start(self, backend: BackendConfig) -> ServerHandle:
        s = self.settings
        if s.kind == "external":
            return connect_external(s.endpoint, s.model)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = self.log_dir / f"{s.kind}-{backend.name}-{self.started}.log"
        env = None
        if s.kind == "emulator":
            model = s.model or "emulated-model"
            argv = [sys.executable, "-m", "pytest_kvcache.emulator", "--host", "127.0.0.1", "--port", str(port),
                    "--model", model, "--profile", s.emulator_profile, "--slowdown", repr(s.emulator_slowdown),
                    *backend.emulator_args, *s.extra_args]
            info = {"server": "emulator", "emulator_profile": s.emulator_profile, "gpu": "emulated"}
            name = f"emulator ({backend.name})"
        else:
            if not s.model:
                raise ServerError("--kv-server vllm needs --model (a model folder or name)")
            model = s.model
            argv, env, info = vllm_command(model, port, backend, s.extra_args)
            name = f"vllm serve ({backend.name})"
        process = ManagedProcess(name, argv, log_path=log_path, health_url=f"{base_url}/health", env=env,
                                 ready_timeout=s.ready_timeout)
        process.start()
        self.started += 1
        return ServerHandle(kind=s.kind, base_url=base_url, model=model, info=info, log_path=log_path,
                            _stop=process.stop, _alive=process.alive)
