"""Command lines and configurations of every backend under --kv-server vllm, GPU-only ones included.

Each is compared with the names vLLM and LMCache document and, where the real stack
(scripts/setup-real-stack.sh) is installed, with the flags and settings the installed
versions accept.
"""

from __future__ import annotations

import json

import pytest

from pytest_kvcache.backends import (
    BackendOptions,
    BackendUnavailable,
    choose_lmcache_mode,
    provision,
)
from pytest_kvcache.backends.probe import (
    StackProbe,
    parse_help_flags,
)
from helpers.backends import CONNECTORS, CPU, GPU, render, yaml_of


# -- in-process LMCache (LMCacheConnectorV1 + LMCACHE_CONFIG_FILE) -------------------------------------


def test_disk_tier_folder_is_created_and_cleaned(tmp_path):
    config = provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="inprocess"), GPU)
    render(config, tmp_path)
    tier = tmp_path / "disk" / "disk-tier"
    assert tier.is_dir()
    (tier / "chunk").write_bytes(b"kv")
    config.cleanup()
    assert not (tmp_path / "disk").exists()


def test_odirect_and_sizes_through_lmcache_overrides(tmp_path):
    options = BackendOptions(lmcache_mode="inprocess", lmcache_overrides=(
        ("max_local_disk_size", "100"), ("extra_config", '{"use_odirect": true}')))
    settings = yaml_of(render(provision("disk", "vllm", tmp_path, options, GPU), tmp_path))
    assert settings["max_local_disk_size"] == 100
    assert settings["extra_config"] == {"use_odirect": True}
    mp = render(provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="mp", lmcache_overrides=(
        ("extra_config", '{"use_odirect": true}'),)), CPU), tmp_path)
    argv = mp.services[-1].argv
    adapter = json.loads(argv[argv.index("--l2-adapter") + 1])
    assert adapter == {"type": "fs", "base_path": f"{tmp_path / 'disk'}/disk-tier", "use_odirect": True}


def test_fault_inject_rate_alone_and_store_policy_given(tmp_path):
    options = BackendOptions(lmcache_mode="mp", lmcache_overrides=(("fault_inject", "0.5"),
                                                                    ("l2_store_policy", "default")))
    argv = render(provision("disk", "vllm", tmp_path, options, CPU), tmp_path).services[-1].argv
    assert json.loads(argv[argv.index("--l2-adapter") + 1])["rate"] == 0.5
    assert argv[argv.index("--l2-store-policy") + 1] == "default"
    plain = render(provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="mp"), CPU), tmp_path)
    assert "--l2-store-policy" not in plain.services[-1].argv


@pytest.mark.parametrize("name,overrides,needle", [
    ("cpu", (("fault_inject", "0.3"),), "backend 'cpu' has none in multi-process mode (use disk or redis or mooncake)"),
    ("disk", (("fault_inject", "1.5"),), "rate 1.5 is not a drop probability from 0 to 1"),
    ("disk", (("fault_inject", '{"drop": 0.3}'),), "use a drop rate (fault_inject=0.3) or an object with"),
    ("disk", (("fault_inject", "often"),), "use a drop rate (fault_inject=0.3)"),
    ("disk", (("l2_store_policy", "skip_l2"),), "l2_store_policy='skip_l2': use default or skip_l1"),
])
def test_fault_inject_and_store_policy_mistakes_are_named(tmp_path, name, overrides, needle):
    with pytest.raises(BackendUnavailable, match="LMCache setting") as err:
        provision(name, "vllm", tmp_path, BackendOptions(lmcache_mode="mp", lmcache_overrides=overrides), CPU)
    assert needle in str(err.value)


def test_fault_inject_is_refused_by_the_emulator_and_marks_a_rehearsal(tmp_path):
    options = BackendOptions(lmcache_overrides=(("fault_inject", "0.3"),))
    with pytest.raises(BackendUnavailable, match="fault_inject wraps a real LMCache tier .--kv-server vllm.; the "
                                                 "emulator rehearses a failing tier with --kv-server-args"):
        provision("disk", "emulator", tmp_path, options)
    assert provision("none", "emulator", tmp_path, options).rehearsal is None  # no LMCache, nothing lost
    lossy = provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="mp", lmcache_overrides=(
        ("fault_inject", "0.3"),)), CPU)
    assert lossy.rehearsal == 'LMCache setting fault_inject={"rate": 0.3} drops tier keys on purpose'
    assert provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="mp"), CPU).rehearsal is None


def test_fault_inject_needs_the_adapter_in_the_installed_lmcache(tmp_path):
    old = StackProbe(**{**CPU.__dict__, "lmcache_version": "0.4.0", "lmcache_l2_adapters": frozenset({"fs", "resp"})})
    with pytest.raises(BackendUnavailable, match="LMCache 0.4.0 has no fault_inject L2 adapter"):
        provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="mp",
                                                           lmcache_overrides=(("fault_inject", "0.3"),)), old)


def test_redis_service_command_line(tmp_path):
    config = provision("redis", "vllm", tmp_path, BackendOptions(lmcache_mode="inprocess"), GPU)
    (service,) = render(config, tmp_path).services
    assert service.argv == ("redis-server", "--bind", "127.0.0.1", "--port", "6400", "--save", "",
                            "--appendonly", "no", "--dir", str(tmp_path / "redis"))
    assert service.ready == "redis"


def test_user_redis_url_is_checked_not_started(tmp_path):
    options = BackendOptions(lmcache_mode="inprocess", redis_url="redis://10.0.0.5:6390")
    rendered = render(provision("redis", "vllm", tmp_path, options, GPU), tmp_path)
    (check,) = rendered.services
    assert check.argv == () and (check.host, check.fixed_port) == ("10.0.0.5", 6390)
    assert yaml_of(rendered)["remote_url"] == "redis://10.0.0.5:6390"


def test_lmcache_server_process(tmp_path):
    rendered = render(provision("lmcache_server", "vllm", tmp_path, BackendOptions(lmcache_mode="inprocess"), GPU),
                      tmp_path)
    (service,) = rendered.services
    assert service.argv == ("/venv/bin/python", "-m", "lmcache.v1.server", "127.0.0.1", "6500", "cpu")


def test_mooncake_master_and_metadata_server(tmp_path):
    with pytest.raises(BackendUnavailable, match="needs Mooncake"):
        provision("mooncake", "vllm", tmp_path, BackendOptions(), GPU)
    probe = StackProbe(python="/v/python", lmcache_version="0.3.9", connectors=CONNECTORS, gpu=True,
                       tools=(("mooncake_master", "/v/mooncake_master"),
                              ("mooncake_http_metadata_server", "/v/mooncake_http_metadata_server")))
    rendered = render(provision("mooncake", "vllm", tmp_path, BackendOptions(), probe), tmp_path)
    master, meta = rendered.services
    assert master.argv == ("/v/mooncake_master", "--port=50051")
    assert meta.argv == ("/v/mooncake_http_metadata_server", "--port", "8090")
    settings = yaml_of(rendered)
    assert settings["remote_url"] == "mooncakestore://127.0.0.1:50051/"
    assert settings["extra_config"]["metadata_server"] == "http://127.0.0.1:8090/metadata"
    assert settings["extra_config"]["master_server_address"] == "127.0.0.1:50051"


# -- multi-process LMCache (LMCacheMPConnector + lmcache server) ----------------------------------------


def test_mooncake_behind_the_multiprocess_server_where_lmcache_has_its_extension(tmp_path):
    """A LMCache built with Mooncake (lmcache_mooncake) serves mooncake without a GPU: its
    mooncake_store adapter, with mooncake_master and the metadata server started beside it."""
    built = StackProbe(**{**CPU.__dict__, "lmcache_extensions": frozenset({"lmcache_native", "lmcache_mooncake"}),
                          "lmcache_l2_adapters": frozenset({"fs", "resp", "mooncake_store", "fault_inject"}),
                          "tools": CPU.tools + (("mooncake_master", "/venv/bin/mooncake_master"),)})
    config = provision("mooncake", "vllm", tmp_path, BackendOptions(), built)
    assert config.mode == "mp"
    rendered = render(config, tmp_path)
    names = [s.name for s in rendered.services]
    assert names[:2] == ["mooncake_master", "mooncake metadata server"] and names[-1] == "lmcache server"
    argv = rendered.services[-1].argv
    adapter = json.loads(argv[argv.index("--l2-adapter") + 1])
    assert adapter == {"type": "mooncake_store", "local_hostname": "127.0.0.1", "protocol": "tcp",
                       "metadata_server": "http://127.0.0.1:8090/metadata", "master_server_address": "127.0.0.1:50051",
                       "global_segment_size": "3355443200", "local_buffer_size": "1073741824"}
    assert rendered.services[0].argv == ("/venv/bin/mooncake_master", "--port=50051")
    # without the extension (LMCache's PyPI wheels): the reason, before anything starts
    wheel = StackProbe(**{**built.__dict__, "lmcache_extensions": frozenset({"lmcache_native"})})
    with pytest.raises(BackendUnavailable, match="needs LMCache's C.. Mooncake extension .lmcache_mooncake.; the "
                                                 "installed LMCache 0.5.6 lacks it"):
        provision("mooncake", "vllm", tmp_path, BackendOptions(), wheel)


def test_mode_choice(tmp_path):
    assert provision("cpu", "vllm", tmp_path, BackendOptions(), GPU).mode == "inprocess"
    assert provision("cpu", "vllm", tmp_path, BackendOptions(lmcache_mode="inprocess"), CPU).mode == "inprocess"
    assert provision("disk", "vllm", tmp_path, BackendOptions(lmcache_mode="mp"), GPU).mode == "mp"
    with pytest.raises(BackendUnavailable, match="needs LMCache's in-process connector, which needs a GPU") as err:
        provision("lmcache_server", "vllm", tmp_path, BackendOptions(), CPU)
    assert "multi-process server has no L2 adapter for an LMCache server (lm://)" in str(err.value)
    with pytest.raises(BackendUnavailable, match="cannot run in LMCache's multi-process mode .mode mp from default.: "
                                                 "LMCache's multi-process server reaches Mooncake through its "
                                                 "mooncake_store L2 adapter, which needs LMCache's C.. Mooncake "
                                                 "extension .lmcache_mooncake.; the installed LMCache lacks it"):
        provision("mooncake", "vllm", tmp_path, BackendOptions(lmcache_mode="mp"),
                  StackProbe(tools=(("mooncake_master", "/x"),)))
    with pytest.raises(BackendUnavailable, match="have no multi-process equivalent"):
        provision("cpu", "vllm", tmp_path, BackendOptions(lmcache_overrides=(("remote_serde", "cachegen"),)), CPU)
    old = StackProbe(lmcache_version="0.3.9", vllm_version="0.10.0", connectors=frozenset({"LMCacheConnectorV1"}))
    with pytest.raises(BackendUnavailable, match="has no KV connector 'LMCacheMPConnector'"):
        provision("cpu", "vllm", tmp_path, BackendOptions(lmcache_mode="mp"), old)


# -- the LMCache mode of an item: option > scenario > ini > auto ---------------------------------------------


@pytest.mark.parametrize("command_line,scenario,ini,chosen", [
    ("mp", "inprocess", "inprocess", ("mp", "--kv-lmcache-mode")),
    (None, "inprocess", "mp", ("inprocess", "scenario")),
    (None, None, "mp", ("mp", "kvcache_lmcache_mode")),
    (None, None, None, ("auto", "default")),
    ("auto", "mp", None, ("auto", "--kv-lmcache-mode")),
])
def test_lmcache_mode_precedence(command_line, scenario, ini, chosen):
    assert choose_lmcache_mode(command_line, scenario, ini) == chosen


def test_each_mode_builds_its_own_connector_server_and_fingerprint(tmp_path):
    inprocess = provision("cpu", "vllm", tmp_path, BackendOptions(lmcache_mode="inprocess",
                                                                  lmcache_mode_from="scenario"), CPU)
    mp = provision("cpu", "vllm", tmp_path, BackendOptions(lmcache_mode="mp", lmcache_mode_from="scenario"), CPU)
    auto = provision("cpu", "vllm", tmp_path, BackendOptions(), CPU)  # no GPU: auto is mp
    assert json.loads(inprocess.vllm_args[1])["kv_connector"] == "LMCacheConnectorV1"
    assert [name for name, _ in inprocess.files] == ["lmcache.yaml"] and not inprocess.services
    assert json.loads(render(mp, tmp_path).vllm_args[1])["kv_connector"] == "LMCacheMPConnector"
    assert [s.name for s in mp.services] == ["lmcache server"] and not mp.files
    # two modes never share a server or a baseline; auto and mp measure the same thing
    assert inprocess.key != mp.key and inprocess.fingerprint() != mp.fingerprint()
    assert auto.key == mp.key and auto.fingerprint() == mp.fingerprint()
    assert json.loads(inprocess.fingerprint()["backend_config"])["mode"] == "inprocess"
    # what was asked for, and by whom, is recorded, not keyed
    assert dict(inprocess.recorded) == {"lmcache_mode": "inprocess", "lmcache_mode_from": "scenario"}
    assert dict(auto.recorded) == {"lmcache_mode": "auto", "lmcache_mode_from": "default"}


def test_the_emulator_accepts_and_records_the_mode_and_nothing_else_changes(tmp_path):
    configs = {mode: provision("disk", "emulator", tmp_path, BackendOptions(lmcache_mode=mode,
                                                                            lmcache_mode_from="scenario"))
               for mode in ("auto", "inprocess", "mp")}
    assert len({c.key for c in configs.values()}) == 1  # one emulator serves every mode
    assert len({json.dumps(c.fingerprint()) for c in configs.values()}) == 1
    assert dict(configs["mp"].recorded) == {"lmcache_mode": "mp", "lmcache_mode_from": "scenario"}


@pytest.mark.parametrize("name,server_kind", [("none", "vllm"), ("native", "vllm"), ("none", "emulator"),
                                              ("cpu", "external")])
def test_backends_without_lmcache_ignore_the_mode(tmp_path, name, server_kind):
    configs = [provision(name, server_kind, tmp_path, BackendOptions(lmcache_mode=mode), CPU)
               for mode in ("inprocess", "mp")]
    assert configs[0] == configs[1] and configs[0].recorded == ()


def test_an_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown LMCache mode 'gpu'; use one of auto, inprocess, mp"):
        provision("cpu", "emulator", tmp_path, BackendOptions(lmcache_mode="gpu"))


def test_the_pool_gives_each_item_its_mode(tmp_path):
    from pytest_kvcache.servers import ServerPool, ServerSettings

    def mode(settings: ServerSettings, scenario: str | None) -> tuple[str, str]:
        pool = ServerPool(settings, tmp_path / "work", tmp_path / "logs")
        pool._probe = CPU
        config = pool.backend("cpu", scenario)
        return config.mode, dict(config.recorded)["lmcache_mode_from"]

    assert mode(ServerSettings(kind="vllm"), "inprocess") == ("inprocess", "scenario")
    assert mode(ServerSettings(kind="vllm", lmcache_mode="inprocess"), None) == ("inprocess", "kvcache_lmcache_mode")
    assert mode(ServerSettings(kind="vllm", lmcache_mode="inprocess"), "mp") == ("mp", "scenario")
    assert mode(ServerSettings(kind="vllm", lmcache_mode_override="mp"), "inprocess") == ("mp", "--kv-lmcache-mode")
    assert mode(ServerSettings(kind="vllm"), None) == ("mp", "default")  # auto on a CPU machine


def test_keys_do_not_depend_on_ports_and_fingerprints_hide_the_workdir(tmp_path):
    a = provision("redis", "vllm", tmp_path, BackendOptions(), CPU)
    b = provision("redis", "vllm", tmp_path, BackendOptions(), CPU)
    assert a.key == b.key
    render(a, tmp_path)
    fp = a.fingerprint()
    assert str(tmp_path) not in fp["backend_config"] and "{port:redis}" in fp["backend_config"]
    assert provision("cpu", "vllm", tmp_path, BackendOptions(), CPU).key != a.key


def test_help_flags_parser():
    text = "usage: x [--model MODEL]\n  --kv-offloading-size KV  (default: None)\n  --enable-x, --no-enable-x\n"
    assert parse_help_flags(text) >= {"--model", "--kv-offloading-size", "--enable-x", "--no-enable-x"}


# -- the Redis fixture, for real ----------------------------------------------------------------------------
