"""``--kv-server external``: a tier that is not there is reported with a message about that
server, not about flags the plugin never set."""

from __future__ import annotations

def test_the_hit_check_speaks_of_the_external_server_not_of_flags_we_never_set():
    from pytest_kvcache.telemetry import check_round

    url = "http://10.0.0.5:8000"
    never = check_round("cpu", {"external_hit_tokens": 0.0, "external_query_tokens": 0.0}, [2000], min_ratio=0.5,
                        external=url)
    assert not never.ok
    assert f"the external server at {url} runs no working 'cpu' tier: its KV connector was never asked" in never.message
    assert "--kv-external-backend NAME (none for a server without a tier" in never.message
    assert "check --kv-transfer-config" not in never.message
    tiered = check_round("none", {"external_hit_tokens": 512.0}, [2000], min_ratio=0.5, external=url)
    assert not tiered.ok and f"the external server at {url} runs an offload tier" in tiered.message
    # a started server keeps the message about its flags
    started = check_round("cpu", {"external_hit_tokens": 0.0, "external_query_tokens": 0.0}, [2000], min_ratio=0.5)
    assert "check --kv-transfer-config" in started.message
