"""What RAM cannot hold comes from the disk tier behind it (the emulator's ``waterfall``).

The server gets 1 GB of RAM for the KV cache (``server_args``: 17k tokens of the
emulated model), so of 16 prompts of 10k tokens most chunks are demoted to disk by
the end of the cold round, and the warm round must load them from there.
"""

import pytest


@pytest.mark.kvcache(backend="waterfall", input_len="10k", server_args=["--cpu-size-gb", "1"])
def test_disk_serves_what_ram_cannot_hold(kv_load):
    result = kv_load.run(num_prompts=16, concurrency=4, trials=1)
    warm = result.trials[0].measured.telemetry  # the server's counters over the warm round
    from_disk = warm.get("tier_hit_tokens:disk", 0.0) / warm["prompt_tokens"]
    from_ram = warm.get("tier_hit_tokens:cpu", 0.0) / warm["prompt_tokens"]
    assert from_disk > 0.6, warm
    assert from_ram < 0.3, warm
