from __future__ import annotations

import atexit
import sys
from pathlib import Path

from ..backends import (
    BackendConfig,
    BackendOptions,
    ServiceSpec,
    choose_lmcache_mode,
    provision,
)
from ..backends.probe import StackProbe, probe_stack
from ..emulator.profile_file import profile_label
from ..errors import ServerError
from ..telemetry import TelemetrySource
from ..models import ServerSettings
from ._base import ServerHandle
from ._process import ManagedProcess, free_port, http_ready, redis_ready, tcp_ready
from .external import connect_external
from .vllm import vllm_command

__all__ = ["ServerPool"]

#: Readiness timeout of the backend's services (redis-server, lmcache server, ...), s.
SERVICE_READY_TIMEOUT = 120.0
#: Niceness of vLLM and its services where they share the CPU cores with the load
#: generator (no GPU): the client's clock must not wait for a busy server's threads.
CPU_SERVER_NICE = 5


class ServerPool:
    """One server at a time, reused while the backend configuration stays the same.

    Servers are started lazily by :meth:`acquire` and stopped when the next item
    needs another configuration, or by :meth:`close` at the end of the session (and
    at interpreter exit, as a last resort). A backend's services are started before
    the server and stopped after it.
    """

    def __init__(self, settings: ServerSettings, workdir: Path, log_dir: Path) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        self.log_dir = Path(log_dir)
        self._current: tuple[tuple, ServerHandle, BackendConfig] | None = None
        self._broken: dict[tuple, str] = {}
        self._probe: StackProbe | None = None
        self._host: dict[str, str] | None = None
        self.started = 0
        atexit.register(self.close)

    @property
    def probe(self) -> StackProbe:
        """The installed vLLM/LMCache stack (probed once, only for --kv-server vllm)."""
        if self._probe is None:
            self._probe = probe_stack(self.settings.python or sys.executable)
        return self._probe

    def _nice(self) -> int:
        return CPU_SERVER_NICE if self.settings.kind == "vllm" and not self.probe.gpu else 0

    def backend_options(self, scenario_lmcache_mode: str | None = None) -> BackendOptions:
        s = self.settings
        mode, chooser = choose_lmcache_mode(s.lmcache_mode_override, scenario_lmcache_mode, s.lmcache_mode)
        return BackendOptions(lmcache_mode=mode, lmcache_mode_from=chooser, redis_url=s.redis_url,
                              gds_path=s.gds_path, lmcache_overrides=s.lmcache_overrides)

    def backend(self, name: str, scenario_lmcache_mode: str | None = None) -> BackendConfig:
        """The configuration of backend ``name`` for an item whose scenario asks for this LMCache mode."""
        probe = self.probe if self.settings.kind == "vllm" else None
        return provision(name, self.settings.kind, self.workdir / name, self.backend_options(scenario_lmcache_mode),
                         probe)

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

    def restart(self, backend: BackendConfig) -> ServerHandle:
        """A fresh server (and services) for ``backend``: a confirmation run must draw a new
        server's run effect. An external server cannot be restarted; it is reused."""
        if self.settings.kind != "external":
            self._release()
        return self.acquire(backend)

    def host_facts(self) -> dict[str, str]:
        """The hardware of the machine the server runs on, for the testbed: only for a vLLM
        started here (the emulator's times are modeled; an external server runs elsewhere)."""
        if self.settings.kind != "vllm":
            return {}
        if self._host is None:
            from ..identity import host_facts

            self._host = host_facts()
        return self._host

    def _release(self) -> None:
        if self._current is not None:
            _, handle, backend = self._current
            handle.stop()
            self._current = None  # after the stop: one cut short by an interrupt is retried by close()
            backend.cleanup()

    def close(self) -> None:
        self._release()

    # -- starting ------------------------------------------------------------------------------

    def _start_services(self, backend: BackendConfig, specs: tuple[ServiceSpec, ...],
                        ports: dict[str, int]) -> list[ManagedProcess]:
        started: list[ManagedProcess] = []
        try:
            for spec in specs:
                port = spec.fixed_port if spec.fixed_port is not None else ports.get(spec.port)
                if port is None:
                    raise ServerError(f"{spec.name} has no port: backend '{backend.name}' gives it neither a "
                                      "port name nor a fixed port")
                if spec.ready == "redis":
                    check = redis_ready(port, spec.host)
                elif spec.ready.startswith("http:"):
                    check = http_ready(f"http://{spec.host}:{port}{spec.ready[5:]}")
                else:
                    check = tcp_ready(port, spec.host)
                if not spec.argv:  # a service somebody else runs: only checked
                    if not check():
                        raise ServerError(f"{spec.name} does not answer ({spec.ready} on {spec.host}:{port}); "
                                          f"start it or fix the URL (backend '{backend.name}')")
                    continue
                slug = spec.name.replace(" ", "_").replace("/", "_")
                log_path = self.log_dir / f"{slug}-{backend.name}-{self.started}.log"
                env = None
                if spec.env:
                    import os

                    env = dict(os.environ, **dict(spec.env))
                process = ManagedProcess(f"{spec.name} (backend '{backend.name}')", spec.argv, log_path=log_path,
                                         env=env, ready=check, ready_timeout=SERVICE_READY_TIMEOUT,
                                         watch=list(started), nice=self._nice())
                process.start()
                started.append(process)
        except BaseException:
            for process in reversed(started):
                process.stop()
            raise
        return started

    def _start(self, backend: BackendConfig) -> ServerHandle:
        s = self.settings
        if s.kind == "external":
            handle = connect_external(s.endpoint, s.model)
            info = dict(handle.info)
            info.update({f"label.{k}": v for k, v in s.labels})
            handle.info = info
            handle.telemetry = TelemetrySource(metrics_urls=(f"{handle.base_url}/metrics",))
            return handle
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = self.log_dir / f"{s.kind}-{backend.name}-{self.started}.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = None
        services: list[ManagedProcess] = []
        extra_metrics: tuple[str, ...] = ()
        if s.kind == "emulator":
            model = s.model or "emulated-model"
            ports = {n: free_port() for n in backend.port_names()}
            rendered = backend.render(ports)
            services = self._start_services(backend, rendered.services, ports)  # e.g. the redis tier's server
            extra_metrics = rendered.metrics_urls
            argv = [sys.executable, "-m", "pytest_kvcache.emulator", "--host", "127.0.0.1", "--port", str(port),
                    "--model", model, "--profile", s.emulator_profile, "--slowdown", repr(s.emulator_slowdown),
                    *rendered.emulator_args, *s.extra_args]
            info = {"server": "emulator", "emulator_profile": profile_label(s.emulator_profile), "gpu": "emulated",
                    "server_args": " ".join(s.extra_args)}
            info.update({f"label.{k}": v for k, v in s.labels})
            name = f"emulator ({backend.name})"
        else:
            if not s.model:
                raise ServerError("--kv-server vllm needs --model (a model folder or name)")
            model = s.model
            ports = {n: free_port() for n in backend.port_names()}
            rendered = backend.render(ports)
            services = self._start_services(backend, rendered.services, ports)
            extra_metrics = rendered.metrics_urls
            try:
                argv, env, info = vllm_command(model, port, backend, rendered.vllm_args, rendered.env, s.extra_args,
                                               self.probe, labels=s.labels,
                                               tensor_parallel_size=s.tensor_parallel_size,
                                               max_model_len=s.max_model_len,
                                               gpu_memory_utilization=s.gpu_memory_utilization)
            except BaseException:
                for process in reversed(services):
                    process.stop()
                raise
            name = f"vLLM server (backend '{backend.name}')"
        process = ManagedProcess(name, argv, log_path=log_path, health_url=f"{base_url}/health", env=env,
                                 ready_timeout=s.ready_timeout, watch=services,
                                 nice=self._nice() if s.kind == "vllm" else 0)
        try:
            process.start()
        except BaseException:
            for p in reversed(services):
                p.stop()
            raise
        self.started += 1

        def stop() -> None:
            process.stop()
            for p in reversed(services):
                p.stop()

        def alive() -> bool:
            return process.alive() and all(p.alive() for p in services)

        def exited(grace: float) -> str | None:
            return process.exit_report(grace) or next(filter(None, (p.exit_report() for p in services)), None)

        telemetry = TelemetrySource(metrics_urls=(f"{base_url}/metrics", *extra_metrics),
                                    log_paths=(str(log_path), *(str(p.log_path) for p in services)))
        if services:
            info = dict(info, services=", ".join(p.name.split(" (")[0] for p in services))
        return ServerHandle(kind=s.kind, base_url=base_url, model=model, info=info, log_path=log_path,
                            _stop=stop, _alive=alive, _exited=exited, telemetry=telemetry, ports=dict(ports))
