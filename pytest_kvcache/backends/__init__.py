"""Offload backends: what each one needs from the server it runs under.

``provision(name, server_kind, workdir)`` returns the arguments, environment and
LMCache settings for one backend, creating what it needs on disk; it raises
:class:`BackendUnavailable` (turned into a skip with its reason) where the backend
cannot run here.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..models import BACKENDS

__all__ = ["BackendConfig", "BackendUnavailable", "provision"]

#: LMCache's chunk size, also the emulator's (prompts shorter than one chunk never hit).
CHUNK_SIZE = 256


class BackendUnavailable(Exception):
    """This backend cannot run with this server on this machine; ``str()`` says why."""


@dataclass(frozen=True)
class BackendConfig:
    name: str
    workdir: str | None
    emulator_args: tuple[str, ...] = ()
    vllm_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    lmcache: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple:
        """Equal keys may share one server."""
        return (self.name, self.emulator_args, self.vllm_args, self.env, self.lmcache)

    def fingerprint(self) -> dict[str, str]:
        """The configuration, with this session's scratch folder blanked out."""
        config = {"emulator_args": self.emulator_args, "vllm_args": self.vllm_args, "lmcache": dict(self.lmcache)}
        text = json.dumps(config, sort_keys=True)
        if self.workdir:
            text = text.replace(self.workdir, "<workdir>")
        return {"backend": self.name, "backend_config": text}

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def provision(name: str, server_kind: str, workdir: Path) -> BackendConfig:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}")
    if server_kind == "external":
        # The endpoint is configured by whoever started it; the backend is a label.
        return BackendConfig(name=name, workdir=None)
    if server_kind == "emulator":
        return _emulator(name, workdir)
    return _vllm_lmcache(name, workdir)


#: Tier sizes of the emulated host, in GB of the real model's KV cache: room for the
#: seed matrix's largest item (50 prompts of 100k tokens of Qwen2.5-7B, 287 GB), as on
#: the seeds' hosts; the emulator stores them scaled down (--payload-scale).
EMULATED_CPU_GB = "400"
EMULATED_DISK_GB = "1000"


def _emulator(name: str, workdir: Path) -> BackendConfig:
    if name == "none":
        return BackendConfig(name=name, workdir=None, emulator_args=("--backend", name))
    if name == "cpu":
        return BackendConfig(name=name, workdir=None,
                             emulator_args=("--backend", name, "--cpu-size-gb", EMULATED_CPU_GB))
    if name in ("disk", "gds"):
        path = workdir / f"{name}-tier"
        path.mkdir(parents=True, exist_ok=True)
        return BackendConfig(name=name, workdir=str(path), emulator_args=(
            "--backend", name, "--disk-path", str(path), "--disk-size-gb", EMULATED_DISK_GB))
    raise BackendUnavailable(f"backend '{name}' is not emulated yet; run it with --kv-server vllm on a runner that has it")


def _vllm_lmcache(name: str, workdir: Path) -> BackendConfig:
    """In-process LMCache (LMCacheConnectorV1) configured through LMCACHE_* variables."""
    if name == "none":
        return BackendConfig(name=name, workdir=None)
    connector = ("--kv-transfer-config", json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}))
    if name == "cpu":
        settings = {"chunk_size": str(CHUNK_SIZE), "local_cpu": "True", "max_local_cpu_size": "5"}
        return BackendConfig(name=name, workdir=None, vllm_args=connector, lmcache=tuple(settings.items()),
                             env=_lmcache_env(settings))
    if name == "disk":
        path = workdir / "disk-tier"
        path.mkdir(parents=True, exist_ok=True)
        settings = {"chunk_size": str(CHUNK_SIZE), "local_cpu": "False", "max_local_cpu_size": "5",
                    "local_disk": f"file://{path}/", "max_local_disk_size": "50"}
        return BackendConfig(name=name, workdir=str(path), vllm_args=connector, lmcache=tuple(settings.items()),
                             env=_lmcache_env(settings))
    if name == "gds":
        if shutil.which("nvidia-smi") is None:
            raise BackendUnavailable("backend 'gds' needs an NVIDIA GPU with cuFile and a GDS mount; none here")
    raise BackendUnavailable(f"backend '{name}' is not wired for --kv-server vllm yet")


def _lmcache_env(settings: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((f"LMCACHE_{k.upper()}", v) for k, v in settings.items())
