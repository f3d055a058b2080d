"""``python -m pytest_kvcache doctor``: probes with fakes, backend verdicts, JSON schema, CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

from pytest_kvcache import doctor as D
from pytest_kvcache.kvsize import kv_bytes_per_token
from pytest_kvcache.models import BACKENDS


# -- GPUs -------------------------------------------------------------------------------------------


def test_gpus_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    gpu, _ = D.probe_gpus()
    assert gpu.count == 0 and gpu.error == "nvidia-smi not found"


# -- GDS --------------------------------------------------------------------------------------------


def test_gds_no_path_missing_and_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "find_cufile", lambda: None)
    assert D.probe_gds(None) == D.GdsFacts()
    assert D.probe_gds(str(tmp_path / "nope")).error == f"{tmp_path / 'nope'} does not exist"
    (tmp_path / "f").write_text("x")
    assert D.probe_gds(str(tmp_path / "f")).error == f"{tmp_path / 'f'} is not a folder"


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
                          lmcache_extensions=("lmcache_fs", "lmcache_native", "lmcache_redis"),
                          inprocess_connector=True,
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
