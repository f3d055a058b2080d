"""The profile the calibration tests recover: large, distinct coefficients."""

from __future__ import annotations

import dataclasses

from pytest_kvcache.emulator.costmodel import PROFILES

#: A profile with large, distinct coefficients: its TTFTs dwarf the emulator's own overhead.
TRUTH = dataclasses.replace(
    PROFILES["quick"], name="truth", time_scale=1.0, kv_bytes_per_token=4096, prefill_base_ms=10.0,
    prefill_ms_per_token=0.01, prefill_ms_per_token_sq=0.012, lookup_ms=2.0, store_base_ms=0.0,
    store_fraction=0.0, decode_base_ms=3.0, decode_ms_per_running_seq=0.25,
    bandwidth_gbps={**PROFILES["quick"].bandwidth_gbps, "cpu": 0.5})
