"""Offload backends: what each one needs from the server it runs under.

``provision(name, server_kind, workdir, options, probe)`` returns a :class:`BackendConfig`:
the server's extra arguments and environment, LMCache's settings, the files to write
(LMCache's YAML) and the services to start first (``redis-server``, LMCache's server,
Mooncake's master and metadata server). It raises :class:`BackendUnavailable` (turned
into a skip with its reason) where the backend cannot run here.

A configuration is a *template*: ports are written ``{port:NAME}`` and the backend's
scratch folder ``{workdir}``; the server pool picks free ports and renders it when it
starts the server (:meth:`BackendConfig.render`). So two items with the same backend
have equal keys (one server serves both) and the fingerprint of a baseline does not
change with the ports of the day.

LMCache runs in one of two modes, chosen per item by :func:`choose_lmcache_mode`
(``--kv-lmcache-mode``, else the scenario's ``lmcache_mode``, else ini ``kvcache_lmcache_mode``,
else auto):

* ``inprocess``: vLLM's ``LMCacheConnectorV1`` with a generated ``LMCACHE_CONFIG_FILE``
  (GPU runners; on a CPU build it starts, logs "No supported cpu connector found" and
  silently recomputes: the hit check catches that);
* ``mp``: vLLM's ``LMCacheMPConnector`` talking to ``lmcache server`` (an L1 DRAM tier
  and optional L2 adapters: ``fs`` for disk, ``resp`` for Redis);
* ``auto`` (default): ``mp`` where there is no GPU and the installed LMCache has it,
  else ``inprocess``.

The configured mode is part of a configuration's key and fingerprint (two modes never
share a server or a baseline); the mode asked for and who chose it are recorded on each
result (:attr:`BackendConfig.recorded`). The emulator accepts and records the mode, which
changes nothing there; ``none``, ``native`` and external servers ignore it.

No pytest import here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._redis_url import parse_redis_url
from ..errors import KVCacheError
from ..models import BACKENDS, LMCACHE_MODES
from .probe import StackProbe

__all__ = [
    "CHUNK_SIZE",
    "LMCACHE_MODES",
    "BackendConfig",
    "BackendOptions",
    "BackendUnavailable",
    "Rendered",
    "ServiceSpec",
    "choose_lmcache_mode",
    "provision",
]

#: LMCache's chunk size, also the emulator's (prompts shorter than one chunk never hit).
CHUNK_SIZE = 256

#: Backends that run no LMCache, so no LMCache mode applies to them.
WITHOUT_LMCACHE: tuple[str, ...] = ("none", "native")

_PORT = re.compile(r"\{port:([a-z0-9_]+)\}")


class BackendUnavailable(KVCacheError):
    """This backend cannot run with this server on this machine; ``str()`` says why."""


def choose_lmcache_mode(command_line: str | None, scenario: str | None, ini: str | None) -> tuple[str, str]:
    """An item's LMCache mode and who chose it.

    The command line is the user's word on this runner, so it beats the scenario; the
    ini is the project's default, so the scenario beats it; nothing given: auto (probe).
    """
    for mode, chooser in ((command_line, "--kv-lmcache-mode"), (scenario, "scenario"),
                          (ini, "kvcache_lmcache_mode")):
        if mode is not None:
            return mode, chooser
    return "auto", "default"


@dataclass(frozen=True)
class BackendOptions:
    """What the options and the item's scenario say about backends."""

    lmcache_mode: str = "auto"
    #: who chose ``lmcache_mode`` (see :func:`choose_lmcache_mode`)
    lmcache_mode_from: str = "default"
    #: A Redis the user runs (``redis://host:port``); None: start ``redis-server``.
    redis_url: str | None = None
    gds_path: str | None = None
    #: LMCache settings overriding the defaults (``--kv-lmcache KEY=VALUE``), values as JSON.
    lmcache_overrides: tuple[tuple[str, str], ...] = ()
    #: vLLM native offloading buffer, GiB.
    native_size_gb: float = 4.0


@dataclass(frozen=True)
class ServiceSpec:
    """A process a backend needs before the server starts (templates: {port:X}, {workdir})."""

    name: str
    #: empty: nothing to start, only check that ``host:fixed_port`` is ready (a user's Redis)
    argv: tuple[str, ...]
    #: readiness: "redis" (PING on port), "tcp" (accepts on port), "http:/path" (200 on port)
    ready: str
    port: str
    env: tuple[tuple[str, str], ...] = ()
    host: str = "127.0.0.1"
    fixed_port: int | None = None


@dataclass(frozen=True)
class Rendered:
    """A configuration with real ports and paths, ready to start."""

    vllm_args: tuple[str, ...]
    env: dict[str, str]
    services: tuple[ServiceSpec, ...]
    files: dict[str, str]
    metrics_urls: tuple[str, ...]
    ports: dict[str, int]
    emulator_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendConfig:
    name: str
    workdir: str | None
    emulator_args: tuple[str, ...] = ()
    vllm_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    #: LMCache settings (in-process YAML keys, or the multi-process server's), values as JSON
    lmcache: tuple[tuple[str, str], ...] = ()
    #: "inprocess" | "mp" | "native" | "" (no connector)
    mode: str = ""
    services: tuple[ServiceSpec, ...] = ()
    #: files written under the workdir before the start: (relative name, template)
    files: tuple[tuple[str, str], ...] = ()
    metrics_urls: tuple[str, ...] = ()
    #: folders under the workdir to create before the start (the disk tier)
    dirs: tuple[str, ...] = ()
    #: facts recorded on each result but not part of the key or the fingerprint: the
    #: LMCache mode asked for and who chose it (the configured mode is in ``mode``)
    recorded: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple:
        """Equal keys may share one server."""
        return (self.name, self.emulator_args, self.vllm_args, self.env, self.lmcache, self.mode,
                self.services, self.files)

    @property
    def rehearsal(self) -> str | None:
        """What in this configuration fails on purpose (LMCache's fault_inject), else None."""
        fault = dict(self.lmcache).get("fault_inject")
        return f"LMCache setting fault_inject={fault} drops tier keys on purpose" if fault else None

    def fingerprint(self) -> dict[str, str]:
        """The configuration, with this session's scratch folder blanked out."""
        config: dict[str, object] = {"emulator_args": self.emulator_args, "vllm_args": self.vllm_args,
                                     "lmcache": dict(self.lmcache)}
        if self.mode:
            config["mode"] = self.mode
        if self.services:
            config["services"] = [[s.name, *s.argv[1:]] for s in self.services]
        text = json.dumps(config, sort_keys=True)
        if self.workdir:
            text = text.replace(self.workdir, "<workdir>")
        return {"backend": self.name, "backend_config": text}

    def port_names(self) -> list[str]:
        texts = [*self.vllm_args, *self.emulator_args, *(v for _, v in self.env), *(c for _, c in self.files),
                 *self.metrics_urls]
        for s in self.services:
            texts.extend(s.argv)
            texts.extend(v for _, v in s.env)
            texts.append(f"{{port:{s.port}}}" if s.port else "")
        names: list[str] = []
        for text in texts:
            for name in _PORT.findall(text):
                if name not in names:
                    names.append(name)
        return names

    def render(self, ports: Mapping[str, int]) -> Rendered:
        """Fill in ports and the workdir; create the folders and write the files."""
        workdir = self.workdir or ""

        def fill(text: str) -> str:
            text = _PORT.sub(lambda m: str(ports[m.group(1)]), text)
            return text.replace("{workdir}", workdir)

        if self.workdir:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
            for d in self.dirs:
                Path(fill(d)).mkdir(parents=True, exist_ok=True)
        files = {}
        for rel, content in self.files:
            path = Path(workdir) / rel
            path.write_text(fill(content), encoding="utf-8")
            files[str(path)] = fill(content)
        services = tuple(replace(s, argv=tuple(fill(a) for a in s.argv),
                                 env=tuple((k, fill(v)) for k, v in s.env)) for s in self.services)
        return Rendered(vllm_args=tuple(fill(a) for a in self.vllm_args),
                        env={k: fill(v) for k, v in self.env}, services=services, files=files,
                        metrics_urls=tuple(fill(u) for u in self.metrics_urls), ports=dict(ports),
                        emulator_args=tuple(fill(a) for a in self.emulator_args))

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def provision(name: str, server_kind: str, workdir: Path, options: BackendOptions | None = None,
              probe: StackProbe | None = None) -> BackendConfig:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    options = options or BackendOptions()
    if options.lmcache_mode not in LMCACHE_MODES:
        raise ValueError(f"unknown LMCache mode {options.lmcache_mode!r}; use one of {', '.join(LMCACHE_MODES)}")
    if server_kind == "external":
        # The endpoint is configured by whoever started it; the backend is a label.
        return BackendConfig(name=name, workdir=None)
    if server_kind == "emulator":
        if name not in WITHOUT_LMCACHE and any(key == "fault_inject" for key, _ in options.lmcache_overrides):
            raise BackendUnavailable("LMCache setting fault_inject wraps a real LMCache tier (--kv-server vllm); "
                                     "the emulator rehearses a failing tier with --kv-server-args "
                                     "'--offload-disabled' or '--corrupt-rate F'")
        config = _emulator(name, workdir, options)
    else:
        from .vllm import vllm_backend

        config = vllm_backend(name, Path(workdir), options, probe or StackProbe())
    if name in WITHOUT_LMCACHE:
        return config
    return replace(config, recorded=(("lmcache_mode", options.lmcache_mode),
                                     ("lmcache_mode_from", options.lmcache_mode_from)))


#: Tier sizes of the emulated host, in GB of the real model's KV cache: room for the
#: seed matrix's largest item (50 prompts of 100k tokens of Qwen2.5-7B, 287 GB), as on
#: the seeds' hosts; the emulator stores them scaled down (--payload-scale).
EMULATED_CPU_GB = "400"
EMULATED_DISK_GB = "1000"


def _emulator(name: str, workdir: Path, options: BackendOptions | None = None) -> BackendConfig:
    """The emulator's arguments for backend ``name``.

    ``redis`` reuses the vLLM path's Redis service: a ``redis-server`` the pool starts
    (template port ``{port:redis}``, scratch folder ``{workdir}``), or the user's Redis
    (``options.redis_url``), which the pool only checks.  The emulator gets its URL as
    ``--redis-url`` (a template until the pool renders ``emulator_args``).
    """
    options = options or BackendOptions()
    if name == "redis":
        from .vllm import _redis_service, _user_redis

        path = Path(workdir) / "redis-tier"
        if options.redis_url:
            parse_redis_url(options.redis_url)
            path.mkdir(parents=True, exist_ok=True)
            return BackendConfig(name=name, workdir=str(path), services=(_user_redis(options.redis_url),),
                                 emulator_args=("--backend", name, "--redis-url", options.redis_url,
                                                "--redis-size-gb", EMULATED_DISK_GB))
        if shutil.which("redis-server") is None:
            raise BackendUnavailable("backend 'redis' needs redis-server on PATH (or --kv-redis-url of a running "
                                     "Redis)")
        return BackendConfig(name=name, workdir=str(path), services=(_redis_service(),),
                             emulator_args=("--backend", name, "--redis-url", "redis://127.0.0.1:{port:redis}",
                                            "--redis-size-gb", EMULATED_DISK_GB))
    if name == "none":
        return BackendConfig(name=name, workdir=None, emulator_args=("--backend", name))
    if name == "cpu":
        return BackendConfig(name=name, workdir=None,
                             emulator_args=("--backend", name, "--cpu-size-gb", EMULATED_CPU_GB))
    if name == "waterfall":  # RAM over disk, as in the MLPerf storage benchmark (seed 002)
        path = workdir / "waterfall-tier"
        path.mkdir(parents=True, exist_ok=True)
        return BackendConfig(name=name, workdir=str(path), emulator_args=(
            "--backend", name, "--disk-path", str(path), "--cpu-size-gb", EMULATED_CPU_GB,
            "--disk-size-gb", EMULATED_DISK_GB))
    if name in ("disk", "gds"):
        path = workdir / f"{name}-tier"
        path.mkdir(parents=True, exist_ok=True)
        return BackendConfig(name=name, workdir=str(path), emulator_args=(
            "--backend", name, "--disk-path", str(path), "--disk-size-gb", EMULATED_DISK_GB))
    raise BackendUnavailable(f"backend '{name}' is not emulated yet; run it with --kv-server vllm on a runner "
                             "that has it")


