"""Warm-round TTFT per offload backend and input length, gated like a scenario item.

The twin of ``scenarios/seed_prefill.yaml`` for three backends and two lengths: six tests
named like ``test_warm_ttft[cpu-1k]``, marked ``none``/``cpu``/``disk``,
selected with ``-m cpu --input-len 1k`` as scenario items are. Store a baseline with
``pytest examples/test_backends_ttft.py --update-baselines`` (three sessions), then
every run is compared with it.
"""

import pytest


@pytest.mark.kvcache(backend=["none", "cpu", "disk"], input_len=["1k", "10k"],
                     thresholds={"median_ttft_ms": "10%", "total_token_throughput": "5%"})
def test_warm_ttft(kv_load, kv_gate):
    result = kv_load.run()  # the seed's load: 50 prompts at concurrency 16, 3 trials of a cold and a warm round
    kv_gate.check(result)  # fails the test on a significant regression beyond the thresholds
