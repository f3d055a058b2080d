"""Backends that start or probe something for real: the GDS configuration and its skip reason,
probing an interpreter without vLLM, and the Redis server the redis backend starts."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from pytest_kvcache.backends import (
    BackendOptions,
    BackendUnavailable,
    provision,
)
from pytest_kvcache.backends.probe import probe_stack
from pytest_kvcache.backends.vllm import (
    DOCUMENTED_LMCACHE_SETTINGS,
    _inprocess,
    gds_missing,
)
from helpers.backends import CPU, GPU, render, yaml_of


# -- in-process LMCache (LMCacheConnectorV1 + LMCACHE_CONFIG_FILE) -------------------------------------


def test_gds_inprocess_configuration_and_skip_reason(tmp_path, monkeypatch):
    options = BackendOptions(lmcache_mode="inprocess", gds_path=str(tmp_path))
    settings = yaml_of(render(_inprocess("gds", tmp_path / "gds", options, GPU), tmp_path))
    assert settings["gds_path"] == str(tmp_path) and settings["use_gds"] is True
    assert set(settings) <= DOCUMENTED_LMCACHE_SETTINGS
    reason = gds_missing(BackendOptions(), gpu=False)
    assert "no NVIDIA GPU" in reason and "no GDS mount given (--kv-gds-path DIR)" in reason
    monkeypatch.setattr("pytest_kvcache.backends.probe.has_gpu", lambda: False)
    with pytest.raises(BackendUnavailable, match="backend 'gds' needs an NVIDIA GPU, cuFile and a GDS mount"):
        provision("gds", "vllm", tmp_path, options, CPU)


# -- the LMCache mode of an item: option > scenario > ini > auto ---------------------------------------------


def test_probe_of_an_interpreter_without_vllm():
    import sys

    probe = probe_stack(sys.executable)
    assert probe.python == sys.executable
    assert probe.info()["vllm_version"] in ("not installed", probe.vllm_version)


# -- the Redis fixture, for real ----------------------------------------------------------------------------


def _resp(port: int, *parts: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return s.recv(4096)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_server_is_started_ready_and_stopped(tmp_path):
    from pytest_kvcache.servers import ServerPool, ServerSettings

    pool = ServerPool(ServerSettings(kind="vllm", model="m"), tmp_path / "work", tmp_path / "logs")
    pool._probe = CPU
    config = provision("redis", "vllm", tmp_path / "work", BackendOptions(lmcache_mode="inprocess"), GPU)
    ports = {name: __import__("pytest_kvcache.servers._process", fromlist=["free_port"]).free_port()
             for name in config.port_names()}
    rendered = config.render(ports)
    start = time.monotonic()
    (process,) = pool._start_services(config, rendered.services, ports)
    try:
        assert time.monotonic() - start < 10
        port = ports["redis"]
        assert _resp(port, b"PING") == b"+PONG\r\n"
        assert _resp(port, b"SET", b"kv:chunk", b"\x00" * 1024) == b"+OK\r\n"
        assert _resp(port, b"GET", b"kv:chunk").startswith(b"$1024\r\n")
        assert _resp(port, b"CONFIG", b"GET", b"save").endswith(b"$0\r\n\r\n")  # no snapshots
    finally:
        pid = process.pid
        process.stop()
        config.cleanup()
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(") ", 1)[1][0] == "Z"
    assert "Ready to accept connections" in process.log_path.read_text()
