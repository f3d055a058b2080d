"""Unit tests of pytest_kvcache.identity: what a run is compared on, and what across."""

from __future__ import annotations


from pytest_kvcache import identity
from pytest_kvcache.identity import KeyMoves, item_identity
from pytest_kvcache.scenarios import load_scenario

SCENARIO = """
name: prefill
phase: prefill
matrix: {backend: [cpu], input_len: [1k], concurrency: [16], output_len: [1]}
"""


def case(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SCENARIO)
    return load_scenario(path).cases[0]


VLLM_INFO = {"server": "vllm", "vllm_version": "0.11.0", "lmcache_version": "0.5.6", "torch_version": "2.9.0",
             "vllm_dist": "vllm", "gpu": "0,1", "server_args": "--enforce-eager", "kv_mode": "mp",
             "label.bandwidth": "400Gbps", "endpoint": "http://127.0.0.1:8123", "services": "lmcache server"}
BACKEND = {"backend": "cpu", "backend_config": '{"vllm_args": ["--kv-transfer-config", '
                                              '"{\\"lmcache.mp.host\\": \\"tcp://127.0.0.1:5555\\"}"]}'}


def test_versions_are_software_the_rest_is_testbed_addresses_neither(tmp_path):
    ident = item_identity(case(tmp_path), "Qwen/Qwen2.5-7B", VLLM_INFO, BACKEND,
                          host={"gpu": "2 x NVIDIA H200", "driver_version": "570.86", "cpu": "AMD EPYC"},
                          versions=(("commit", "abc123"),))
    assert ident.software == {"vllm_version": "0.11.0", "lmcache_version": "0.5.6", "torch_version": "2.9.0",
                              "vllm_dist": "vllm", "driver_version": "570.86",
                              "plugin_version": ident.software["plugin_version"], "version.commit": "abc123"}
    bed = ident.testbed
    assert bed["measurement_version"] == identity.MEASUREMENT_VERSION and bed["model"] == "Qwen/Qwen2.5-7B"
    assert bed["gpu"] == "2 x NVIDIA H200" and bed["cpu"] == "AMD EPYC" and bed["label.bandwidth"] == "400Gbps"
    assert "endpoint" not in bed and "services" not in bed
    assert "127.0.0.1" not in bed["backend_config"] and "tcp://<address>" in bed["backend_config"]
    assert len(ident.testbed_id) == 16
    # the same testbed on another port, another upgrade: same testbed id
    other = dict(VLLM_INFO, vllm_version="0.11.1", endpoint="http://127.0.0.1:9")
    again = item_identity(case(tmp_path), "Qwen/Qwen2.5-7B", other, BACKEND,
                          host={"gpu": "2 x NVIDIA H200", "driver_version": "570.86", "cpu": "AMD EPYC"})
    assert again.testbed_id == ident.testbed_id


def test_keys_move_between_sides(tmp_path):
    moves = KeyMoves(to_testbed=("torch_version",), to_software=("label.*", "gpu"))
    ident = item_identity(case(tmp_path), "m", VLLM_INFO, BACKEND, moves=moves)
    assert ident.testbed["torch_version"] == "2.9.0" and "torch_version" not in ident.software
    assert ident.software["label.bandwidth"] == "400Gbps" and ident.software["gpu"] == "0,1"
    assert "gpu" not in ident.testbed and "label.bandwidth" not in ident.testbed


def test_software_change_and_machine_part():
    assert identity.software_change([{"vllm_version": "0.11.0"}] * 2, {"vllm_version": "0.11.1"}) == \
        "vllm_version 0.11.0 -> 0.11.1"
    assert identity.software_change([{"a": "1"}, {"a": "2"}], {"a": "3", "b": "x"}) == "a 1/2 -> 3, b (absent) -> x"
    assert identity.software_change([{"a": "1"}], {"a": "1"}) == ""
    assert identity.machine_part({"gpu": "g", "workload_hash": "w", "backend": "cpu", "model": "m"}) == \
        {"gpu": "g", "model": "m"}


def test_legacy_fingerprint_split():
    bed, soft = identity.split_legacy_fingerprint({"fingerprint_version": "1", "gpu": "x", "vllm_version": "0.9",
                                                   "endpoint": "http://h:1"})
    assert bed == {"measurement_version": "1", "gpu": "x"} and soft == {"vllm_version": "0.9"}
