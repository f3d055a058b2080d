"""Timing profiles of the emulator and the formulas that turn work into time.

All times are in milliseconds, and every modeled time is multiplied by ``slowdown``
(``--slowdown``, default 1.0; the fixed profile's times too, which makes regression
tests of the gate easy).  Modeled times do not depend on the host: the tier's real I/O
(reading chunk payloads back and verifying them) runs inside the modeled window and is
reported beside it (``emulator:tier_io_seconds_total``); it adds to a response only
when it outlasts the window (an overrun, counted in ``emulator:tier_io_overruns_total``).

Profile ``quick`` (default, fast enough for CI)
------------------------------------------------
A request with ``n`` prompt tokens of which ``cached`` come from the offload tier
(``computed = n - cached``) is prefilled by a single FIFO prefill worker (one prefill
at a time, like one GPU, on a virtual clock: a service starts when the request arrived
or the previous one's modeled time ended, whichever is later), so TTFT = queue wait +
prefill::

    prefill_ms  = prefill_base_ms + prefill_ms_per_token * computed
                  + prefill_ms_per_token_sq * pairs(computed, n) / 1000

where ``pairs(c, n) = c * (n - (c - 1) / 2)`` counts the (query, key) pairs causal
attention computes for ``c`` new tokens at the end of an ``n``-token context: each
attends to every token before it and itself.  A cold prefill attends ``n (n + 1) / 2``
pairs; a warm one only its uncached tail's, each over the whole context (fitted to the
CPU vLLM stack by ``python -m pytest_kvcache calibrate``: a warm tail costs about twice
what the cold ``n^2`` slope would say per token and context token)
    load_ms     = lookup_ms (if a tier exists)
                  + time_scale * 1000 * hit * kv_bytes_per_token / bandwidth_bps(tier)
    store_ms    = store_base_ms (if a tier exists)
                  + time_scale * 1000 * stored * kv_bytes_per_token / bandwidth_bps(tier)
                    * store_fraction
    TTFT_model  = slowdown * (prefill_ms + load_ms + store_ms)

``hit`` is what the lookup found; a chunk that then fails verification is recomputed
(``cached`` stops before it, so prefill_ms grows) and offloaded again (``stored``).

With the defaults (base 2.95 ms, 5e-4 ms/token, 1.46e-6 ms per 1000 pairs): 100 tokens ~3.0 ms,
1k ~3.4 ms, 10k ~8.0 ms, 100k ~60 ms cold.  ``kv_bytes_per_token`` is 57,344
(Qwen2.5-7B: 28 layers x 4 KV heads x 128 x 2 x bf16).  Bandwidths: cpu 9.6 GB/s,
gds 6.8 GB/s, disk 6 GB/s, redis 3.9 GB/s; ``lookup_ms`` 0.1.  ``time_scale`` (0.02)
compresses the modeled transfer of the real model's KV bytes by the same factor by
which the quick profile compresses a real GPU's prefill.  Modeled TTFT (ms, no
queueing; warm = all whole chunks cached; in brackets against no offload)::

    prompt    none   cold(cpu)   warm cpu        warm gds        warm disk       warm redis
    100       3.00     3.10        3.10            3.10            3.10            3.10   (< 1 chunk: never hits)
    1k        3.45     3.61        3.26 (-6%)      3.30 (-4%)      3.31 (-4%)      3.39 (-2%)
    10k       8.02     8.29        4.25 (-47%)     4.74 (-41%)     4.97 (-38%)     5.99 (-25%)
    50k      29.78    30.52        9.06 (-70%)    11.52 (-61%)    12.64 (-58%)    17.78 (-40%)
    100k     60.25    61.59       15.08 (-75%)    19.99 (-67%)    22.24 (-63%)    32.51 (-46%)

At 10k tokens this is seed 001's shape: warm TTFT against no offload (whose warm round
recomputes, like a cold one) cpu -47%, disk -38%, redis -25%, with gds between cpu and
disk.

The load times leave room for the real reads: a warm disk or gds request reads one
file per chunk (39 at 10k tokens, 390 at 100k) and verifies each, 8-15 us a chunk on a
2-core VM (~0.35 ms at 10k, ~2 ms at 50k, 4-6 ms at 100k), about 3-6 times less than the
modeled load time (gds 1.8 ms at 10k, 16.9 ms at 100k) and 3-15 times less than the
modeled window the read runs in.

``store_fraction`` (0.1) models LMCache's mostly asynchronous offload writes: a pure
miss costs ~2-5% more than no offload at all.  The host's own work is not modeled:
reading the request body and parsing JSON (~2.5 ms for 10k token ids and ~25 ms for
100k on a 2-core VM), tokenizing text, the real tier I/O.  The parsing overlaps the
modeled window (which starts at arrival) and the I/O runs inside it, so served TTFTs
follow the model as long as the host keeps up with it.

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

The ``redis`` tier (real MGET/MSET against ``--redis-url``, one round trip per request's
chunks) is modeled at 3.9 GB/s in the quick profile: slower than disk, as in seed 001;
at 10k tokens warm redis is ~6.0 ms against 8.0 ms without offload (0.75).  Its real
round trip (~0.5 ms on a 2-core VM) runs inside that window.

The ``waterfall`` tier (RAM over disk) stores at the cpu bandwidth; a hit's chunks are
loaded at the bandwidth of the tier each one was found in (``load_split_ms``).

Seed profiles (real time scale)
-------------------------------
These model the seeds' set-ups at real speed (``time_scale`` 1.0: the real model's KV
bytes over the real link).  Their TTFTs are real-GPU sized (a 10k-token cold prefill
takes ~0.1-1 s), so tests run them with ``--slowdown`` well below 1 (every modeled time
shrinks by the same factor, ratios are kept).  They schedule like vLLM
(``scheduler: "batched"``): continuous batching with at most ``max_num_seqs`` running
sequences and a per-step budget of ``max_num_batched_tokens`` tokens (decode tokens
first, then prefill chunks in arrival order: chunked prefill), a waiting queue, and
TTFT counted from arrival (queueing included).  A step with ``p`` prefill tokens of
contexts ``n_i`` (each chunk's context ending with it) and ``d`` decoding sequences lasts::

    step_ms = step_base_ms + prefill_ms_per_token * p
              + prefill_ms_per_token_sq * sum(pairs(c_i, n_i)) / 1000
              + decode_ms_per_running_seq * d

plus the load/store time of the sequences whose first chunk is in the step.  Steps run
back to back on a virtual clock (each starts when the previous one's modeled time
ends), and a sequence's real tier read overlaps its steps.  Decode
intervals are modeled per request as in the quick profile, plus the prefill compute of
the step in progress (chunked prefill shares each step with the decodes), so a warm
round (less prefill) also shows a lower TPOT, as in seed 001.

KV bytes per token come from each model's configuration
(layers x KV heads x head_dim x 2 (K and V) x 2 bytes (bf16); MLA: layers x
(kv_lora_rank + qk_rope_head_dim) x 2 bytes):

========================  ===============================  ===========  =================
profile                   model / GPU                      KV B/token   bandwidth GB/s
========================  ===============================  ===========  =================
``a100-qwen2.5-7b``       Qwen2.5-7B-Instruct, A100-80GB   57,344       cpu 20 (seed 001
                          28 L x 4 KV x 128                             log: 19.9), disk 3,
                                                                        gds 6, redis 1.5
``rtx4090-qwen3-8b``      Qwen3-8B, RTX 4090 24GB          147,456      cpu 24, disk 7,
                          36 L x 8 KV x 128                             gds 7, redis 6
``h100-mistral-7b``       Mistral-7B-v0.1, H100-80GB       131,072      cpu 50, disk 6,
                          32 L x 8 KV x 128                             gds 12, redis 2
``h100x8-deepseek-v3``    DeepSeek-V3 (MLA), 8 x H100,     70,272       cpu 50, disk 6,
                          TP=8; 61 L x (512 + 64)                       gds 12, redis 2
========================  ===============================  ===========  =================

Prefill coefficients come from the model's FLOPs per token (2 x parameters, active
parameters for DeepSeek-V3's MoE) and attention FLOPs (growing with context) at a
plausible fraction of the GPU's bf16 peak; the RTX 4090 profile is matched to seed 004's
20k-token cold TTFT (0.75 s).  DeepSeek-V3's MLA latent is the same on every TP rank;
LMCache stores one copy, so its KV bytes per token are those of one rank.

Any field of :class:`Profile` can be overridden with ``--config-json``.

Calibrated profiles
-------------------
``python -m pytest_kvcache calibrate`` fits a ``fifo`` profile (``time_scale`` 1, the
model's own KV bytes per token) to a real server and writes it to a profile file
(:mod:`.profile_file`); its path is accepted wherever a profile name is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROFILES", "TIERS", "Profile", "apply_overrides", "attended_pairs", "kv_bytes_per_token", "make_profile",
           "mla_kv_bytes_per_token"]

TIERS = ("none", "cpu", "disk", "gds", "redis", "waterfall")


@dataclass(frozen=True)
class Profile:
    """Numbers of one timing profile (see module docstring)."""

    name: str = "quick"
    kind: str = "modeled"  # "modeled" or "fixed"
    # prefill
    prefill_base_ms: float = 2.95
    prefill_ms_per_token: float = 5.0e-4
    prefill_ms_per_token_sq: float = 1.46e-6  # per 1000 attended (query, key) pairs
    # decode
    decode_base_ms: float = 5.0
    decode_ms_per_running_seq: float = 0.2
    # offload tier
    kv_bytes_per_token: int = 57_344
    bandwidth_gbps: Mapping[str, float] = field(
        default_factory=lambda: {"cpu": 9.6, "disk": 6.0, "gds": 6.8, "redis": 3.9}
    )
    time_scale: float = 0.02
    lookup_ms: float = 0.1
    store_base_ms: float = 0.05
    store_fraction: float = 0.1
    # GPU KV capacity for vllm:kv_cache_usage_perc (tokens)
    gpu_kv_capacity_tokens: int = 500_000
    # fixed profile
    fixed_ttft_ms: float = 40.0
    fixed_itl_ms: float = 8.0
    # scheduling: "fifo" (one prefill at a time, the quick profile) or "batched"
    # (vLLM-like continuous batching, see the module docstring)
    scheduler: str = "fifo"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    step_base_ms: float = 0.0
    # documentation of a seed profile (model, GPU, where the numbers come from)
    description: str = ""

    # ---------------------------------------------------------------------------------
    def prefill_ms(self, computed_tokens: int, context_tokens: int) -> float:
        """Modeled compute time (unscaled by slowdown) of a prefill."""
        c = max(0, computed_tokens)
        return (
            self.prefill_base_ms
            + self.prefill_ms_per_token * c
            + self.prefill_ms_per_token_sq * attended_pairs(c, context_tokens) / 1000.0
        )

    def transfer_ms(self, tier: str, tokens: int) -> float:
        """Modeled time to move ``tokens`` tokens of real-model KV over ``tier``
        (``waterfall``: writes land in RAM, so the cpu bandwidth)."""
        if tier == "none" or tokens <= 0:
            return 0.0
        if tier == "waterfall":
            tier = "cpu"
        bw = float(self.bandwidth_gbps[tier]) * 1e9
        return self.time_scale * 1000.0 * tokens * self.kv_bytes_per_token / bw

    def load_ms(self, tier: str, cached_tokens: int) -> float:
        if tier == "none":
            return 0.0
        return self.lookup_ms + self.transfer_ms(tier, cached_tokens)

    def load_split_ms(self, split: Mapping[str, int]) -> float:
        """Load time of a hit served by several tiers (waterfall): ``{tier: tokens}``."""
        return self.lookup_ms + sum(self.transfer_ms(t, n) for t, n in split.items())

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


def attended_pairs(new_tokens: int, context_tokens: int) -> float:
    """(query, key) pairs causal attention computes for ``new_tokens`` ending a
    ``context_tokens``-token context: each new token attends to all before it and itself."""
    c = max(0, new_tokens)
    return c * (context_tokens - (c - 1) / 2.0)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token of a multi-head / grouped-query attention model."""
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def mla_kv_bytes_per_token(layers: int, kv_lora_rank: int, qk_rope_head_dim: int, dtype_bytes: int = 2) -> int:
    """KV cache bytes per token of a multi-head latent attention (MLA) model."""
    return layers * (kv_lora_rank + qk_rope_head_dim) * dtype_bytes


#: the offload tiers' bandwidth (GB/s) on the H100 seeds' hosts
_H100_HOST_GBPS = {"cpu": 50.0, "disk": 6.0, "gds": 12.0, "redis": 2.0}


def _seed_profile(name: str, description: str, kv_bytes: int, base_ms: float, **kw: Any) -> Profile:
    """A seed's set-up: a batched engine whose steps and prefills cost ``base_ms`` on top of
    their tokens, 256 sequences and 8192 tokens a step unless ``kw`` says otherwise."""
    base: dict[str, Any] = {"time_scale": 1.0, "scheduler": "batched", "lookup_ms": 0.2, "store_base_ms": 0.2,
                            "store_fraction": 0.1, "gpu_kv_capacity_tokens": 400_000, "max_num_seqs": 256,
                            "max_num_batched_tokens": 8192, "prefill_base_ms": base_ms, "step_base_ms": base_ms}
    base.update(kw)
    return Profile(name=name, description=description, kv_bytes_per_token=kv_bytes, **base)


PROFILES: dict[str, Profile] = {
    "quick": Profile(),
    "fixed": Profile(name="fixed", kind="fixed"),
    # Qwen2.5-7B-Instruct (7.6B params) on A100-80GB: ~150 TFLOP/s effective bf16
    "a100-qwen2.5-7b": _seed_profile(
        "a100-qwen2.5-7b", "Qwen2.5-7B-Instruct on NVIDIA A100-SXM4-80GB (seed 001)", kv_bytes_per_token(28, 4, 128),
        12.0, prefill_ms_per_token=0.1, prefill_ms_per_token_sq=2.21e-3, decode_base_ms=13.0,
        decode_ms_per_running_seq=0.4, bandwidth_gbps={"cpu": 20.0, "disk": 3.0, "gds": 6.0, "redis": 1.5}),
    # Qwen3-8B on RTX 4090 24GB, matched to seed 004 (20k tokens cold: 0.75 s)
    "rtx4090-qwen3-8b": _seed_profile(
        "rtx4090-qwen3-8b", "Qwen3-8B on NVIDIA RTX 4090 24GB (seed 004)", kv_bytes_per_token(36, 8, 128),
        20.0, prefill_ms_per_token=0.025, prefill_ms_per_token_sq=5.5e-4, decode_base_ms=25.0,
        decode_ms_per_running_seq=0.8, max_num_seqs=128, max_num_batched_tokens=2048,
        gpu_kv_capacity_tokens=100_000, bandwidth_gbps={"cpu": 24.0, "disk": 7.0, "gds": 7.0, "redis": 6.0}),
    # Mistral-7B-v0.1 on H100-80GB: ~450 TFLOP/s effective bf16
    "h100-mistral-7b": _seed_profile(
        "h100-mistral-7b", "Mistral-7B-v0.1 on NVIDIA H100-80GB", kv_bytes_per_token(32, 8, 128),
        8.0, prefill_ms_per_token=0.032, prefill_ms_per_token_sq=9.9e-4, decode_base_ms=7.0,
        decode_ms_per_running_seq=0.15, bandwidth_gbps=_H100_HOST_GBPS),
    # DeepSeek-V3 (671B, 37B active, MLA) on 8 x H100 with tensor parallelism 8
    "h100x8-deepseek-v3": _seed_profile(
        "h100x8-deepseek-v3", "DeepSeek-V3 (MLA) on 8 x NVIDIA H100, TP=8", mla_kv_bytes_per_token(61, 512, 64),
        30.0, prefill_ms_per_token=0.04, prefill_ms_per_token_sq=2.72e-3, decode_base_ms=25.0,
        decode_ms_per_running_seq=0.3, gpu_kv_capacity_tokens=600_000, bandwidth_gbps=_H100_HOST_GBPS),
}


def make_profile(name: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The named profile with ``overrides`` applied; unknown keys raise ValueError."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    return apply_overrides(PROFILES[name], overrides)


def apply_overrides(base: Profile, overrides: Mapping[str, Any] | None) -> Profile:
    """``base`` with some fields replaced (checked and converted); unknown keys raise ValueError."""
    if not overrides:
        return base
    fields = {f.name: f for f in dataclasses.fields(Profile)}
    kw: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields or key in ("name", "kind", "description"):
            raise ValueError(f"unknown profile field {key!r}")
        if key == "bandwidth_gbps":
            if not isinstance(value, Mapping):
                raise ValueError("bandwidth_gbps must be an object {tier: GB/s}")
            merged = dict(base.bandwidth_gbps)
            merged.update({str(k): float(v) for k, v in value.items()})
            kw[key] = merged
        elif key in ("kv_bytes_per_token", "gpu_kv_capacity_tokens", "max_num_seqs",
                     "max_num_batched_tokens"):
            kw[key] = int(value)
            if kw[key] <= 0 and key != "gpu_kv_capacity_tokens":
                raise ValueError(f"{key} must be positive")
        elif key == "scheduler":
            if value not in ("fifo", "batched"):
                raise ValueError("scheduler must be 'fifo' or 'batched'")
            kw[key] = str(value)
        else:
            kw[key] = float(value)
    return dataclasses.replace(base, **kw)
