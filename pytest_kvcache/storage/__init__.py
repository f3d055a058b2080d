"""The storage phase (seed 002, MLPerf Storage kv-cache.py): a KV access trace replayed
against a tier hierarchy with LRU waterfall eviction, measured as storage.

No inference server: real bytes move through GPU memory (or RAM standing in, and saying
so), RAM, a file on a real file system (O_DIRECT), a file on a GPUDirect Storage mount
(cuFile through kvikio; :class:`TierUnavailable` where it cannot run) and a redis server. The entry point is
:func:`run_storage`; its :class:`StorageResult` has ``to_json()``; a scenario file
(the draft schema) gives the configs through :func:`load_storage_scenario`.
"""

from __future__ import annotations

from .hierarchy import PROMOTE_POLICIES, Hierarchy
from .replay import MISTRAL_7B_TOKEN_BYTES, StorageConfig, run_storage, run_trial
from .results import SCHEMA_VERSION, LatencyFigures, StorageResult, StorageSummary, TierFigures, TrialResult, summarize
from .scenario import load_storage_scenario, storage_configs
from .tiers import DiskTier, GdsTier, RamTier, RedisTier, Tier, TierSpec, TierUnavailable, open_tier
from .trace import OPERATIONS, KVRequest, TraceSpec, build_trace, load_trace, save_trace

__all__ = [
    "MISTRAL_7B_TOKEN_BYTES", "OPERATIONS", "PROMOTE_POLICIES", "SCHEMA_VERSION", "DiskTier", "GdsTier", "Hierarchy",
    "KVRequest", "LatencyFigures", "RamTier", "RedisTier", "StorageConfig", "StorageResult", "StorageSummary", "Tier",
    "TierFigures", "TierSpec", "TierUnavailable", "TraceSpec", "TrialResult", "build_trace", "load_storage_scenario",
    "load_trace", "open_tier", "run_storage", "run_trial", "save_trace", "storage_configs", "summarize",
]
