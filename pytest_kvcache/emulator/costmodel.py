"""Timing profiles of the emulator and the formulas that turn work into time.

All times are in milliseconds, and every modeled time is multiplied by ``slowdown``
(``--slowdown``, default 1.0; the fixed profile's times too, which makes regression
tests of the gate easy).  Real I/O time (reading/writing chunk payloads from/to the
tier) is measured and added on top, never scaled.

Profile ``quick`` (default, fast enough for CI)
------------------------------------------------
A request with ``n`` prompt tokens of which ``cached`` come from the offload tier
(``computed = n - cached``) is prefilled by a single FIFO prefill worker (one prefill
at a time, like one GPU), so TTFT = queue wait + prefill::

    prefill_ms  = prefill_base_ms + prefill_ms_per_token * computed
                  + prefill_ms_per_token_sq * computed * n / 1000
    load_ms     = lookup_ms (if a tier exists)
                  + time_scale * 1000 * cached * kv_bytes_per_token / bandwidth_bps(tier)
    store_ms    = store_base_ms (if a tier exists)
                  + time_scale * 1000 * stored * kv_bytes_per_token / bandwidth_bps(tier)
                    * store_fraction
    TTFT_model  = slowdown * (prefill_ms + load_ms + store_ms) + real I/O time

With the defaults (base 2.95 ms, 5e-4 ms/token, 7.3e-7 ms/token^2): 100 tokens ~3.0 ms,
1k ~3.4 ms, 10k ~8.0 ms, 100k ~60 ms cold.  ``kv_bytes_per_token`` is 57,344
(Qwen2.5-7B: 28 layers x 4 KV heads x 128 x 2 x bf16).  Bandwidths: cpu 25 GB/s,
gds 12 GB/s, disk 6 GB/s.  ``time_scale`` (0.02) compresses the modeled transfer of
the real model's KV bytes by the same factor by which the quick profile compresses a
real GPU's prefill.  Modeled TTFT (ms, no queueing; warm = all whole chunks cached)::

    prompt    none   cold(cpu)   warm cpu   warm gds   warm disk
    100       3.00     3.05        3.05       3.05       3.05    (< 1 chunk: never hits)
    1k        3.45     3.55        3.15       3.19       3.26
    10k       8.02     8.17        3.47       3.96       4.92    (warm/cold 0.42/0.48/0.59)
    100k     60.25    60.81        7.67      12.63      22.18    (0.13/0.21/0.36)

``store_fraction`` (0.1) models LMCache's mostly asynchronous offload writes: a pure
miss costs ~1-2% more than no offload at all.  Measured TTFTs add the real work that
is not modeled: reading the request body and parsing JSON (~10 ms for 100k token ids
on a 2-core VM), tokenizing text, and real tier reads (disk: one file per chunk).

Decode runs concurrently for every request after its first token; the interval before
each next token is::

    itl_ms = slowdown * (decode_base_ms + decode_ms_per_running_seq * running)

where ``running`` counts requests past prefill and not yet finished (defaults 5 ms and
0.2 ms per sequence).  Deadlines are absolute (each token's target time is the previous
target plus the interval), so no drift accumulates.

Profile ``fixed`` (ground truth for accuracy tests)
---------------------------------------------------
No queue, no cache effect on timing: the first chunk leaves exactly
``slowdown * fixed_ttft_ms`` after the request arrived, then one chunk every
``slowdown * fixed_itl_ms``, whatever the concurrency.  The cache is still looked up
and filled (after the response) so telemetry stays realistic.

Any field of :class:`Profile` can be overridden with ``--config-json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROFILES", "TIERS", "Profile", "make_profile"]

TIERS = ("none", "cpu", "disk", "gds")


@dataclass(frozen=True)
class Profile:
    """Numbers of one timing profile (see module docstring)."""

    name: str = "quick"
    kind: str = "modeled"  # "modeled" or "fixed"
    # prefill
    prefill_base_ms: float = 2.95
    prefill_ms_per_token: float = 5.0e-4
    prefill_ms_per_token_sq: float = 7.3e-7
    # decode
    decode_base_ms: float = 5.0
    decode_ms_per_running_seq: float = 0.2
    # offload tier
    kv_bytes_per_token: int = 57_344
    bandwidth_gbps: Mapping[str, float] = field(
        default_factory=lambda: {"cpu": 25.0, "disk": 6.0, "gds": 12.0}
    )
    time_scale: float = 0.02
    lookup_ms: float = 0.05
    store_base_ms: float = 0.05
    store_fraction: float = 0.1
    # GPU KV capacity for vllm:kv_cache_usage_perc (tokens)
    gpu_kv_capacity_tokens: int = 500_000
    # fixed profile
    fixed_ttft_ms: float = 40.0
    fixed_itl_ms: float = 8.0

    # ---------------------------------------------------------------------------------
    def prefill_ms(self, computed_tokens: int, context_tokens: int) -> float:
        """Modeled compute time (unscaled by slowdown) of a prefill."""
        c = max(0, computed_tokens)
        return (
            self.prefill_base_ms
            + self.prefill_ms_per_token * c
            + self.prefill_ms_per_token_sq * c * context_tokens / 1000.0
        )

    def transfer_ms(self, tier: str, tokens: int) -> float:
        """Modeled time to move ``tokens`` tokens of real-model KV over ``tier``."""
        if tier == "none" or tokens <= 0:
            return 0.0
        bw = float(self.bandwidth_gbps[tier]) * 1e9
        return self.time_scale * 1000.0 * tokens * self.kv_bytes_per_token / bw

    def load_ms(self, tier: str, cached_tokens: int) -> float:
        if tier == "none":
            return 0.0
        return self.lookup_ms + self.transfer_ms(tier, cached_tokens)

    def store_ms(self, tier: str, stored_tokens: int) -> float:
        if tier == "none":
            return 0.0
        base = self.store_base_ms if stored_tokens > 0 else 0.0
        return base + self.store_fraction * self.transfer_ms(tier, stored_tokens)

    def ttft_model_ms(self, tier: str, n: int, cached: int, stored: int) -> float:
        """Modeled prefill-side time, unscaled: compute + load + store."""
        return self.prefill_ms(n - cached, n) + self.load_ms(tier, cached) + self.store_ms(tier, stored)

    def itl_ms(self, running: int) -> float:
        if self.kind == "fixed":
            return self.fixed_itl_ms
        return self.decode_base_ms + self.decode_ms_per_running_seq * max(1, running)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bandwidth_gbps"] = dict(self.bandwidth_gbps)
        return d


PROFILES: dict[str, Profile] = {
    "quick": Profile(),
    "fixed": Profile(name="fixed", kind="fixed"),
}


def make_profile(name: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The named profile with ``overrides`` applied; unknown keys raise ValueError."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    base = PROFILES[name]
    if not overrides:
        return base
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    kw: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields or key in ("name", "kind"):
            raise ValueError(f"unknown profile field {key!r}")
        if key == "bandwidth_gbps":
            if not isinstance(value, Mapping):
                raise ValueError("bandwidth_gbps must be an object {tier: GB/s}")
            merged = dict(base.bandwidth_gbps)
            merged.update({str(k): float(v) for k, v in value.items()})
            kw[key] = merged
        elif key in ("kv_bytes_per_token", "gpu_kv_capacity_tokens"):
            kw[key] = int(value)
        else:
            kw[key] = float(value)
    return dataclasses.replace(base, **kw)
