"""CPU offload against recomputing, interleaved trial by trial in one test.

``kv_load.paired`` runs the reference (``none``) and the candidate (this test's
``cpu``) alternately (A B, B A, ...), so both see the same machine; the per-pair
ratios are tested (``stats.compare_paired``). No baseline is needed.
"""

import pytest

from pytest_kvcache.stats import compare_paired


@pytest.mark.kvcache(backend="cpu", input_len="10k", thresholds={"median_ttft_ms": "10%"})
def test_cpu_offload_beats_recompute(kv_load, kv_gate):
    paired = kv_load.paired("none", num_prompts=16, concurrency=8, trials=4)
    pairs = [(r.measured.summary["median_ttft_ms"], c.measured.summary["median_ttft_ms"])
             for r, c in zip(paired.reference.trials, paired.candidate.trials) if r.usable and c.usable]
    gain = compare_paired("median_ttft_ms", [r for r, _ in pairs], [c for _, c in pairs], direction="lower",
                          threshold=0.10)
    assert gain.change_pct < -20, f"warm TTFT from the CPU tier only {gain.change_pct:+.1f}% against recomputing"
    kv_gate.paired(paired)  # in the session's gate: fails if the candidate is worse than the reference
