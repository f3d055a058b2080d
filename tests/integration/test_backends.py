"""Backends checked against the real stack where it is installed (scripts/setup-real-stack.sh:
the installed vLLM's flags and LMCache's settings, from a probe of its interpreter), and
those that start something: the GDS configuration and its skip reason, probing an
interpreter without vLLM, and the Redis server the redis backend starts."""

from __future__ import annotations

import json
import os
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
from pytest_kvcache.backends.probe import (
    StackProbe,
    probe_stack,
    vllm_flags,
)
from pytest_kvcache.backends.vllm import (
    DOCUMENTED_LMCACHE_FLAGS,
    DOCUMENTED_LMCACHE_SETTINGS,
    _inprocess,
    gds_missing,
)
from pytest_kvcache.servers.vllm import DOCUMENTED_VLLM_FLAGS
from helpers.backends import CONNECTORS, CPU, GPU, render, yaml_of

ROOT = Path(__file__).resolve().parents[2]
REAL_PYTHON = Path(os.environ.get("KVCACHE_VLLM_PYTHON") or ROOT / ".real-stack" / "venv" / "bin" / "python")


@pytest.fixture(scope="module")
def installed() -> StackProbe | None:
    """The real stack's probe where it is installed (vLLM flags from its --help=all, cached)."""
    if not REAL_PYTHON.is_file():
        return None
    probe = probe_stack(str(REAL_PYTHON))
    return probe if probe.vllm_version and probe.lmcache_version else None


def accepted_vllm_flags(installed: StackProbe | None) -> frozenset[str]:
    if installed is None:
        return DOCUMENTED_VLLM_FLAGS
    flags = vllm_flags(installed.python, installed.vllm_version)
    assert flags, "the installed vLLM's --help=all gave no flags"
    return flags


def flags_in(argv) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


# -- in-process LMCache (LMCacheConnectorV1 + LMCACHE_CONFIG_FILE) -------------------------------------


@pytest.mark.parametrize("name", ["cpu", "disk", "redis", "lmcache_server"])
def test_inprocess_configuration(tmp_path, name, installed):
    config = provision(name, "vllm", tmp_path, BackendOptions(lmcache_mode="inprocess"), GPU)
    assert config.mode == "inprocess"
    rendered = render(config, tmp_path)
    assert rendered.vllm_args[0] == "--kv-transfer-config"
    assert json.loads(rendered.vllm_args[1]) == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert rendered.env["LMCACHE_CONFIG_FILE"] == str(tmp_path / name / "lmcache.yaml")
    settings = yaml_of(rendered)
    assert Path(rendered.env["LMCACHE_CONFIG_FILE"]).read_text() == next(iter(rendered.files.values()))
    assert settings["chunk_size"] == 256 and settings["max_local_cpu_size"] > 0
    known = installed.lmcache_settings if installed else DOCUMENTED_LMCACHE_SETTINGS
    assert set(settings) <= known, set(settings) - known
    expected = {
        "cpu": {"local_cpu": True},
        "disk": {"local_cpu": False, "local_disk": f"file://{tmp_path / 'disk'}/disk-tier/",
                 "max_local_disk_size": 50.0},
        "redis": {"remote_url": "redis://127.0.0.1:6400", "remote_serde": "naive"},
        "lmcache_server": {"remote_url": "lm://127.0.0.1:6500", "remote_serde": "naive"},
    }[name]
    assert {k: settings[k] for k in expected} == expected
    assert set(flags_in(rendered.vllm_args)) <= accepted_vllm_flags(installed)


@pytest.mark.parametrize("name,inner", [
    ("disk", None),
    ("redis", {"type": "resp", "host": "127.0.0.1", "port": 6400}),
])
def test_fault_inject_wraps_the_tier_and_stores_past_l1(tmp_path, name, inner, installed):
    """A partial-loss tier: LMCache's fault_inject adapter around the tier's own, KV out of L1."""
    options = BackendOptions(lmcache_mode="mp", lmcache_overrides=(("fault_inject", '{"rate": 0.3, "seed": 7}'),))
    provisioned = provision(name, "vllm", tmp_path, options, CPU)
    argv = render(provisioned, tmp_path).services[-1].argv
    adapter = json.loads(argv[argv.index("--l2-adapter") + 1])
    inner = inner or {"type": "fs", "base_path": f"{tmp_path / 'disk'}/disk-tier", "use_odirect": False}
    assert adapter == {"type": "fault_inject", "rate": 0.3, "seed": 7, "inner": inner}
    assert argv[argv.index("--l2-store-policy") + 1] == "skip_l1"
    known = installed.lmcache_flags if installed else DOCUMENTED_LMCACHE_FLAGS
    assert flags_in(argv[2:]) <= known
    if installed:
        assert "fault_inject" in installed.lmcache_l2_adapters
    # the settings are the backend's: a fault-injected tier never shares a key with a healthy one
    assert dict(provisioned.lmcache)["fault_inject"] == '{"rate": 0.3, "seed": 7}'
    assert dict(provisioned.lmcache)["l2_store_policy"] == '"skip_l1"'
    healthy = provision(name, "vllm", tmp_path, BackendOptions(lmcache_mode="mp"), CPU)
    assert healthy.lmcache != provisioned.lmcache


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


# -- multi-process LMCache (LMCacheMPConnector + lmcache server) ----------------------------------------


@pytest.mark.parametrize("name", ["cpu", "disk", "redis"])
def test_multiprocess_configuration(tmp_path, name, installed):
    config = provision(name, "vllm", tmp_path, BackendOptions(), CPU)  # auto on a CPU machine: mp
    assert config.mode == "mp"
    rendered = render(config, tmp_path)
    transfer = json.loads(rendered.vllm_args[1])
    assert transfer == {"kv_connector": "LMCacheMPConnector", "kv_role": "kv_both",
                        "kv_connector_extra_config": {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 5600}}
    server = rendered.services[-1]
    argv = server.argv
    assert argv[:2] == ("/venv/bin/lmcache", "server")
    assert argv[argv.index("--port") + 1] == "5600" and argv[argv.index("--http-port") + 1] == "8100"
    assert argv[argv.index("--supported-transfer-mode") + 1] == "auto"
    l1 = json.loads(argv[argv.index("--l1-manager") + 1])
    assert l1["type"] == "DRAM" and l1["size_gb"] == 1.0 and l1["eviction"]["eviction_policy"] == "LRU"
    assert server.ready == "http:/healthcheck"
    assert rendered.metrics_urls == ("http://127.0.0.1:8100/metrics",)
    known = installed.lmcache_flags if installed else DOCUMENTED_LMCACHE_FLAGS
    assert flags_in(argv[2:]) <= known, flags_in(argv[2:]) - known
    assert set(flags_in(rendered.vllm_args)) <= accepted_vllm_flags(installed)
    if name == "redis":
        assert rendered.services[0].argv[0] == "redis-server"
        adapter = json.loads(argv[argv.index("--l2-adapter") + 1])
        assert adapter == {"type": "resp", "host": "127.0.0.1", "port": 6400}
    elif name == "cpu":
        assert "--l2-adapter" not in argv


# -- the LMCache mode of an item: option > scenario > ini > auto ---------------------------------------------


def test_none_and_native(tmp_path, installed):
    assert provision("none", "vllm", tmp_path, BackendOptions(), CPU).vllm_args == ()
    native = provision("native", "vllm", tmp_path, BackendOptions(), CPU)
    assert native.vllm_args == ("--kv-offloading-size", "4", "--kv-offloading-backend", "native")
    assert set(flags_in(native.vllm_args)) <= accepted_vllm_flags(installed)
    old = StackProbe(vllm_version="0.11.0", connectors=CONNECTORS, vllm_flag_set=frozenset({"--model"}))
    legacy = provision("native", "vllm", tmp_path, BackendOptions(), old)
    assert json.loads(legacy.vllm_args[1])["kv_connector"] == "OffloadingConnector"
    with pytest.raises(BackendUnavailable, match="no native KV offloading"):
        provision("native", "vllm", tmp_path, BackendOptions(),
                  StackProbe(vllm_version="0.9.0", vllm_flag_set=frozenset({"--model"})))


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
