"""``python -m pytest_kvcache doctor``: what this machine can run, and why not.

Before a long run on a hardware runner, one command probes the machine and prints, for
every backend marker, ``runnable`` or ``not runnable: <reason>; fix: <what to do>``,
after a short block of facts: GPUs (``nvidia-smi``, through :func:`identity.host_facts`),
the vLLM and LMCache installs of the interpreter that will run vLLM (``--kv-python``,
probed in a subprocess, as :mod:`backends.probe` does: nothing here imports vLLM, torch
or LMCache), a GDS mount (cuFile, ``gdscheck``, the file system, an O_DIRECT write and
read), Redis, Mooncake, free disk and RAM against the scenarios' ``kv_target_gb``, and a
model's KV bytes per token.

Each probe is a small function returning a frozen dataclass; :func:`verdicts` derives
the backend lines from them alone, so tests feed it made-up findings. System commands
go through ``subprocess.run`` and ``shutil.which`` (looked up at call time, so tests
patch them), and the interpreter probe through :func:`_run_python`.

This module does not import pytest.
"""

from __future__ import annotations

import ctypes.util
import errno
import json
import mmap
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backends.probe import PROBE_HELPERS

__all__ = ["SCHEMA_VERSION", "Report", "Verdict", "add_arguments", "diagnose", "main_doctor", "verdicts"]

SCHEMA_VERSION = 1

#: How to get the real stack, for every line that needs vLLM.
GET_VLLM = ("run scripts/setup-real-stack.sh (builds vLLM's CPU build and LMCache) or `pip install vllm lmcache` "
            "on a GPU machine, then pass --kv-python PATH/TO/venv/bin/python")
#: Bytes of the O_DIRECT probe file.
ODIRECT_PROBE_BYTES = 4 * 2**20
CUFILE_PATHS = ("/usr/local/cuda/lib64/libcufile.so", "/usr/local/cuda/lib64/libcufile.so.0",
                "/usr/lib/x86_64-linux-gnu/libcufile.so.0", "/usr/lib/x86_64-linux-gnu/libcufile.so")


# -- GPUs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFacts:
    count: int = 0
    model: str | None = None
    memory_mib: tuple[int, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    #: why no GPU is usable (None: at least one is)
    error: str | None = None


def gpu_memory_mib() -> tuple[int, ...]:
    """Each GPU's memory: host_facts reads name and driver only, so this asks nvidia-smi for memory.total."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return ()
    values = []
    for line in out.stdout.splitlines() if out.returncode == 0 else ():
        try:
            values.append(int(float(line.strip())))
        except ValueError:
            pass
    return tuple(values)


def probe_gpus() -> tuple[GpuFacts, dict[str, str]]:
    """The GPUs, and the host's facts (CPU, cores, memory) from :func:`identity.host_facts`."""
    from .identity import host_facts

    facts = host_facts()
    if shutil.which("nvidia-smi") is None:
        return GpuFacts(error="nvidia-smi not found"), facts
    gpu = facts.get("gpu")
    if not gpu:
        return GpuFacts(error="nvidia-smi failed or listed no GPU", driver_version=facts.get("driver_version")), facts
    count_text, _, model = gpu.partition(" x ")
    count = int(count_text) if count_text.isdigit() else 0
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    return GpuFacts(count=count, model=model or None, memory_mib=gpu_memory_mib(),
                    driver_version=facts.get("driver_version"), cuda_version=facts.get("cuda_version"),
                    error="CUDA_VISIBLE_DEVICES hides every GPU" if hidden else None), facts


# -- vLLM, LMCache, Mooncake ------------------------------------------------------------------------

_STACK_SCRIPT = PROBE_HELPERS + r"""vdir, ldir = location("vllm"), location("lmcache")
out = {"python_version": sys.version.split()[0], "vllm_importable": vdir is not None,
       "lmcache_importable": ldir is not None, "vllm_cpu_build": None,
       "inprocess_connector": False, "mp_connector": False}
if vdir:
    v = version("vllm", "vllm-cpu") or ""
    t = version("torch") or ""
    out["vllm_cpu_build"] = bool(version("vllm-cpu")) or "+cpu" in v or "cpu" in t.partition("+")[2]
    conn = os.path.join(vdir, "distributed", "kv_transfer", "kv_connector", "v1")
    out["mp_connector"] = os.path.isfile(os.path.join(conn, "lmcache_mp_connector.py"))
if ldir and vdir:
    out["inprocess_connector"] = (os.path.isfile(os.path.join(conn, "lmcache_connector.py"))
                                  and os.path.isfile(os.path.join(ldir, "integration", "vllm", "vllm_v1_adapter.py")))
print(json.dumps(out))
"""


@dataclass(frozen=True)
class StackFacts:
    python: str
    #: why the interpreter could not be probed (None: it was)
    error: str | None = None
    python_version: str | None = None
    vllm_version: str | None = None
    vllm_dist: str | None = None
    vllm_cpu_build: bool | None = None
    lmcache_version: str | None = None
    torch_version: str | None = None
    lmcache_mp: bool = False
    l2_adapters: tuple[str, ...] = ()
    #: LMCache's compiled extensions (lmcache_mooncake only where LMCache was built against Mooncake)
    lmcache_extensions: tuple[str, ...] = ()
    inprocess_connector: bool = False
    mp_connector: bool = False
    mooncake_version: str | None = None
    tools: tuple[tuple[str, str], ...] = ()

    def tool(self, name: str) -> str | None:
        return dict(self.tools).get(name)


def _run_python(python: str, script: str) -> dict | str:
    """The JSON a script prints under ``python``, or why there is none."""
    try:
        out = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{python} cannot be run: {exc}"
    if out.returncode != 0:
        return f"{python} failed (exit {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1][:200]}"
    try:
        data = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return f"{python} printed no JSON"
    return data if isinstance(data, dict) else f"{python} printed no JSON object"


def _stack_probe(python: str):
    """:func:`backends.probe.probe_stack`, uncached (versions, LMCache MP server, tools beside python)."""
    from .backends.probe import probe_stack

    return probe_stack.__wrapped__(python)


def probe_python(python: str | None = None) -> StackFacts:
    python = python or sys.executable
    data = _run_python(python, _STACK_SCRIPT)
    if isinstance(data, str):
        return StackFacts(python=python, error=data)
    base = _stack_probe(python)
    return StackFacts(
        python=python, python_version=data.get("python_version"),
        vllm_version=base.vllm_version if data.get("vllm_importable") else None,
        vllm_dist=base.vllm_dist if data.get("vllm_importable") else None,
        vllm_cpu_build=data.get("vllm_cpu_build"),
        lmcache_version=base.lmcache_version if data.get("lmcache_importable") else None,
        torch_version=base.torch_version, lmcache_mp=base.lmcache_mp,
        l2_adapters=tuple(sorted(base.lmcache_l2_adapters)), lmcache_extensions=tuple(sorted(base.lmcache_extensions)),
        inprocess_connector=bool(data.get("inprocess_connector")), mp_connector=bool(data.get("mp_connector")),
        mooncake_version=base.mooncake_version, tools=tuple(base.tools))


# -- GDS --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GdsFacts:
    path: str | None = None
    cufile: str | None = None
    gdscheck: str | None = None
    fstype: str | None = None
    #: True: a write and read with O_DIRECT matched; False: refused or failed; None: not tried
    odirect: bool | None = None
    #: why the path or the probe failed (None: fine, or no path given)
    error: str | None = None


def find_cufile() -> str | None:
    found = ctypes.util.find_library("cufile")
    if found:
        return found
    return next((p for p in CUFILE_PATHS if Path(p).exists()), None)


def mount_fstype(path: str | Path, mounts: str | None = None) -> str | None:
    """The file system type of the mount holding ``path``, from /proc/mounts."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    real = os.path.realpath(path)
    best, fstype = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, parts[2]
    return fstype


def odirect_probe(folder: str | Path, size: int = ODIRECT_PROBE_BYTES) -> str | None:
    """Write and read back ``size`` bytes with O_DIRECT in ``folder``; None when it worked, else why not."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return "O_DIRECT does not exist on this platform"
    path = os.path.join(folder, f".kvcache-doctor-{os.getpid()}")
    buf, back = mmap.mmap(-1, size), mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    try:
        buf.write(os.urandom(4096) * (size // 4096))
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | flag, 0o600)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return "O_DIRECT refused on this file system (EINVAL)"
            return f"cannot create a file there: {exc.strerror or exc}"
        try:
            written = os.write(fd, buf)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY | flag)
        try:
            read = os.readv(fd, [back])
        finally:
            os.close(fd)
        if written != size or read != size or back[:] != buf[:]:
            return f"O_DIRECT read back {read} of {size} bytes, or other bytes"
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return "O_DIRECT refused on this file system (EINVAL)"
        return f"O_DIRECT write/read failed: {exc.strerror or exc}"
    finally:
        buf.close()
        back.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def probe_gds(path: str | None) -> GdsFacts:
    cufile, gdscheck = find_cufile(), shutil.which("gdscheck")
    if not path:
        return GdsFacts(cufile=cufile, gdscheck=gdscheck)
    p = Path(path)
    if not p.exists():
        return GdsFacts(path=path, cufile=cufile, gdscheck=gdscheck, error=f"{path} does not exist")
    if not p.is_dir():
        return GdsFacts(path=path, cufile=cufile, gdscheck=gdscheck, error=f"{path} is not a folder")
    fstype = mount_fstype(p)
    why = odirect_probe(p)
    return GdsFacts(path=path, cufile=cufile, gdscheck=gdscheck, fstype=fstype, odirect=why is None,
                    error=None if why is None else f"{why} ({fstype or 'unknown file system'})")


# -- Redis ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisFacts:
    url: str | None = None
    #: True: PING answered PONG; None: no URL given
    reachable: bool | None = None
    error: str | None = None
    server: str | None = None  # redis-server's path


def ping_redis(url: str, timeout: float = 3.0) -> str | None:
    """None when Redis at ``url`` answers PING with PONG, else why not."""
    from ._redis_url import parse_redis_url

    try:
        host, port, _, _ = parse_redis_url(url)
    except ValueError as exc:
        return str(exc)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
    except OSError as exc:
        return f"cannot reach {host}:{port}: {exc.strerror or exc}"
    if reply.startswith(b"+PONG"):
        return None
    return f"{host}:{port} answered {reply[:40].decode('latin-1').strip()!r} to PING, not PONG"


def probe_redis(url: str | None) -> RedisFacts:
    server = shutil.which("redis-server")
    if not url:
        return RedisFacts(server=server)
    why = ping_redis(url)
    return RedisFacts(url=url, reachable=why is None, error=why, server=server)


# -- disk, RAM, model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceFacts:
    results_dir: str
    disk_free_gb: float | None = None
    ram_total_gb: float | None = None
    ram_available_gb: float | None = None
    #: the largest kv_target_gb of the scenarios (None: none set one)
    kv_target_gb: float | None = None
    scenarios_dir: str | None = None


def meminfo(text: str | None = None) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    if text is None:
        try:
            text = Path("/proc/meminfo").read_text(encoding="utf-8")
        except OSError:
            return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            out[m[1]] = int(m[2]) * 1024
    return out


def scenario_kv_targets(folder: str | Path) -> list[float]:
    """Every ``kv_target_gb`` value written in the scenarios' YAML files (scalars and lists)."""
    values: list[float] = []
    for path in sorted(Path(folder).glob("*.y*ml")):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for m in re.finditer(r"^\s*kv_target_gb\s*:\s*(.+?)\s*(?:#.*)?$", text, re.MULTILINE):
            values += [float(v) for v in re.findall(r"\d+(?:\.\d+)?", m[1])]
    return values


def probe_resources(results_dir: str | Path, scenarios_dir: str | Path | None = None) -> ResourceFacts:
    results = Path(results_dir)
    where = next((p for p in (results, *results.absolute().parents) if p.exists()), Path("/"))
    try:
        free = round(shutil.disk_usage(where).free / 1e9, 1)
    except OSError:
        free = None
    mem = meminfo()
    scen = Path(scenarios_dir) if scenarios_dir else Path.cwd() / "scenarios"
    targets = scenario_kv_targets(scen) if scen.is_dir() else []
    return ResourceFacts(results_dir=str(results), disk_free_gb=free,
                         ram_total_gb=round(mem["MemTotal"] / 1e9, 1) if "MemTotal" in mem else None,
                         ram_available_gb=round(mem["MemAvailable"] / 1e9, 1) if "MemAvailable" in mem else None,
                         kv_target_gb=max(targets) if targets else None,
                         scenarios_dir=str(scen) if scen.is_dir() else None)


@dataclass(frozen=True)
class ModelFacts:
    path: str
    kv_bytes_per_token: int | None = None
    error: str | None = None


def probe_model(path: str) -> ModelFacts:
    from .kvsize import kv_bytes_per_token

    try:
        return ModelFacts(path=path, kv_bytes_per_token=kv_bytes_per_token(path))
    except ValueError as exc:
        return ModelFacts(path=path, error=str(exc))


# -- verdicts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    runnable: bool
    reason: str | None = None
    fix: str | None = None
    #: how it runs (text output only): "emulator; vLLM 0.32.0 (CPU build) with LMCache MP mode"
    how: str = field(default="", compare=False)

    def line(self, name: str) -> str:
        if self.runnable:
            return f"{name}: runnable" + (f" ({self.how})" if self.how else "")
        return f"{name}: not runnable: {self.reason}; fix: {self.fix}"


@dataclass(frozen=True)
class Report:
    gpu: GpuFacts
    host: dict
    stack: StackFacts
    gds: GdsFacts
    redis: RedisFacts
    resources: ResourceFacts
    model: ModelFacts | None = None


def _no_gpu(gpu: GpuFacts) -> str:
    return f"no GPU ({gpu.error})"


@dataclass(frozen=True)
class _Findings:
    """What every backend's verdict reads: the report and the stack's summary lines."""

    r: Report
    gpu_ok: bool
    vllm: bool
    build: str
    #: the real stack this machine can run, in one line
    real: str

    @classmethod
    def of(cls, r: Report) -> _Findings:
        s = r.stack
        gpu_ok = r.gpu.count > 0 and r.gpu.error is None
        build = "CPU build" if s.vllm_cpu_build else "GPU build"
        if s.vllm_version is None:
            real = "vLLM not installed: emulator only"
        elif s.lmcache_version is None:
            real = f"vLLM {s.vllm_version} without LMCache: offload backends on the emulator only"
        elif gpu_ok:
            real = f"vLLM {s.vllm_version} ({build}) with LMCache {s.lmcache_version} in-process"
        elif s.lmcache_mp:
            real = f"vLLM {s.vllm_version} ({build}) with LMCache {s.lmcache_version} MP mode"
        else:
            real = f"vLLM {s.vllm_version} without GPU and LMCache without MP server: emulator only"
        return cls(r=r, gpu_ok=gpu_ok, vllm=s.vllm_version is not None, build=build, real=real)

    def needs_stack(self, reasons: list[str], fixes: list[str], *, gpu: bool, lmcache: bool = True,
                    gpu_fix: str = "run on a GPU runner") -> None:
        s = self.r.stack
        if gpu and not self.gpu_ok:
            reasons.append(_no_gpu(self.r.gpu))
            fixes.append(gpu_fix)
        if not self.vllm:
            reasons.append(f"vLLM is not installed for {s.python}" + (f" ({s.error})" if s.error else ""))
            fixes.append(GET_VLLM)
        elif lmcache and s.lmcache_version is None:
            reasons.append(f"LMCache is not installed next to vLLM ({s.python})")
            fixes.append(f"{s.python} -m pip install lmcache")


def _verdict(reasons: list[str], fixes: list[str], how: str = "") -> Verdict:
    if reasons:
        return Verdict(False, ", ".join(reasons), "; ".join(dict.fromkeys(fixes)))
    return Verdict(True, how=how)


def verdicts(r: Report) -> dict[str, Verdict]:
    """One verdict per backend marker (:data:`models.BACKENDS`), from the findings alone."""
    from .models import BACKENDS

    f = _Findings.of(r)
    s = r.stack
    out: dict[str, Verdict] = {}
    for name in BACKENDS:
        if name == "none":
            out[name] = _verdict([], [], "emulator" + (f"; vLLM {s.vllm_version} ({f.build})" if f.vllm else
                                                       "; vLLM not installed: " + GET_VLLM))
        elif name in ("cpu", "disk"):
            out[name] = _verdict([], [], f"emulator; {f.real}")
        elif name == "waterfall":
            out[name] = _verdict([], [], "emulator only")
        elif name == "redis":
            out[name] = _redis_verdict(f)
        elif name == "gds":
            out[name] = _gds_verdict(f)
        elif name == "native":
            out[name] = _native_verdict(f)
        elif name in ("lmcache_server", "mooncake"):
            out[name] = _connector_verdict(f, name)
        else:  # pragma: no cover - a backend added to BACKENDS without a rule here
            out[name] = Verdict(False, "doctor has no rule for this backend", "update pytest_kvcache/doctor.py")
    return out


def _redis_verdict(f: _Findings) -> Verdict:
    r, s = f.r, f.r.stack
    reasons: list[str] = []
    fixes: list[str] = []
    if r.redis.url:
        if not r.redis.reachable:
            reasons.append(f"Redis at {r.redis.url} is unreachable ({r.redis.error})")
            fixes.append("start Redis there, or give a reachable --kv-redis-url (or none: the plugin "
                         "starts redis-server)")
        how = f"emulator and {f.real}; Redis at {r.redis.url}"
    else:
        if not r.redis.server:
            reasons.append("redis-server is not installed and no --kv-redis-url was given")
            fixes.append("install redis-server (apt-get install redis-server) or pass --kv-redis-url "
                         "redis://HOST:PORT of a running Redis")
        how = f"emulator and {f.real}; the plugin starts {r.redis.server}"
    if f.vllm and s.lmcache_version and not f.gpu_ok and s.l2_adapters and "resp" not in s.l2_adapters:
        how += " (note: this LMCache has no resp L2 adapter for MP mode)"
    return _verdict(reasons, fixes, how)


def _gds_verdict(f: _Findings) -> Verdict:
    r = f.r
    reasons: list[str] = []
    fixes: list[str] = []
    if not f.gpu_ok:
        reasons.append(_no_gpu(r.gpu))
        fixes.append("run on a GPU runner with GPUDirect Storage")
    if not r.gds.cufile:
        reasons.append("no cuFile library (libcufile.so)")
        fixes.append("install NVIDIA GDS (nvidia-gds, libcufile) with the CUDA toolkit")
    if not r.gds.path:
        reasons.append("no GDS mount given")
        fixes.append("pass --kv-gds-path DIR on a GDS-capable mount")
    elif r.gds.error:
        reasons.append(f"GDS path: {r.gds.error}")
        fixes.append("give --kv-gds-path a folder on a local NVMe or GDS-capable file system "
                     "(ext4/xfs on NVMe, not tmpfs or overlay)")
    f.needs_stack(reasons, fixes, gpu=False)
    return _verdict(reasons, fixes, f"{f.real}; {r.gds.path} ({r.gds.fstype})")


def _native_verdict(f: _Findings) -> Verdict:
    s = f.r.stack
    reasons: list[str] = []
    fixes: list[str] = []
    f.needs_stack(reasons, fixes, gpu=True, lmcache=False)
    if f.vllm and s.vllm_cpu_build:
        reasons.append(f"vLLM {s.vllm_version} is the CPU build")
        fixes.append("pip install vllm (the GPU build) on a GPU runner")
    return _verdict(reasons, fixes, f"vLLM {s.vllm_version} native offloading")


def _connector_verdict(f: _Findings, name: str) -> Verdict:
    """lmcache_server and mooncake: LMCache's connector to a remote store."""
    from .backends.probe import StackProbe
    from .backends.vllm import mp_missing

    s = f.r.stack
    reasons: list[str] = []
    fixes: list[str] = []
    # the plugin's own rule (backends.vllm.mp_missing): without a GPU only LMCache's
    # multi-process server can serve it, where it has an adapter for it
    mp_reason = mp_missing(name, StackProbe(lmcache_version=s.lmcache_version,
                                            lmcache_l2_adapters=frozenset(s.l2_adapters),
                                            lmcache_extensions=frozenset(s.lmcache_extensions)))
    mp_ok = f.vllm and s.lmcache_version is not None and s.lmcache_mp and mp_reason is None
    f.needs_stack(reasons, fixes, gpu=not mp_ok,
                  gpu_fix=f"run on a GPU runner ({name} needs LMCache's in-process connector there)")
    if f.vllm and s.lmcache_version and not f.gpu_ok and mp_reason:
        reasons.append(f"without a GPU: {mp_reason}")
        if name == "mooncake":
            fixes.append("or build LMCache from source against Mooncake (MOONCAKE_INCLUDE_DIR) for its "
                         "multi-process mode")
    if name == "mooncake" and not (s.tool("mooncake_master") or s.mooncake_version):
        reasons.append("Mooncake is not installed (no mooncake_master, no mooncake-transfer-engine)")
        fixes.append(f"{s.python} -m pip install mooncake-transfer-engine"
                     + ("" if f.gpu_ok else " (mooncake-transfer-engine-non-cuda without CUDA)"))
    return _verdict(reasons, fixes, f.real if f.gpu_ok or not mp_ok else
                    f"vLLM {s.vllm_version} ({f.build}) with LMCache {s.lmcache_version} MP mode")


def diagnose(*, python: str | None = None, gds_path: str | None = None, redis_url: str | None = None,
             model: str | None = None, results_dir: str | Path = ".",
             scenarios_dir: str | Path | None = None) -> Report:
    gpu, host = probe_gpus()
    return Report(gpu=gpu, host=host, stack=probe_python(python), gds=probe_gds(gds_path),
                  redis=probe_redis(redis_url), resources=probe_resources(results_dir, scenarios_dir),
                  model=probe_model(model) if model else None)


def _plain(obj) -> object:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def to_json(r: Report) -> dict:
    """``{"schema_version": 1, "facts": {...}, "backends": {name: {runnable, reason, fix}}}``."""
    stack = asdict(r.stack)
    stack["tools"] = dict(r.stack.tools)
    facts = {"gpu": _plain(asdict(r.gpu)), "host": dict(r.host), "python": _plain(stack),
             "gds": asdict(r.gds), "redis": asdict(r.redis), "resources": asdict(r.resources),
             "model": asdict(r.model) if r.model else None}
    return {"schema_version": SCHEMA_VERSION, "facts": facts,
            "backends": {name: {"runnable": v.runnable, "reason": v.reason, "fix": v.fix}
                         for name, v in verdicts(r).items()}}


def _gb(value: float | None) -> str:
    return "?" if value is None else f"{value:g} GB"


def text_lines(r: Report) -> list[str]:
    g, s, d, res = r.gpu, r.stack, r.gds, r.resources
    if g.count and not g.error:
        mem = f", {min(g.memory_mib) / 1024:.0f} GiB each" if g.memory_mib else ""
        gpu = f"{g.count} x {g.model}{mem}; driver {g.driver_version}, CUDA {g.cuda_version or '?'}"
    else:
        gpu = f"none ({g.error})"
    if s.error:
        stack = f"{s.python}: {s.error}"
    elif s.vllm_version:
        stack = (f"vLLM {s.vllm_version} ({'CPU' if s.vllm_cpu_build else 'GPU'} build), LMCache "
                 f"{s.lmcache_version or 'not installed'}")
        if s.lmcache_version:
            stack += (f"; in-process connector {'found' if s.inprocess_connector else 'missing'}, MP server "
                      f"{'found' if s.lmcache_mp else 'missing'}, L2 adapters: {', '.join(s.l2_adapters) or 'none'}")
    else:
        stack = f"vLLM not installed ({GET_VLLM}); LMCache {s.lmcache_version or 'not installed'}"
    lines = ["pytest-kvcache doctor: what this machine can run", "",
             f"  host:     {r.host.get('cpu', '?')}, {r.host.get('cpus', '?')} cores",
             f"  GPUs:     {gpu}",
             f"  python:   {s.python} ({s.python_version or '?'})",
             f"  stack:    {stack}",
             f"  GDS:      cuFile {d.cufile or 'not found'}; gdscheck {d.gdscheck or 'not found'}"
             + (f"; {d.path}: " + (d.error or f"{d.fstype}, O_DIRECT write/read ok") if d.path else
                "; no --kv-gds-path"),
             "  Redis:    " + (f"{r.redis.url} " + ("answers PING" if r.redis.reachable else f"unreachable "
                                                      f"({r.redis.error})") if r.redis.url
                                else f"redis-server {r.redis.server or 'not installed'}"),
             (f"  Mooncake: mooncake_master {s.tool('mooncake_master') or 'not found'}, "
              f"mooncake-transfer-engine {s.mooncake_version or 'not installed'}"),
             (f"  disk/RAM: {_gb(res.disk_free_gb)} free under {res.results_dir}; RAM "
              f"{_gb(res.ram_available_gb)} available of {_gb(res.ram_total_gb)}")]
    if res.kv_target_gb is not None:
        short = [what for what, have in (("disk", res.disk_free_gb), ("RAM", res.ram_available_gb))
                 if have is not None and have < res.kv_target_gb]
        lines.append(f"            largest scenario kv_target_gb {res.kv_target_gb:g} GB: "
                     + (f"more than the free {' and '.join(short)}" if short else "fits disk and RAM"))
    else:
        lines.append("            (no scenario sets kv_target_gb)")
    if r.model:
        lines.append(f"  model:    {r.model.path}: " + (f"{r.model.kv_bytes_per_token:,} KV bytes per token"
                                                        if r.model.kv_bytes_per_token else str(r.model.error)))
    lines.append("")
    lines += [v.line(name) for name, v in verdicts(r).items()]
    return lines


def add_arguments(parser) -> None:
    parser.add_argument("--kv-python", default=None, metavar="PATH",
                        help="the interpreter that will run vLLM (default: this one)")
    parser.add_argument("--kv-gds-path", default=None, metavar="DIR", help="the GDS mount to check")
    parser.add_argument("--kv-redis-url", default=None, metavar="URL",
                        help="a running Redis to check (redis://HOST:PORT); default: look for redis-server")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a model folder with config.json: print its KV bytes per token")
    parser.add_argument("--results-dir", default=".", metavar="DIR",
                        help="where results go, for the free disk (default: the current folder)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (schema_version 1: facts, backends)")


def main_doctor(args) -> int:
    report = diagnose(python=args.kv_python, gds_path=args.kv_gds_path, redis_url=args.kv_redis_url,
                      model=args.model, results_dir=args.results_dir)
    if args.json:
        print(json.dumps(to_json(report), indent=1))
    else:
        print("\n".join(text_lines(report)))
    return 0
