"""Backend configurations for a real vLLM: LMCache in-process or multi-process, or vLLM's own offloading.

Every builder returns a template (see :class:`BackendConfig`); nothing is started here.
"""

from __future__ import annotations

import ctypes.util
import json
from pathlib import Path

import yaml

from . import (
    CHUNK_SIZE,
    BackendConfig,
    BackendOptions,
    BackendUnavailable,
    ServiceSpec,
)
from .._redis_url import parse_redis_url
from .probe import StackProbe

__all__ = ["DOCUMENTED_LMCACHE_FLAGS", "DOCUMENTED_LMCACHE_SETTINGS", "lmcache_mode", "mp_missing", "vllm_backend"]

#: LMCache in-process settings this module writes (documented names; checked against the
#: installed LMCache's _CONFIG_DEFINITIONS where it is installed).
DOCUMENTED_LMCACHE_SETTINGS = frozenset({
    "chunk_size", "local_cpu", "max_local_cpu_size", "local_disk", "max_local_disk_size", "remote_url",
    "remote_serde", "extra_config", "gds_path", "gds_buffer_size", "use_gds", "save_unfull_chunk",
})
#: ``lmcache server`` flags this module writes (documented; checked where installed).
DOCUMENTED_LMCACHE_FLAGS = frozenset({
    "--host", "--port", "--chunk-size", "--supported-transfer-mode", "--shm-name", "--l1-manager",
    "--l2-adapter", "--http-port", "--prometheus-port", "--l2-store-policy",
})
#: LMCache settings of the multi-process server (``--kv-lmcache KEY=VALUE``); the first four
#: have in-process names, the last two only exist here (README: "Backends without a GPU").
MP_SETTINGS = frozenset({"chunk_size", "max_local_cpu_size", "max_local_disk_size", "extra_config",
                         "l2_store_policy", "fault_inject"})
#: Keys of ``fault_inject`` (LMCache's fault_inject L2 adapter, which wraps the tier's adapter).
FAULT_INJECT_KEYS = frozenset({"rate", "seed", "gap_indices", "gap_tail_ratios"})

#: Defaults of the in-process configuration (GB).
INPROCESS_CPU_GB = 5.0
INPROCESS_DISK_GB = 50.0
#: Default L1 (DRAM) of the multi-process server (GB): it lives in /dev/shm.
MP_L1_GB = 1.0

#: LMCache's compiled Mooncake client, which its mooncake_store L2 adapter needs
MOONCAKE_EXTENSION = "lmcache_mooncake"
_MP_CAPABLE = ("cpu", "disk", "redis")
#: backends whose multi-process server keeps the KV in an L2 adapter (cpu: L1 only)
_L2_TIERS = ("disk", "redis", "mooncake")


def mp_missing(name: str, probe: StackProbe) -> str | None:
    """Why LMCache's multi-process server cannot serve this backend here (None: it can)."""
    if name in _MP_CAPABLE or name == "gds":
        return None
    if name == "mooncake":
        if probe.lmcache_l2_adapters and "mooncake_store" not in probe.lmcache_l2_adapters:
            return f"the installed LMCache {probe.lmcache_version} has no mooncake_store L2 adapter"
        if MOONCAKE_EXTENSION not in probe.lmcache_extensions:
            installed = f"LMCache {probe.lmcache_version}" if probe.lmcache_version else "LMCache"
            return ("LMCache's multi-process server reaches Mooncake through its mooncake_store L2 adapter, which "
                    f"needs LMCache's C++ Mooncake extension ({MOONCAKE_EXTENSION}); the installed {installed} "
                    "lacks it (its PyPI wheels are built without it: build LMCache from source with "
                    "MOONCAKE_INCLUDE_DIR set)")
        return None
    if name == "lmcache_server":
        return ("LMCache's multi-process server has no L2 adapter for an LMCache server (lm://): only the "
                "in-process connector reaches one")
    return f"backend '{name}' has no LMCache multi-process configuration"


def lmcache_mode(name: str, options: BackendOptions, probe: StackProbe) -> str:
    """The LMCache mode configured for this backend: the one asked for, or the probe's answer for auto."""
    mode = options.lmcache_mode
    if mode == "mp":
        missing = mp_missing(name, probe)
        if missing:
            raise BackendUnavailable(f"backend '{name}' cannot run in LMCache's multi-process mode (mode mp from "
                                     f"{options.lmcache_mode_from}): {missing}; use lmcache_mode: inprocess in the "
                                     "scenario or --kv-lmcache-mode inprocess (GPU runners)")
        return "mp"
    if mode == "inprocess":
        return "inprocess"
    # auto: the in-process connector has no CPU transfer path; the MP server has.
    if probe.gpu:
        return "inprocess"
    missing = mp_missing(name, probe)
    if missing is None and (probe.lmcache_mp or probe.lmcache_version is None):
        return "mp"
    raise BackendUnavailable(
        f"backend '{name}' needs LMCache's in-process connector, which needs a GPU (on a CPU build it logs "
        "'No supported cpu connector found' and recomputes every request); no GPU here"
        + (f", and {missing}" if missing else "")
        + ("" if probe.lmcache_mp else ", and the installed LMCache has no multi-process server"))


def _settings(options: BackendOptions, base: dict) -> dict:
    settings = dict(base)
    for key, raw in options.lmcache_overrides:
        try:
            settings[key] = json.loads(raw)
        except ValueError:
            settings[key] = raw
    return settings


def _encoded(settings: dict) -> tuple[tuple[str, str], ...]:
    return tuple((k, json.dumps(v, sort_keys=True)) for k, v in settings.items())


def _connector_check(probe: StackProbe, connector: str) -> None:
    if probe.connectors and connector not in probe.connectors:
        raise BackendUnavailable(f"the installed vLLM {probe.vllm_version} has no KV connector {connector!r} "
                                 f"(it has: {', '.join(sorted(probe.connectors))})")


def vllm_backend(name: str, workdir: Path, options: BackendOptions, probe: StackProbe) -> BackendConfig:
    workdir = Path(workdir) / name
    if name == "none":
        return BackendConfig(name=name, workdir=None)
    if name == "native":
        return _native(options, probe)
    if name == "gds":
        _gds_available(options)
    if name == "mooncake" and not (probe.tool("mooncake_master") or probe.mooncake_version):
        raise BackendUnavailable("backend 'mooncake' needs Mooncake (mooncake_master and the "
                                 "mooncake-transfer-engine package); not installed here")
    mode = lmcache_mode(name, options, probe)
    if probe.lmcache_version is None and probe.vllm_version is not None:
        raise BackendUnavailable(f"backend '{name}' needs LMCache, which is not installed next to vLLM "
                                 f"({probe.python})")
    if mode == "mp":
        return _mp(name, workdir, options, probe)
    return _inprocess(name, workdir, options, probe)


# -- in-process (LMCacheConnectorV1 + LMCACHE_CONFIG_FILE) ---------------------------------------


def _inprocess(name: str, workdir: Path, options: BackendOptions, probe: StackProbe) -> BackendConfig:
    _connector_check(probe, "LMCacheConnectorV1")
    base: dict = {"chunk_size": CHUNK_SIZE, "local_cpu": False, "max_local_cpu_size": INPROCESS_CPU_GB}
    services: list[ServiceSpec] = []
    dirs: list[str] = []
    if name == "cpu":
        base["local_cpu"] = True
    elif name == "disk":
        # local_cpu off (the seeds' later runs); max_local_cpu_size stays > 0: it is also the staging buffer
        base.update(local_disk="file://{workdir}/disk-tier/", max_local_disk_size=INPROCESS_DISK_GB)
        dirs.append("{workdir}/disk-tier")
    elif name == "gds":
        base.update(gds_path=options.gds_path, use_gds=True)
    elif name == "redis":
        if options.redis_url:
            services.append(_user_redis(options.redis_url))
            base.update(remote_url=options.redis_url, remote_serde="naive")
        else:
            base.update(remote_url="redis://127.0.0.1:{port:redis}", remote_serde="naive")
            services.append(_redis_service())
    elif name == "lmcache_server":
        base.update(remote_url="lm://127.0.0.1:{port:lmserver}", remote_serde="naive")
        services.append(ServiceSpec(
            name="lmcache_server", port="lmserver", ready="tcp",
            argv=(probe.python, "-m", "lmcache.v1.server", "127.0.0.1", "{port:lmserver}", "cpu")))
    elif name == "mooncake":
        base.update(remote_url="mooncakestore://127.0.0.1:{port:mooncake_master}/", remote_serde="naive",
                    extra_config=_mooncake_client())
        services.extend(_mooncake_services(probe))
    else:  # pragma: no cover - guarded by BACKENDS
        raise BackendUnavailable(f"backend '{name}' is not wired for --kv-server vllm")
    settings = _settings(options, base)
    config_text = yaml.safe_dump(settings, sort_keys=True)
    transfer = json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}, sort_keys=True)
    env = [("LMCACHE_CONFIG_FILE", "{workdir}/lmcache.yaml")]
    if probe.lmcache_version and probe.lmcache_version.startswith(("0.1", "0.2")):
        env.append(("LMCACHE_USE_EXPERIMENTAL", "True"))  # older LMCache needed it; now ignored
    return BackendConfig(name=name, workdir=str(workdir), vllm_args=("--kv-transfer-config", transfer),
                         env=tuple(env), lmcache=_encoded(settings), mode="inprocess",
                         services=tuple(services), files=(("lmcache.yaml", config_text),), dirs=tuple(dirs))


def _redis_service() -> ServiceSpec:
    return ServiceSpec(name="redis-server", port="redis", ready="redis",
                       argv=("redis-server", "--bind", "127.0.0.1", "--port", "{port:redis}", "--save", "",
                             "--appendonly", "no", "--dir", "{workdir}"))


def _user_redis(url: str) -> ServiceSpec:
    host, port, _, _ = parse_redis_url(url)
    return ServiceSpec(name=f"Redis at {url}", argv=(), ready="redis", port="", host=host, fixed_port=port)


def _mooncake_client() -> dict:
    """The Mooncake Store client's setup (TCP on loopback; the master and metadata server below)."""
    return {"local_hostname": "127.0.0.1", "metadata_server": "http://127.0.0.1:{port:mooncake_meta}/metadata",
            "master_server_address": "127.0.0.1:{port:mooncake_master}", "protocol": "tcp",
            "global_segment_size": 3355443200, "local_buffer_size": 1073741824}


def _mooncake_services(probe: StackProbe) -> list[ServiceSpec]:
    master = probe.tool("mooncake_master") or "mooncake_master"
    meta = probe.tool("mooncake_http_metadata_server")
    services = [ServiceSpec(name="mooncake_master", port="mooncake_master", ready="tcp",
                            argv=(master, "--port={port:mooncake_master}"))]
    if meta:
        services.append(ServiceSpec(name="mooncake_http_metadata_server", port="mooncake_meta", ready="tcp",
                                    argv=(meta, "--port", "{port:mooncake_meta}")))
    else:
        services.append(ServiceSpec(name="mooncake metadata server", port="mooncake_meta", ready="tcp",
                                    argv=(probe.python, "-m", "mooncake.http_metadata_server",
                                          "--port", "{port:mooncake_meta}")))
    return services


# -- multi-process (LMCacheMPConnector + lmcache server) ----------------------------------------------


def _lmcache_cli(probe: StackProbe) -> tuple[str, ...]:
    tool = probe.tool("lmcache")
    if tool:
        return (tool,)
    script = "import sys; from lmcache.cli.main import main; sys.argv[0] = 'lmcache'; sys.exit(main())"
    return (probe.python, "-c", script)


def _mp(name: str, workdir: Path, options: BackendOptions, probe: StackProbe) -> BackendConfig:
    _connector_check(probe, "LMCacheMPConnector")
    settings = _settings(options, {"chunk_size": CHUNK_SIZE, "max_local_cpu_size": MP_L1_GB})
    unknown = sorted(set(settings) - MP_SETTINGS)
    if unknown:
        raise BackendUnavailable(f"LMCache setting(s) {', '.join(unknown)} have no multi-process equivalent; "
                                 "use lmcache_mode: inprocess in the scenario or --kv-lmcache-mode inprocess")
    fault = _fault_inject(name, settings, probe)
    l1 = {"type": "DRAM", "tag": "_default", "size_gb": settings["max_local_cpu_size"],
          "eviction": {"eviction_policy": "LRU", "trigger_watermark": 0.8, "eviction_ratio": 0.2}}
    argv = [*_lmcache_cli(probe), "server", "--host", "127.0.0.1", "--port", "{port:lmcache}",
            "--chunk-size", str(settings["chunk_size"]), "--supported-transfer-mode", "auto",
            "--shm-name", "kvcache-{port:lmcache}", "--l1-manager", json.dumps(l1, sort_keys=True)]
    flags = probe.lmcache_flags
    metrics_urls: list[str] = []
    ready, ready_port = "tcp", "lmcache"
    if not flags or "--http-port" in flags:
        # Without it the server takes the fixed port 8080 (one server at a time).
        argv += ["--http-port", "{port:lmcache_http}"]
        metrics_urls.append("http://127.0.0.1:{port:lmcache_http}/metrics")
        ready, ready_port = "http:/healthcheck", "lmcache_http"
    if not flags or "--prometheus-port" in flags:
        argv += ["--prometheus-port", "{port:lmcache_prom}"]
    services: list[ServiceSpec] = []
    dirs: list[str] = []
    extra = settings.get("extra_config") or {}
    if name == "disk":
        disk = {"type": "fs", "base_path": "{workdir}/disk-tier", "use_odirect": bool(extra.get("use_odirect"))}
        argv += ["--l2-adapter", _fault_wrapped(json.dumps(disk, sort_keys=True), fault)]
        dirs.append("{workdir}/disk-tier")
    elif name == "redis":
        if options.redis_url:
            host, port, _, _ = parse_redis_url(options.redis_url)
            adapter = json.dumps({"type": "resp", "host": host, "port": port}, sort_keys=True)
            services.append(_user_redis(options.redis_url))
        else:
            # the port is a JSON number: the placeholder sits outside quotes
            adapter = '{"host": "127.0.0.1", "port": {port:redis}, "type": "resp"}'
            services.append(_redis_service())
        argv += ["--l2-adapter", _fault_wrapped(adapter, fault)]
    elif name == "mooncake":
        # the adapter hands every key but its own to the Mooncake client as text
        client = {key: str(value) for key, value in _mooncake_client().items()}
        store = json.dumps({"type": "mooncake_store", **client}, sort_keys=True)
        argv += ["--l2-adapter", _fault_wrapped(store, fault)]
        services.extend(_mooncake_services(probe))
    elif name == "gds":
        argv += ["--gds-l1-path", str(options.gds_path)]
    argv += _store_policy(settings, fault, probe)
    lm_service = ServiceSpec(name="lmcache server", port=ready_port, ready=ready, argv=tuple(argv),
                             env=(("LMCACHE_DISABLE_BANNER", "1"),))
    services.append(lm_service)
    transfer = ('{"kv_connector": "LMCacheMPConnector", "kv_connector_extra_config": '
                '{"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": {port:lmcache}}, "kv_role": "kv_both"}')
    return BackendConfig(name=name, workdir=str(workdir), vllm_args=("--kv-transfer-config", transfer),
                         lmcache=_encoded(settings), mode="mp", services=tuple(services),
                         metrics_urls=tuple(metrics_urls), dirs=tuple(dirs))


def _fault_inject(name: str, settings: dict, probe: StackProbe) -> dict | None:
    """``fault_inject`` checked, as the fault_inject adapter's fields (None: not set)."""
    fault = settings.get("fault_inject")
    if fault is None:
        return None
    if isinstance(fault, (int, float)) and not isinstance(fault, bool):
        fault = {"rate": fault}
    if not isinstance(fault, dict) or set(fault) - FAULT_INJECT_KEYS:
        raise BackendUnavailable(
            f"LMCache setting fault_inject={json.dumps(fault)}: use a drop rate (fault_inject=0.3) or an object "
            f"with {', '.join(sorted(FAULT_INJECT_KEYS))}, e.g. fault_inject={{\"rate\": 0.3, \"seed\": 7}}")
    rate = fault.get("rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise BackendUnavailable(f"LMCache setting fault_inject: rate {rate!r} is not a drop probability from 0 to 1")
    if name not in _L2_TIERS:
        raise BackendUnavailable(f"LMCache setting fault_inject wraps the tier's L2 adapter; backend '{name}' has "
                                 f"none in multi-process mode (use {' or '.join(_L2_TIERS)})")
    if probe.lmcache_l2_adapters and "fault_inject" not in probe.lmcache_l2_adapters:
        raise BackendUnavailable(f"the installed LMCache {probe.lmcache_version} has no fault_inject L2 adapter "
                                 "(LMCache 0.5.6 has it)")
    settings["fault_inject"] = fault
    return fault


def _fault_wrapped(adapter: str, fault: dict | None) -> str:
    """The tier's adapter JSON, inside LMCache's fault_inject adapter where one is asked for.

    Text, not a dict: a port placeholder may stand where a JSON number goes."""
    if fault is None:
        return adapter
    outer = json.dumps({"type": "fault_inject", **fault}, sort_keys=True)
    return outer[:-1] + ', "inner": ' + adapter + "}"


def _store_policy(settings: dict, fault: dict | None, probe: StackProbe) -> list[str]:
    """``--l2-store-policy`` from ``l2_store_policy``.

    A fault-injected tier stores with skip_l1 unless told otherwise: the KV leaves L1 once it
    is in L2, so a warm round loads it through the faulty adapter (from L1 it never would)."""
    policy = settings.get("l2_store_policy", "skip_l1" if fault is not None else None)
    if policy is None:
        return []
    if policy not in ("default", "skip_l1"):
        raise BackendUnavailable(f"LMCache setting l2_store_policy={policy!r}: use default or skip_l1")
    if probe.lmcache_flags and "--l2-store-policy" not in probe.lmcache_flags:
        raise BackendUnavailable(f"the installed LMCache {probe.lmcache_version} has no --l2-store-policy")
    settings["l2_store_policy"] = policy
    return ["--l2-store-policy", policy]


# -- vLLM's own offloading -------------------------------------------------------------------------


def _native(options: BackendOptions, probe: StackProbe) -> BackendConfig:
    size = options.native_size_gb
    accepts = probe.accepts("--kv-offloading-size")
    if accepts is None or accepts:
        args: tuple[str, ...] = ("--kv-offloading-size", f"{size:g}")
        if accepts is None or probe.accepts("--kv-offloading-backend"):
            args += ("--kv-offloading-backend", "native")
        return BackendConfig(name="native", workdir=None, vllm_args=args, mode="native")
    if "OffloadingConnector" in probe.connectors:
        # Before --kv-offloading-size (vLLM 0.11-0.12): the connector with a CPU block count.
        transfer = json.dumps({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                               "kv_connector_extra_config": {"num_cpu_blocks": int(size * 1024)}}, sort_keys=True)
        return BackendConfig(name="native", workdir=None, vllm_args=("--kv-transfer-config", transfer), mode="native")
    raise BackendUnavailable(f"the installed vLLM {probe.vllm_version} has no native KV offloading "
                             "(--kv-offloading-size or OffloadingConnector)")


# -- GDS ------------------------------------------------------------------------------------------


def gds_missing(options: BackendOptions, gpu: bool | None = None) -> str | None:
    """Why GDS cannot run here (None: it can)."""
    from .probe import has_gpu

    reasons = []
    if not (has_gpu() if gpu is None else gpu):
        reasons.append("no NVIDIA GPU")
    if ctypes.util.find_library("cufile") is None and not any(
            Path(p).exists() for p in ("/usr/local/cuda/lib64/libcufile.so",
                                       "/usr/lib/x86_64-linux-gnu/libcufile.so.0")):
        reasons.append("no cuFile library (libcufile)")
    if not options.gds_path:
        reasons.append("no GDS mount given (--kv-gds-path DIR)")
    elif not Path(options.gds_path).is_dir():
        reasons.append(f"GDS path {options.gds_path} is not a folder")
    return "; ".join(reasons) or None


def _gds_available(options: BackendOptions) -> None:
    missing = gds_missing(options)
    if missing:
        raise BackendUnavailable(f"backend 'gds' needs an NVIDIA GPU, cuFile and a GDS mount: {missing}")
